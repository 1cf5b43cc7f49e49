"""Shard storage and checkpoints: zarr arrays, S3 transfer, manifests (imported as memdist.storage)."""
