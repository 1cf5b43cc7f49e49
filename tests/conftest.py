"""Test-wide environment: Triton's interpreter and DeepSpeed's CPU accelerator when no GPU.

Both must be set before triton or deepspeed is first imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
