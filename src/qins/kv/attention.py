"""Which path reads a QINSLayer, and decode attention over its pages.

    kernel_path(layer)     why the Triton path cannot run for a layer (None: it can)
    decode_attention(layer, q, scale)
                           softmax(q K^T * scale) V over every token the layer holds, for one
                           query token: the Triton kernel over the pages (CUDA; the CPU under
                           QINS_KERNELS=triton TRITON_INTERPRET=1), else the reference (pages
                           decoded to float, SDPA). `layer.last_path` says which ran.

The backend follows `QINS_KERNELS` (kernels/__init__.py): auto = the CUDA kernel where it builds
and takes the layer, else Triton, on CUDA; the reference elsewhere; reference; triton = Triton
only, or a clear error.
"""
from __future__ import annotations

import torch

from .. import kernels
from .vrot import turn

KERNEL_BITS = (2, 4, 8)


def kernel_path(layer, device) -> str | None:
    """None when the Triton kernels can run this layer on `device`, else the reason. A layer with a
    key plan is read by the first Triton decode kernel and sealed by the append kernel (per-channel
    fields)."""
    if not kernels.triton_available():
        return "Triton is not installed"
    if not (torch.device(device).type == "cuda" or kernels._interpreting()):
        return f"the cache is on {device} (Triton runs on CUDA, or on the CPU under TRITON_INTERPRET=1)"
    kb, vb = layer.k_codec.bits, layer.v_codec.bits
    if (layer.k_widths is None and kb not in KERNEL_BITS) or vb not in KERNEL_BITS:
        return f"k{kb}v{vb}: the kernels read one-plane widths {KERNEL_BITS}"
    D = layer.expect[1] if not layer.is_initialized else layer.keys.shape[3]
    if D is not None and (D < 32 or D & (D - 1)):
        return f"head dim {D}: the kernels take a power of two >= 32"
    if layer.rope is not None and D is not None and layer.rope.dims != D:
        return f"pre-RoPE keys with {layer.rope.dims} of {D} channels rotary are read by the reference"
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


def float_segment(layer, v_turned: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(fk, fv, skip): the fp tokens attention reads beside the pages, (B, H, F, D): the sink
    copies of tokens still in the pages, then the staging (read back quantized) and the
    residual window; skip = the page tokens they replace (0 .. skip - 1). v_turned: rotated
    values in their stored frame (QINSLayer._read)."""
    Q = layer.n_quantized
    fk, fv = layer.float_segment(v_turned)
    S = min(layer.sink_k.shape[2], Q)
    if S:
        sv = layer.sink_v[:, :, :S]
        fk = torch.cat([layer.sink_k[:, :, :S], fk], 2)
        fv = torch.cat([layer._pre_v(sv) if v_turned else sv, fv], 2)
    return fk, fv, S


def reference_attention(layer, q: torch.Tensor, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: every token decoded to float (layer._read), then SDPA. q (B, Hq, 1, D),
    mask (B, T) bool or None."""
    import torch.nn.functional as F
    k, v = layer._read()
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), scale=scale,
                                          attn_mask=None if mask is None else mask[:, None, None, :])


def decode_attention(layer, q: torch.Tensor, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query token per row over every token `layer` holds: q (B, Hq, 1, D) ->
    (B, Hq, 1, D); mask (B, T) bool (True = attend) or None. The Triton kernel over the pages
    where the dispatch allows (`layer.kernels`: the CUDA kernel where it builds and takes the
    layer, else Triton), else the reference; `layer.last_path` records which ran ("cuda",
    "triton" or "reference")."""
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"decode_attention takes one query token: (B, Hq, 1, D), got {tuple(q.shape)}")
    if not layer.kernels:
        layer.last_path = "reference"
        return reference_attention(layer, q, scale, mask)
    from ..kernels.triton_kv import cuda_reason, kv_decode_attention
    # rotated values: attend in the frame the pages hold them in, turn the output back
    fk, fv, skip = float_segment(layer, v_turned=True)
    fields = layer.key_fields()                       # a key plan: per-channel fields, read by Triton
    pool = layer.pool
    planes = tuple(getattr(pool, p) for p in pool.PLANES)
    kb, vb = layer.k_codec.bits, layer.v_codec.bits
    # the route is decided here once and handed down, so the label is what ran
    rope = None if layer.rope is None else layer.rope.freqs(q.device)
    on_cuda = cuda_reason(q[:, :, 0], fk, layer.k_offset, mask, None, q.shape[1] // planes[0].shape[1], kb, vb,
                          layer.group, layer._k_affine, layer._v_affine, rope, fields) is None
    out = kv_decode_attention(q[:, :, 0], planes, layer.table.ids, layer.n_quantized, skip, layer.k_offset,
                              layer.k_codec.lut, layer.v_codec.lut, layer._k_affine, layer._v_affine,
                              kb, vb, layer.group, fk, fv, scale, mask=mask, cuda=on_cuda, rope=rope, k_fields=fields)
    layer.last_path = "cuda" if on_cuda else "triton"
    if layer._v_rot is not None:
        out = turn(out, layer._v_rot, inverse=True).to(out.dtype)
    return out.unsqueeze(2)


# -- the transformers adapter ------------------------------------------------------------------
NAME = "qins_paged"


class PagedKV:
    """What QINSLayer.update returns for a decode step on the kernel path in place of the
    (B, H, T, D) history: a handle the `qins_paged` attention reads the pages through. It is
    not a tensor, so an attention that does not know it fails loudly instead of attending to
    the wrong tokens."""

    __slots__ = ("layer",)

    def __init__(self, layer):
        self.layer = layer


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface for models whose cache is a QINSCache on the kernel
    path or with rotated values: a decode step on the kernels (with no mask, or a boolean
    (B, 1, 1, T) one: key padding) runs decode_attention over the pages; any other call (prefill,
    other masks, the reference, layers that are not QINS) runs SDPA over float K/V (the pages
    decoded by the reference where the layer handed a PagedKV; rotated values stay rotated and
    the output is turned back)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if isinstance(key, PagedKV):
        layer = key.layer
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        T = layer.get_seq_length()
        mask = attention_mask
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4 \
                and mask.shape[:3] == (query.shape[0], 1, 1) and mask.shape[3] == T:
            mask = mask[:, 0, 0, :]                                   # (B, T) key padding
        if query.shape[2] == 1 and (mask is None or mask.dim() == 2) and layer.kernels:
            out = decode_attention(layer, query, scale, mask)
            return out.transpose(1, 2).contiguous(), None
        layer.last_path = "reference"
        if layer._v_rot is not None:
            # rotated values read in their stored frame; the output (B, T, Hq, D) turned back once
            key, value = layer._read(v_turned=True)
            out, w = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                            dropout=dropout, **kwargs)
            return turn(out, layer._v_rot, inverse=True).to(out.dtype), w
        key, value = layer._read()
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


def install(model) -> bool:
    """Route `model`'s attention through `paged_attention_forward` (registered in transformers'
    AttentionInterface and, with SDPA's mask, AttentionMaskInterface). Only a model on SDPA
    (transformers' default) is switched, as every call that is not a QINS decode step still
    runs SDPA; returns whether the model now uses it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(NAME, paged_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    from ._compat import model_configs
    configs = model_configs(model)
    if any(getattr(c, "_attn_implementation", None) not in ("sdpa", NAME) for c in configs):
        return False
    for c in configs:
        c._attn_implementation = NAME
    return True
