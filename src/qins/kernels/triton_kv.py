"""Triton kernels of the paged QINS KV cache (kv/store.py's pool, kv/codec.py's math).

    kv_append        quantize-on-append: whole groups of G new tokens of every (row, head) are
                     quantized (keys per channel over the group, with a zero point or after a
                     fixed offset; values per token) and packed straight into their pages
                     (codes, scales, zero points), one program per (row, head, group).
    kv_decode_attention
                     decode attention (one query token) over the pages: split-KV (flash-
                     decoding), the query heads of one KV head together (GQA), online softmax
                     in base 2, then a log-sum-exp merge of the splits. The float segment
                     (sink copies, staging, residual window) is one more split of the same
                     launch.

Pool layout (kv/store.py): codes (N, H, P, W) int32, key scales / zero points (N, H, P/G, D)
fp16, value scales / zero points (N, H, P) fp16; block table (B, columns) int32. One-plane
widths only (2, 4, 8 bits: a code never crosses a word), D a power of two >= 32; the caller
(kv/attention.py) routes the rest to the torch reference.

Key decode folded into the query: with x = m + r (alpha c + beta) per (group, channel),
    q . k_t = [q . m + beta (q * r) . 1]  +  alpha (q * r) . c_t
so a tile of codes c (as fp16: exact integers) meets (q * r) in one tl.dot, and the bracket is
a per-group bias (levels that are not affine, a > 0, are looked up: alpha = 1, beta = 0).
Values: out = sum_t p_t (m_t + s_t lut[c_t]) = (p * s) . lut[c] (+ p . m): the per-token value
scale folds into the probabilities.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_FP16_MAX = 65504.0


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _bucket(y, mids_ptr, BITS: tl.constexpr):
    """Code = number of midpoints < y (torch.bucketize, ties to the lower level): a binary
    search over mids padded to 2^BITS entries with +inf."""
    pos = tl.zeros(y.shape, dtype=tl.int32)
    for k in tl.static_range(BITS):
        step: tl.constexpr = 1 << (BITS - 1 - k)
        cand = pos + step
        mid = tl.load(mids_ptr + cand - 1)
        pos = tl.where(mid < y, cand, pos)
    return pos


@triton.jit
def _pack(codes, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """(ROWS, D) int32 codes -> (ROWS, D * BITS / 32) int32 words (code i of a word in bits i*BITS)."""
    N: tl.constexpr = 32 // BITS
    sh = tl.arange(0, N) * BITS
    c = tl.reshape(codes, (ROWS, D // N, N)) << sh[None, None, :]
    return tl.reduce(c, 2, _or)


@triton.jit
def _kv_append_kernel(k_ptr, v_ptr, off_ptr, table_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr,
                      kmids_ptr, vmids_ptr, H, T0, P, COLS, SINK,
                      G: tl.constexpr, D: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr,
                      K_ZERO: tl.constexpr, K_SIGNED: tl.constexpr, HAS_OFF: tl.constexpr,
                      V_ZERO: tl.constexpr, V_SIGNED: tl.constexpr):
    pid_bh = tl.program_id(0)
    j = tl.program_id(1)                         # group j of this append
    b = pid_bh // H
    h = pid_bh % H
    n_tok = tl.num_programs(1) * G
    t = tl.arange(0, G)
    d = tl.arange(0, D)
    src = j * G + t                              # token in this append
    src = tl.where(j == 0, tl.maximum(src, SINK), src)   # sink tokens take the next token's keys (stats view)
    row = (pid_bh * n_tok + src)[:, None] * D + d[None, :]
    k = tl.load(k_ptr + row).to(tl.float32)     # (G, D)
    if HAS_OFF:
        off = tl.load(off_ptr + pid_bh * D + d).to(k_ptr.dtype.element_ty).to(tl.float32)
        k = (k - off[None, :]).to(k_ptr.dtype.element_ty).to(tl.float32)   # in the model's dtype, as torch
    hi = tl.max(k, 0)
    lo = tl.min(k, 0)
    if K_ZERO:                                   # zero_point_params: m first, r about the stored m
        m16 = tl.minimum(tl.maximum((hi + lo) * 0.5, -65504.0), 65504.0).to(tl.float16)
        mf = m16.to(tl.float32)
        r16 = tl.minimum(tl.maximum(tl.maximum(hi - mf, mf - lo), 0.0), 65504.0).to(tl.float16)
        rf = r16.to(tl.float32)
        y = tl.math.div_rn(k - mf[None, :], tl.where(rf == 0.0, 1.0, rf)[None, :])
    else:
        if K_SIGNED:
            s = tl.where(hi >= -lo, hi, lo)
        else:
            s = tl.maximum(hi, -lo)
        r16 = tl.minimum(tl.maximum(s, -65504.0), 65504.0).to(tl.float16)
        r16 = tl.where(r16 == 0.0, 1.0, r16).to(tl.float16)
        rf = r16.to(tl.float32)
        y = tl.math.div_rn(k, rf[None, :])
    y = tl.minimum(tl.maximum(y, -1.0), 1.0)
    kcode = _bucket(y, kmids_ptr, KB)
    # values: one scale (and zero point) per token over D channels
    v = tl.load(v_ptr + (pid_bh * n_tok + j * G + t)[:, None] * D + d[None, :]).to(tl.float32)
    vhi = tl.max(v, 1)
    vlo = tl.min(v, 1)
    if V_ZERO:
        vm16 = tl.minimum(tl.maximum((vhi + vlo) * 0.5, -65504.0), 65504.0).to(tl.float16)
        vmf = vm16.to(tl.float32)
        vs16 = tl.minimum(tl.maximum(tl.maximum(vhi - vmf, vmf - vlo), 0.0), 65504.0).to(tl.float16)
        vsf = vs16.to(tl.float32)
        vy = tl.math.div_rn(v - vmf[:, None], tl.where(vsf == 0.0, 1.0, vsf)[:, None])
    else:
        if V_SIGNED:
            vsx = tl.where(vhi >= -vlo, vhi, vlo)
        else:
            vsx = tl.maximum(vhi, -vlo)
        vs16 = tl.minimum(tl.maximum(vsx, -65504.0), 65504.0).to(tl.float16)
        vs16 = tl.where(vs16 == 0.0, 1.0, vs16).to(tl.float16)
        vsf = vs16.to(tl.float32)
        vy = tl.math.div_rn(v, vsf[:, None])
    vy = tl.minimum(tl.maximum(vy, -1.0), 1.0)
    vcode = _bucket(vy, vmids_ptr, VB)
    # destination: page of token T0 + j G, its slot (a group never straddles a page)
    tok = T0 + j * G
    page = tl.load(table_ptr + b * COLS + tok // P).to(tl.int64)
    slot = tok % P
    WK: tl.constexpr = D * KB // 32
    WV: tl.constexpr = D * VB // 32
    kw = _pack(kcode, G, D, KB)
    vw = _pack(vcode, G, D, VB)
    base = page * H + h                          # (page, head)
    tl.store(kc_ptr + (base * P + slot + t)[:, None] * WK + tl.arange(0, WK)[None, :], kw)
    tl.store(vc_ptr + (base * P + slot + t)[:, None] * WV + tl.arange(0, WV)[None, :], vw)
    GP = P // G
    tl.store(ks_ptr + (base * GP + slot // G) * D + d, r16)
    if K_ZERO:
        tl.store(kz_ptr + (base * GP + slot // G) * D + d, m16)
    tl.store(vs_ptr + base * P + slot + t, vs16)
    if V_ZERO:
        tl.store(vz_ptr + base * P + slot + t, vm16)


def padded_mids(mids: torch.Tensor, bits: int) -> torch.Tensor:
    """(2^bits,) float32: the codec's midpoints, then +inf (so the search never passes the last level)."""
    out = torch.full((2 ** bits,), float("inf"), dtype=torch.float32, device=mids.device)
    out[:mids.numel()] = mids
    return out


