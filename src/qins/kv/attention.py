"""Which path reads a QINSLayer, and decode attention over its pages.

    kernel_path(layer)     why the Triton path cannot run for a layer (None: it can)
    decode_attention(layer, q, scale)
                           softmax(q K^T * scale) V over every token the layer holds, for one
                           query token: the Triton kernel over the pages (CUDA; the CPU under
                           QINS_KERNELS=triton TRITON_INTERPRET=1), else the reference (pages
                           decoded to float, SDPA). `layer.last_path` says which ran.

The backend follows `QINS_KERNELS` (kernels/__init__.py): auto = Triton on CUDA, the
reference elsewhere; reference; triton = Triton or a clear error.
"""
from __future__ import annotations

import torch

from .. import kernels

KERNEL_BITS = (2, 4, 8)


def kernel_path(layer, device) -> str | None:
    """None when the Triton kernels can run this layer on `device`, else the reason."""
    if not kernels.triton_available():
        return "Triton is not installed"
    if not (torch.device(device).type == "cuda" or kernels._interpreting()):
        return f"the cache is on {device} (Triton runs on CUDA, or on the CPU under TRITON_INTERPRET=1)"
    if layer.k_widths is not None:
        return "a key plan (mixed channel widths) is read by the reference"
    kb, vb = layer.k_codec.bits, layer.v_codec.bits
    if kb not in KERNEL_BITS or vb not in KERNEL_BITS:
        return f"k{kb}v{vb}: the kernels read one-plane widths {KERNEL_BITS}"
    D = layer.expect[1] if not layer.is_initialized else layer.keys.shape[3]
    if D is not None and (D < 32 or D & (D - 1)):
        return f"head dim {D}: the kernels take a power of two >= 32"
    return None


def use_kernels(layer, device) -> bool:
    """The dispatch: True when the Triton path runs this layer (QINS_KERNELS, device, shape)."""
    b = kernels.backend()
    if b == "reference":
        return False
    why = kernel_path(layer, device)
    if why is not None and b == "triton":
        raise RuntimeError(f"QINS_KERNELS=triton: cannot run the KV kernels: {why}")
    if b == "auto" and torch.device(device).type != "cuda":
        return False
    return why is None
