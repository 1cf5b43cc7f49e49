"""memdist: memory-layer language models whose value tables outgrow one node.

Importing this package is cheap on purpose (no Ray, DeepSpeed or zarr), so that
``memdist.kernels`` runs on a machine that has only torch and triton.
"""

__version__ = "0.1.0"