def kv_append(k: torch.Tensor, v: torch.Tensor, k_offset: torch.Tensor | None, table: torch.Tensor, t0: int,
              planes: tuple, k_mids: torch.Tensor, v_mids: torch.Tensor, k_bits: int, v_bits: int, group: int,
              k_signed: bool, v_signed: bool, sink: int = 0) -> None:
    """Quantize k, v (B, H, n G, D) (n whole groups, tokens t0 .. t0 + n G - 1 of every row,
    t0 a multiple of G) into the pages `table` (B, columns) int32 points at.

    planes: the pool's (k_codes, k_scale, k_zero or None, v_codes, v_scale, v_zero or None).
    k_offset (B, H, 1, D) fp16: subtracted from keys first (keys without zero points).
    k_mids / v_mids: padded_mids of the codecs. sink: for the stream's first group, tokens
    below it are quantized as the token at `sink` (QINSLayer._key_stats_view)."""
    B, H, T, D = k.shape
    if T % group or t0 % group:
        raise ValueError(f"kv_append takes whole groups of {group} tokens at a group boundary, got {T} at {t0}")
    if k_bits not in (2, 4, 8) or v_bits not in (2, 4, 8) or D < 32 or D & (D - 1):
        raise ValueError(f"kv_append supports 2, 4 and 8 bits and a power-of-two head dim >= 32, "
                         f"got k{k_bits} v{v_bits} D={D}")
    if T == 0:
        return
    kc, ks, kz, vc, vs, vz = planes
    P = kc.shape[2]
    k, v = k.contiguous(), v.contiguous()
    off = k_offset.contiguous() if k_offset is not None else k
    grid = (B * H, T // group)
    _kv_append_kernel[grid](k, v, off, table, kc, ks, kz if kz is not None else ks, vc, vs,
                            vz if vz is not None else vs, k_mids, v_mids, H, t0, P, table.shape[1], sink,
                            G=group, D=D, KB=k_bits, VB=v_bits, K_ZERO=kz is not None, K_SIGNED=k_signed,
                            HAS_OFF=k_offset is not None, V_ZERO=vz is not None, V_SIGNED=v_signed,
                            num_warps=4)
