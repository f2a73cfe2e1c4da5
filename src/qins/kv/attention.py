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


def float_segment(layer) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(fk, fv, skip): the fp tokens attention reads beside the pages, (B, H, F, D): the sink
    copies of tokens still in the pages, then the staging (read back quantized) and the
    residual window; skip = the page tokens they replace (0 .. skip - 1)."""
    Q = layer.n_quantized
    fk, fv = layer.float_segment()
    S = min(layer.sink_k.shape[2], Q)
    if S:
        fk = torch.cat([layer.sink_k[:, :, :S], fk], 2)
        fv = torch.cat([layer.sink_v[:, :, :S], fv], 2)
    return fk, fv, S


def reference_attention(layer, q: torch.Tensor, scale: float) -> torch.Tensor:
    """The reference: every token decoded to float (layer._read), then SDPA. q (B, Hq, Tq, D)."""
    import torch.nn.functional as F
    k, v = layer._read()
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), scale=scale,
                                          is_causal=q.shape[2] > 1 and q.shape[2] == k.shape[2])


def decode_attention(layer, q: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one query token per row over every token `layer` holds: q (B, Hq, 1, D) ->
    (B, Hq, 1, D). The Triton kernel over the pages where the dispatch allows (`layer.kernels`),
    else the reference; `layer.last_path` records which ran."""
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"decode_attention takes one query token: (B, Hq, 1, D), got {tuple(q.shape)}")
    if not layer.kernels:
        layer.last_path = "reference"
        return reference_attention(layer, q, scale)
    from ..kernels.triton_kv import kv_decode_attention
    fk, fv, skip = float_segment(layer)
    pool = layer.pool
    planes = tuple(getattr(pool, p) for p in pool.PLANES)
    out = kv_decode_attention(q[:, :, 0], planes, layer.table.ids, layer.n_quantized, skip, layer.k_offset,
                              layer.k_codec.lut, layer.v_codec.lut, layer._k_affine, layer._v_affine,
                              layer.k_codec.bits, layer.v_codec.bits, layer.group, fk, fv, scale)
    layer.last_path = "triton"
    return out.unsqueeze(2)
