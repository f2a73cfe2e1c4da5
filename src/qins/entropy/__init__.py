"""qins.entropy: measure, then entropy-code what pays (statistics, policy, coders, RLE, archive).

    stats.py     histogram, order-0 entropy
    symbols.py   tensors <-> uint8 symbol streams (packed codes unpacked one code a byte)
    coders.py    raw, zstd (Huffman/FSE) and ANS (constriction), bit-exact, tables included
    policy.py    per-tensor measurements, hot/cold access, the policy `pack` applies
    archive.py   the .qins file: versioned, checksummed, streamed, random access
"""
from __future__ import annotations

import os
from pathlib import Path


def load(path: str | os.PathLike, device="cpu", dtype=None, verify: bool = True, threads: int | None = None,
         device_map=None, max_memory: dict | None = None):
    """qins.load: a .qins archive file (decoded by `threads` threads) or a saved directory.
    device_map / max_memory: placement across devices (weights/serialization.py load)."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    if Path(path).is_file() and _is_archive(path):
        from .archive import load as load_archive
        return load_archive(path, device=device, dtype=dtype, threads=threads,
                            device_map=device_map, max_memory=max_memory)
    from ..weights.serialization import load as load_dir
    return load_dir(path, device=device, dtype=dtype, verify=verify, device_map=device_map,
                    max_memory=max_memory)


def _is_archive(path) -> bool:
    """A .qins file by name or by its magic (a damaged one still gets the archive's errors)."""
    from .archive import MAGIC
    if str(path).endswith(".qins"):
        return True
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC
