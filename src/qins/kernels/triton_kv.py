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
                     launch. Two kernels: the folded one (affine keys, the cache's default at
                     every width: query heads x token phases fill the tensor-core rows, inline
                     PTX decode on CUDA) and the first one (query heads padded to 16 rows; keys
                     with a table, closed-form values).

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

from . import _interpreting, cuda_refused
from . import cuda_kv as _cuda_kv
from . import prmt as _prmt

_AFF4 = tl.constexpr(_prmt.KV_AFFINE4)
_AFF4_C = tl.constexpr(_prmt.KV_AFFINE4_CONSTRAINTS)
_AFF8 = tl.constexpr(_prmt.KV_AFFINE8)
_AFF8_C = tl.constexpr(_prmt.KV_AFFINE8_CONSTRAINTS)
_TAB4 = tl.constexpr(_prmt.KV_TABLE4)
_TAB4_C = tl.constexpr(_prmt.KV_TABLE4_CONSTRAINTS)

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
        cand = pos + (1 << (BITS - 1 - k))
        mid = tl.load(mids_ptr + cand - 1)
        pos = tl.where(mid < y, cand, pos)
    return pos


@triton.jit
def _pack(codes, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """(ROWS, D) int32 codes -> (ROWS, D * BITS / 32) int32 words (code i of a word in bits i*BITS)."""
    sh = tl.arange(0, 32 // BITS) * BITS
    c = tl.reshape(codes, (ROWS, D * BITS // 32, 32 // BITS)) << sh[None, None, :]
    return tl.reduce(c, 2, _or)


@triton.jit
def _kv_append_kernel(k_ptr, v_ptr, off_ptr, table_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr,
                      kmids_ptr, vmids_ptr, kidx_ptr, ksh_ptr, ktop_ptr, H, T0, P, COLS, SINK,
                      G: tl.constexpr, D: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr,
                      K_ZERO: tl.constexpr, K_SIGNED: tl.constexpr, HAS_OFF: tl.constexpr,
                      V_ZERO: tl.constexpr, V_SIGNED: tl.constexpr, MIXED: tl.constexpr, KW: tl.constexpr):
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
    if MIXED:                                    # a key plan: channel d on the zero-point grid of its width
        top = tl.load(ktop_ptr + h * D + d)      # 2^w - 1 (float32; 0: no field)
        kcode = tl.minimum(tl.maximum(tl.floor((y + 1.0) * 0.5 * top[None, :] + 0.5), 0.0), top[None, :]).to(tl.int32)
    else:
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
    vw = _pack(vcode, G, D, VB)
    base = page * H + h                          # (page, head)
    if MIXED:                                    # fields into their bytes: word idx // 4, bit 8 (idx % 4) + shift
        kidx = tl.load(kidx_ptr + h * D + d)
        part = kcode << ((kidx % 4) * 8 + tl.load(ksh_ptr + h * D + d))[None, :]
        wi = tl.arange(0, KW)
        kw = tl.zeros((G, KW), tl.int32)
        for w in tl.static_range(KW):            # disjoint fields: the sum is the OR
            col = tl.sum(tl.where((kidx // 4 == w)[None, :], part, 0), 1)
            kw = tl.where((wi == w)[None, :], col[:, None], kw)
        tl.store(kc_ptr + (base * P + slot + t)[:, None] * KW + wi[None, :], kw)
    else:
        kw = _pack(kcode, G, D, KB)
        tl.store(kc_ptr + (base * P + slot + t)[:, None] * (D * KB // 32) + tl.arange(0, D * KB // 32)[None, :], kw)
    tl.store(vc_ptr + (base * P + slot + t)[:, None] * (D * VB // 32) + tl.arange(0, D * VB // 32)[None, :], vw)
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
              k_signed: bool, v_signed: bool, sink: int = 0, k_fields: tuple | None = None) -> None:
    """Quantize k, v (B, H, n G, D) (n whole groups, tokens t0 .. t0 + n G - 1 of every row,
    t0 a multiple of G) into the pages `table` (B, columns) int32 points at.
    k_fields (RowLayout.kernel_fields of a key plan's layout, or None): keys on each channel's own width,
    packed into its byte field (kv.codec.encode_keys_mixed's rounding; needs key zero points).

    planes: the pool's (k_codes, k_scale, k_zero or None, v_codes, v_scale, v_zero or None).
    k_offset (B, H, 1, D) fp16: subtracted from keys first (keys without zero points).
    k_mids / v_mids: padded_mids of the codecs. sink: for the stream's first group, tokens
    below it are quantized as the token at `sink` (QINSLayer._key_stats_view)."""
    B, H, T, D = k.shape
    if T % group or t0 % group:
        raise ValueError(f"kv_append takes whole groups of {group} tokens at a group boundary, got {T} at {t0}")
    if (k_fields is None and k_bits not in (2, 4, 8)) or v_bits not in (2, 4, 8) or D < 32 or D & (D - 1):
        raise ValueError(f"kv_append supports 2, 4 and 8 bits and a power-of-two head dim >= 32, "
                         f"got k{k_bits} v{v_bits} D={D}")
    if T == 0:
        return
    kc, ks, kz, vc, vs, vz = planes
    P = kc.shape[2]
    if k_fields is not None:
        if kz is None:
            raise ValueError("a key plan's pages (k_fields) have key zero points; the pool has none")
        idx, shift, mask = k_fields[:3]
        top = mask.to(torch.float32)            # a w-bit field's mask is 2^w - 1, its top code
    k, v = k.contiguous(), v.contiguous()
    off = k_offset.contiguous() if k_offset is not None else k
    grid = (B * H, T // group)
    mixed = k_fields is not None
    _kv_append_kernel[grid](k, v, off, table, kc, ks, kz if kz is not None else ks, vc, vs,
                            vz if vz is not None else vs, k_mids, v_mids, *((idx, shift, top) if mixed else (ks,) * 3),
                            H, t0, P, table.shape[1], sink,
                            G=group, D=D, KB=k_bits, VB=v_bits, K_ZERO=kz is not None, K_SIGNED=k_signed,
                            HAS_OFF=k_offset is not None, V_ZERO=vz is not None, V_SIGNED=v_signed,
                            MIXED=mixed, KW=kc.shape[3], num_warps=4,
                            # a key plan's codes round (y + 1) / 2 * top + 1/2 as torch does: no fused multiply-add
                            **({"enable_fp_fusion": False} if mixed else {}))


@triton.jit
def _unpack(words, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """(ROWS, D * BITS / 32) int32 words -> (ROWS, D) int32 codes (channel d = word d / N, lane d % N)."""
    sh = tl.arange(0, 32 // BITS) * BITS
    c = (words[:, :, None] >> sh[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(c, (ROWS, D))


@triton.jit
def _mixed_codes(kc8_ptr, rows, ok, kidx_ptr, ksh_ptr, kmk_ptr, h, chans, D: tl.constexpr, KW: tl.constexpr):
    """(ROWS, len(chans)) int32 codes of a key plan's rows (kv/layout.py RowLayout.mixed): channel d
    of head h is the field (byte idx[h, d] >> shift[h, d]) & mask[h, d] of its row's 4 KW bytes."""
    off = h * D + chans
    by = tl.load(kc8_ptr + rows[:, None] * (KW * 4) + tl.load(kidx_ptr + off)[None, :], mask=ok[:, None], other=0)
    return (by.to(tl.int32) >> tl.load(ksh_ptr + off)[None, :]) & tl.load(kmk_ptr + off)[None, :]


@triton.jit
def _as_f16_plus_1024(codes):
    """int32 codes < 1024 -> fp16 1024 + code with one OR and a bitcast (0x6400 is 1024.0 in fp16;
    the code fills the mantissa): no int->float conversion, which runs at a quarter of the ALU
    rate. Callers subtract 1024 x (the other operand's sum)."""
    return (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _online(s, m_i, l_i, acc):
    """One online-softmax step in base 2: (p, new m, l, rescaled acc) for scores s (BH, BT)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    corr = tl.math.exp2(m_i - m_safe)
    return p, m_new, l_i * corr + tl.sum(p, 1), acc * corr[:, None]


@triton.jit
def _float_segment(q, fk_ptr, fv_ptr, mask_ptr, pid_bh, b, F, SKIP, Q, MT, m_i, l_i, acc, d,
                   D: tl.constexpr, BLOCK_F: tl.constexpr, HAS_MASK: tl.constexpr, DOT: tl.constexpr):
    """Online softmax over the float segment (sink copies, staging, residual) of one (row, KV
    head): q (BLOCK_H, D) fp32. DOT: fp32 tl.dot (BLOCK_H >= 16), else fp32 FMAs."""
    tf = tl.arange(0, BLOCK_F)
    for f0 in range(0, F, BLOCK_F):
        f = f0 + tf
        fok = f < F
        if HAS_MASK:                             # sink copies are positions 0 .. SKIP-1, then Q ..
            pos = tl.where(f < SKIP, f, Q + f - SKIP)
            fok = fok & (tl.load(mask_ptr + b * MT + pos, mask=fok, other=0) != 0)
        rows = (pid_bh * F + f)[:, None] * D + d[None, :]
        k = tl.load(fk_ptr + rows, mask=fok[:, None], other=0.0).to(tl.float32)
        if DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.sum(q[:, None, :] * k[None, :, :], 2)
        s = tl.where(fok[None, :], s, float("-inf"))
        p, m_i, l_i, acc = _online(s, m_i, l_i, acc)
        v = tl.load(fv_ptr + rows, mask=fok[:, None], other=0.0).to(tl.float32)
        if DOT:
            acc += tl.dot(p, v, input_precision="ieee")
        else:
            acc += tl.sum(p[:, :, None] * v[None, :, :], 1)
    return m_i, l_i, acc


@triton.jit
def _kv_decode_kernel(q_ptr, kc_ptr, ks_ptr, kz_ptr, koff_ptr, vc_ptr, vs_ptr, vz_ptr, klut_ptr, vlut_ptr,
                      table_ptr, fk_ptr, fv_ptr, o_ptr, ml_ptr, mask_ptr, rope_ptr,
                      kc8_ptr, kidx_ptr, ksh_ptr, kmk_ptr, kfa_ptr, kfb_ptr,
                      H, QH, Q, P, COLS, SKIP, F, TPS, NSPLIT, MT, qk_scale,
                      k_alpha, k_beta, v_alpha, v_beta, v_curv,
                      G: tl.constexpr, D: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr,
                      K_BASE: tl.constexpr, K_AFFINE: tl.constexpr, V_ZERO: tl.constexpr, V_AFFINE: tl.constexpr,
                      HAS_MASK: tl.constexpr, MAGIC: tl.constexpr, V_CLOSED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
                      ROPE: tl.constexpr, MIXED: tl.constexpr, KW: tl.constexpr):
    pid_bh = tl.program_id(0)                    # (row, KV head)
    pid_s = tl.program_id(1)                     # split; the last one reads the float segment
    b = pid_bh // H
    h = pid_bh % H
    i = tl.arange(0, BLOCK_H)
    h_ok = i < QH
    d = tl.arange(0, D)
    tt = tl.arange(0, BLOCK_T)
    qrow = (b * H * QH + h * QH + i)             # query heads h*QH .. h*QH + QH - 1 of row b
    q = tl.load(q_ptr + qrow[:, None] * D + d[None, :], mask=h_ok[:, None], other=0.0).to(tl.float32)
    q = q * qk_scale                             # softmax scale and log2(e): exp2 below
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, D), tl.float32)
    if pid_s < NSPLIT:
        GP = P // G
        start = pid_s * TPS
        end = tl.minimum(start + TPS, Q)
        for t0 in range(start, end, BLOCK_T):
            page = tl.load(table_ptr + b * COLS + t0 // P).to(tl.int64)
            slot = t0 % P
            base = page * H + h
            t = t0 + tt
            ok = (t < end) & (t >= SKIP)         # sink tokens are read from their fp copies
            if HAS_MASK:                         # key padding mask (B, T): position t
                ok = ok & (tl.load(mask_ptr + b * MT + t, mask=ok, other=0) != 0)
            if ROPE:                             # pre-RoPE keys: decoded, then turned by t * f, per half
                s = _rope_scores(q_ptr, kc_ptr, ks_ptr, kz_ptr, koff_ptr, klut_ptr, rope_ptr, qrow, h_ok, qk_scale,
                                 base, slot, tt, t, ok, pid_bh, GP, P, k_alpha, k_beta,
                                 kc8_ptr, kidx_ptr, ksh_ptr, kmk_ptr, kfa_ptr, kfb_ptr, h,
                                 G, D, KB, K_BASE, K_AFFINE, BLOCK_H, BLOCK_T, MIXED, KW)
            elif MIXED:
                # a key plan: channel d has its own width, x = m + r (fa_d c + fb_d), so
                # q . x = q . (m + r fb) + (q r fa) . c, codes gathered from their bytes
                gsl = (base * GP + slot // G) * D + d
                r = tl.load(ks_ptr + gsl).to(tl.float32)
                fa = tl.load(kfa_ptr + h * D + d)
                fb = tl.load(kfb_ptr + h * D + d)
                qr = q * (r * fa)[None, :]
                bias = tl.sum(q * (tl.load(kz_ptr + gsl).to(tl.float32) + r * fb)[None, :], 1)
                kcode = _mixed_codes(kc8_ptr, base * P + slot + tt, ok, kidx_ptr, ksh_ptr, kmk_ptr, h, d, D, KW)
                s = tl.dot(qr.to(tl.float16), tl.trans(kcode.to(tl.float16))) + bias[:, None]
            else:
                # keys: q . (m + r (alpha c + beta)) = [q . m + beta (q r) . 1] + alpha (q r) . c
                r = tl.load(ks_ptr + (base * GP + slot // G) * D + d).to(tl.float32)
                qr = q * r[None, :]
                bias = k_beta * tl.sum(qr, 1)
                if K_BASE == 1:                  # zero point per (group, channel)
                    bias += tl.sum(q * tl.load(kz_ptr + (base * GP + slot // G) * D + d).to(tl.float32)[None, :], 1)
                if K_BASE == 2:                  # fixed offset per channel (keys without zero points)
                    bias += tl.sum(q * tl.load(koff_ptr + pid_bh * D + d).to(tl.float32)[None, :], 1)
                kw = tl.load(kc_ptr + (base * P + slot + tt)[:, None] * (D * KB // 32)
                             + tl.arange(0, D * KB // 32)[None, :], mask=ok[:, None], other=0)
                kcode = _unpack(kw, BLOCK_T, D, KB)
                qr16 = qr.to(tl.float16)
                if K_AFFINE and MAGIC:           # (q r) . (1024 + c) - 1024 sum(q r) = (q r) . c
                    s = (tl.dot(qr16, tl.trans(_as_f16_plus_1024(kcode)))
                         - 1024.0 * tl.sum(qr16.to(tl.float32), 1)[:, None]) * k_alpha + bias[:, None]
                elif K_AFFINE:
                    s = tl.dot(qr16, tl.trans(kcode.to(tl.float16))) * k_alpha + bias[:, None]
                else:
                    s = tl.dot(qr16, tl.trans(tl.load(klut_ptr + kcode).to(tl.float16))) + bias[:, None]
            s = tl.where(ok[None, :], s, float("-inf"))
            p, m_i, l_i, acc = _online(s, m_i, l_i, acc)
            # values: sum_t p_t (m_t + s_t (alpha c + beta)) ; the per-token scale folds into p
            vsc = tl.load(vs_ptr + base * P + slot + tt, mask=ok, other=0.0).to(tl.float32)
            pv = p * vsc[None, :]
            vw = tl.load(vc_ptr + (base * P + slot + tt)[:, None] * (D * VB // 32) + tl.arange(0, D * VB // 32)[None, :],
                         mask=ok[:, None], other=0)
            vcode = _unpack(vw, BLOCK_T, D, VB)
            pv16 = pv.to(tl.float16)
            if V_AFFINE:
                pvs = tl.sum(pv16.to(tl.float32), 1)
                if MAGIC:
                    acc += (tl.dot(pv16, _as_f16_plus_1024(vcode)) - 1024.0 * pvs[:, None]) * v_alpha \
                        + (v_beta * pvs)[:, None]
                else:
                    acc += tl.dot(pv16, vcode.to(tl.float16)) * v_alpha + (v_beta * pvs)[:, None]
            elif V_CLOSED:                       # qins levels j / (N (1 + a) - a |j|), j = c - (N - 1)
                j = vcode.to(tl.float32) - ((1 << (VB - 1)) - 1)
                lvl = tl.fdiv(j, (1 << (VB - 1)) * (1.0 + v_curv) - v_curv * tl.abs(j))
                acc += tl.dot(pv16, lvl.to(tl.float16))
            else:
                acc += tl.dot(pv16, tl.load(vlut_ptr + vcode).to(tl.float16))
            if V_ZERO:
                vm = tl.load(vz_ptr + base * P + slot + tt, mask=ok, other=0.0).to(tl.float32)
                acc += tl.sum(p * vm[None, :], 1)[:, None]
    else:                                        # the float segment
        m_i, l_i, acc = _float_segment(q, fk_ptr, fv_ptr, mask_ptr, pid_bh, b, F, SKIP, Q, MT, m_i, l_i, acc, d,
                                       D=D, BLOCK_F=BLOCK_T, HAS_MASK=HAS_MASK, DOT=True)
    S1 = NSPLIT + 1
    out = (qrow * S1 + pid_s)
    tl.store(o_ptr + out[:, None] * D + d[None, :], acc, mask=h_ok[:, None])
    tl.store(ml_ptr + out * 2, m_i, mask=h_ok)
    tl.store(ml_ptr + out * 2 + 1, l_i, mask=h_ok)


@triton.jit
def _codes_f16(words, ROWS: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr):
    """(ROWS, N * BITS / 32) int32 words -> (ROWS, N) fp16 codes, exact (codes < 1024): the
    code ORed into 1024.0's bits, less 1024 (no int->float conversion, a quarter-rate op)."""
    c = _unpack(words, ROWS, N, BITS)
    return (c | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def _tile_bytes(c_ptr, row0, tt, W: tl.constexpr):
    """(BLOCK_T, 4 W) uint8: the bytes of rows row0 + tt of a (.., W) int32 code plane."""
    b_ptr = c_ptr.to(tl.pointer_type(tl.uint8))
    return tl.load(b_ptr + (row0 + tt)[:, None] * (4 * W) + tl.arange(0, 4 * W)[None, :])


@triton.jit
def _asm_affine(x, ROWS: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr):
    """(ROWS, N * BITS / 8) uint8 -> (ROWS, N) fp16 exact codes, inline PTX (prmt.KV_AFFINE*)."""
    if BITS == 4:
        lo, hi = tl.inline_asm_elementwise(_AFF4, _AFF4_C, [x], dtype=(tl.float16, tl.float16), is_pure=True,
                                           pack=4)
        return tl.reshape(tl.join(lo, hi), (ROWS, N))
    else:
        return tl.inline_asm_elementwise(_AFF8, _AFF8_C, [x], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _asm_table4(x, regs_ptr, ROWS: tl.constexpr, N: tl.constexpr):
    """(ROWS, N / 2) uint8 of 4-bit codes -> (ROWS, N) fp16 table values, looked up in 8 registers
    (prmt.KV_TABLE4)."""
    z = tl.zeros(x.shape, dtype=tl.int32)
    lo, hi = tl.inline_asm_elementwise(
        _TAB4, _TAB4_C,
        [x, tl.load(regs_ptr) + z, tl.load(regs_ptr + 1) + z, tl.load(regs_ptr + 2) + z, tl.load(regs_ptr + 3) + z,
         tl.load(regs_ptr + 4) + z, tl.load(regs_ptr + 5) + z, tl.load(regs_ptr + 6) + z, tl.load(regs_ptr + 7) + z],
        dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    return tl.reshape(tl.join(lo, hi), (ROWS, N))


@triton.jit
def _phase_pick(x, ROWS: tl.constexpr, R: tl.constexpr, J: tl.constexpr):
    """(ROWS, R * J) -> (ROWS, R): row (h, j) keeps its own phase, column r J + j."""
    x3 = tl.reshape(x, (ROWS, R, J))
    pick = (tl.arange(0, ROWS) % J)[:, None, None] == tl.arange(0, J)[None, None, :]
    return tl.sum(tl.where(pick, x3, tl.zeros_like(x3)), 2)


@triton.jit
def _phase_spread(x, ROWS: tl.constexpr, R: tl.constexpr, J: tl.constexpr):
    """(ROWS, R) -> (ROWS, R * J): row (h, j)'s value r goes to column r J + j, zeros elsewhere."""
    x3 = tl.broadcast_to(tl.reshape(x, (ROWS, R, 1)), (ROWS, R, J))
    pick = (tl.arange(0, ROWS) % J)[:, None, None] == tl.arange(0, J)[None, None, :]
    return tl.reshape(tl.where(pick, x3, tl.zeros_like(x3)), (ROWS, R * J))


@triton.jit
def _rows_of(x, BLOCK_H: tl.constexpr, J: tl.constexpr):
    """(BLOCK_H,) -> (BLOCK_H * J,): each head's value on its J phase rows."""
    return tl.reshape(tl.broadcast_to(x[:, None], (BLOCK_H, J)), (BLOCK_H * J,))


@triton.jit
def _rows_of2(x, BLOCK_H: tl.constexpr, J: tl.constexpr, D: tl.constexpr):
    """(BLOCK_H, D) -> (BLOCK_H * J, D): each head's row on its J phase rows."""
    return tl.reshape(tl.broadcast_to(tl.reshape(x, (BLOCK_H, 1, D)), (BLOCK_H, J, D)), (BLOCK_H * J, D))


@triton.jit
def _kv_fold_kernel(q_ptr, kc_ptr, ks_ptr, kz_ptr, koff_ptr, vc_ptr, vs_ptr, vz_ptr, vlut_ptr, vregs_ptr,
                    table_ptr, fk_ptr, fv_ptr, o_ptr, ml_ptr, mask_ptr,
                    H, QH, Q, P, COLS, SKIP, F, TPS, NSPLIT, MT, qk_scale,
                    k_alpha, k_beta, v_alpha, v_beta,
                    G: tl.constexpr, D: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr,
                    K_BASE: tl.constexpr, V_ZERO: tl.constexpr, V_AFFINE: tl.constexpr,
                    HAS_MASK: tl.constexpr, BLOCK_H: tl.constexpr, J: tl.constexpr, BLOCK_T: tl.constexpr,
                    K_ASM: tl.constexpr, V_ASM: tl.constexpr):
    """Decode attention with the query heads of a KV head folded with J token phases into the
    BLOCK_H * J (>= 16) rows of the tensor-core tile: row (h, j) attends to the tokens t of
    the split with t mod J == j (its own online softmax), a tile of BLOCK_T tokens is read as
    BLOCK_T / J rows of J tokens side by side, keys meet the block-diagonal fold of q * r in
    one dot, values the probabilities in one dot (each row keeps the block of its phase); the
    rows of a head merge at the end like splits. Affine keys only (the key codes are exact
    fp16 integers; the cache's keys are uniform at every width)."""
    ROWS: tl.constexpr = BLOCK_H * J
    R: tl.constexpr = BLOCK_T // J
    WK: tl.constexpr = D * KB // 32
    WV: tl.constexpr = D * VB // 32
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    i = tl.arange(0, BLOCK_H)
    h_ok = i < QH
    d = tl.arange(0, D)
    qrow = (b * H * QH + h * QH + i)
    q = tl.load(q_ptr + qrow[:, None] * D + d[None, :], mask=h_ok[:, None], other=0.0).to(tl.float32)
    q = q * qk_scale
    S1 = NSPLIT + 1
    out = qrow * S1 + pid_s
    if pid_s < NSPLIT:
        phase = tl.arange(0, ROWS) % J
        rr = tl.arange(0, R)
        tt = tl.arange(0, BLOCK_T)
        m_i = tl.full((ROWS,), float("-inf"), tl.float32)
        l_i = tl.zeros((ROWS,), tl.float32)
        acc = tl.zeros((ROWS, D), tl.float32)
        GP = P // G
        start = pid_s * TPS                      # TPS: a multiple of G
        end = tl.minimum(start + TPS, Q)
        for g0 in range(start, end, G):
            page = tl.load(table_ptr + b * COLS + g0 // P).to(tl.int64)
            base = page * H + h
            grow = base * GP + (g0 % P) // G
            # keys: q . (m + r (alpha c + beta)) = alpha (q r) . c + [q . (beta r + m)], per group
            r = tl.load(ks_ptr + grow * D + d).to(tl.float32)
            kb = k_beta * r
            if K_BASE == 1:                      # zero point per (group, channel)
                kb += tl.load(kz_ptr + grow * D + d).to(tl.float32)
            if K_BASE == 2:                      # fixed offset per channel
                kb += tl.load(koff_ptr + pid_bh * D + d).to(tl.float32)
            bias = _rows_of(tl.sum(q * kb[None, :], 1), BLOCK_H, J)
            qd = _rows_of2((q * r[None, :]).to(tl.float16), BLOCK_H, J, D)
            for t0 in range(g0, tl.minimum(g0 + G, end), BLOCK_T):
                slot = t0 % P
                tok = t0 + rr[None, :] * J + phase[:, None]          # (ROWS, R): row (h, j)'s tokens
                ok = (tok < end) & (tok >= SKIP)
                if HAS_MASK:
                    ok = ok & (tl.load(mask_ptr + b * MT + tok, mask=ok, other=0) != 0)
                if K_ASM:
                    kt = _asm_affine(_tile_bytes(kc_ptr, base * P + slot, tt, WK), BLOCK_T, D, KB)
                else:
                    kt = _codes_f16(tl.load(kc_ptr + (base * P + slot + tt)[:, None] * WK + tl.arange(0, WK)[None, :]),
                                    BLOCK_T, D, KB)
                s = tl.dot(qd, tl.trans(kt))                                         # (ROWS, BLOCK_T)
                s = _phase_pick(s, ROWS, R, J) * k_alpha + bias[:, None]
                s = tl.where(ok, s, float("-inf"))
                p, m_i, l_i, acc = _online(s, m_i, l_i, acc)
                pv = p * tl.load(vs_ptr + base * P + slot + (tok - t0), mask=ok, other=0.0).to(tl.float32)
                pv16 = _phase_spread(pv.to(tl.float16), ROWS, R, J)                  # (ROWS, BLOCK_T)
                if V_ASM:
                    vb = _tile_bytes(vc_ptr, base * P + slot, tt, WV)
                    vt = _asm_affine(vb, BLOCK_T, D, VB) if V_AFFINE else _asm_table4(vb, vregs_ptr, BLOCK_T, D)
                else:
                    vw = tl.load(vc_ptr + (base * P + slot + tt)[:, None] * WV + tl.arange(0, WV)[None, :])
                    if V_AFFINE:
                        vt = _codes_f16(vw, BLOCK_T, D, VB)
                    else:
                        vt = tl.load(vlut_ptr + _unpack(vw, BLOCK_T, D, VB)).to(tl.float16)
                if V_AFFINE:
                    acc += tl.dot(pv16, vt) * v_alpha + (v_beta * tl.sum(pv.to(tl.float16).to(tl.float32), 1))[:, None]
                else:
                    acc += tl.dot(pv16, vt)
                if V_ZERO:
                    vm = tl.load(vz_ptr + base * P + slot + (tok - t0), mask=ok, other=0.0).to(tl.float32)
                    acc += tl.sum(p * vm, 1)[:, None]
        # merge the J phase rows of each head, weighted like splits
        a3 = tl.reshape(acc, (BLOCK_H, J, D))
        m2 = tl.reshape(m_i, (BLOCK_H, J))
        l2 = tl.reshape(l_i, (BLOCK_H, J))
        mh = tl.max(m2, 1)
        w = tl.math.exp2(m2 - tl.where(mh == float("-inf"), 0.0, mh)[:, None])
        tl.store(o_ptr + out[:, None] * D + d[None, :], tl.sum(a3 * w[:, :, None], 1), mask=h_ok[:, None])
        tl.store(ml_ptr + out * 2, mh, mask=h_ok)
        tl.store(ml_ptr + out * 2 + 1, tl.sum(l2 * w, 1), mask=h_ok)
    else:
        m_f = tl.full((BLOCK_H,), float("-inf"), tl.float32)
        l_f = tl.zeros((BLOCK_H,), tl.float32)
        acc_f = tl.zeros((BLOCK_H, D), tl.float32)     # FMAs: BLOCK_H may be below 16
        m_f, l_f, acc_f = _float_segment(q, fk_ptr, fv_ptr, mask_ptr, pid_bh, b, F, SKIP, Q, MT, m_f, l_f, acc_f, d,
                                         D=D, BLOCK_F=16, HAS_MASK=HAS_MASK, DOT=False)
        tl.store(o_ptr + out[:, None] * D + d[None, :], acc_f, mask=h_ok[:, None])
        tl.store(ml_ptr + out * 2, m_f, mask=h_ok)
        tl.store(ml_ptr + out * 2 + 1, l_f, mask=h_ok)


@triton.jit
def _kv_combine_kernel(o_ptr, ml_ptr, out_ptr, S1, D: tl.constexpr, BLOCK_S: tl.constexpr):
    """out = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s over the splits of one query head."""
    row = tl.program_id(0)
    sp = tl.arange(0, BLOCK_S)
    ok = sp < S1
    d = tl.arange(0, D)
    m = tl.load(ml_ptr + (row * S1 + sp) * 2, mask=ok, other=float("-inf"))
    l_ = tl.load(ml_ptr + (row * S1 + sp) * 2 + 1, mask=ok, other=0.0)
    mx = tl.max(m, 0)
    w = tl.where(ok & (m > float("-inf")), tl.math.exp2(m - mx), 0.0)
    o = tl.load(o_ptr + (row * S1 + sp)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    num = tl.sum(o * w[:, None], 0)
    den = tl.sum(l_ * w, 0)
    tl.store(out_ptr + row * D + d, (num / den).to(out_ptr.dtype.element_ty))


def _split_outputs(q: torch.Tensor, S1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, query head, split): the unnormalised output (.., D) and its (max, sum) in fp32."""
    B, Hq, D = q.shape
    return (torch.empty(B, Hq, S1, D, dtype=torch.float32, device=q.device),
            torch.empty(B, Hq, S1, 2, dtype=torch.float32, device=q.device))


def _combine(q: torch.Tensor, o: torch.Tensor, ml: torch.Tensor) -> torch.Tensor:
    """The log-sum-exp merge of the splits -> (B, Hq, D) in q's dtype."""
    B, Hq, S1, D = o.shape
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    _kv_combine_kernel[(B * Hq,)](o, ml, out, S1, D=D, BLOCK_S=triton.next_power_of_2(S1), num_warps=1)
    return out


@triton.jit
def _rope_half(kc_ptr, ks_ptr, kz_ptr, koff_ptr, klut_ptr, base, slot, tt, ok, pid_bh, GP, P, k_alpha, k_beta,
               kc8_ptr, kidx_ptr, ksh_ptr, kmk_ptr, kfa_ptr, kfb_ptr, h,
               HALF: tl.constexpr, G: tl.constexpr, D: tl.constexpr, KB: tl.constexpr, K_BASE: tl.constexpr,
               K_AFFINE: tl.constexpr, BLOCK_T: tl.constexpr, MIXED: tl.constexpr, KW: tl.constexpr):
    """(BLOCK_T, D/2) float32 keys of channels HALF*D/2 .. (HALF+1)*D/2 - 1, decoded (pre-RoPE)."""
    W2: tl.constexpr = D * KB // 64
    c2 = HALF * (D // 2) + tl.arange(0, D // 2)
    if MIXED:                                    # a key plan: per-channel fields and levels
        code = _mixed_codes(kc8_ptr, base * P + slot + tt, ok, kidx_ptr, ksh_ptr, kmk_ptr, h, c2, D, KW)
        lvl = code.to(tl.float32) * tl.load(kfa_ptr + h * D + c2)[None, :] + tl.load(kfb_ptr + h * D + c2)[None, :]
    else:
        kw = tl.load(kc_ptr + (base * P + slot + tt)[:, None] * (D * KB // 32) + HALF * W2 + tl.arange(0, W2)[None, :],
                     mask=ok[:, None], other=0)
        code = _unpack(kw, BLOCK_T, D // 2, KB)
        if K_AFFINE:
            lvl = code.to(tl.float32) * k_alpha + k_beta
        else:
            lvl = tl.load(klut_ptr + code).to(tl.float32)
    x = lvl * tl.load(ks_ptr + (base * GP + slot // G) * D + c2).to(tl.float32)[None, :]
    if K_BASE == 1:
        x += tl.load(kz_ptr + (base * GP + slot // G) * D + c2).to(tl.float32)[None, :]
    if K_BASE == 2:
        x += tl.load(koff_ptr + pid_bh * D + c2).to(tl.float32)[None, :]
    return x


@triton.jit
def _rope_scores(q_ptr, kc_ptr, ks_ptr, kz_ptr, koff_ptr, klut_ptr, rope_ptr, qrow, h_ok, qk_scale,
                 base, slot, tt, t, ok, pid_bh, GP, P, k_alpha, k_beta,
                 kc8_ptr, kidx_ptr, ksh_ptr, kmk_ptr, kfa_ptr, kfb_ptr, h,
                 G: tl.constexpr, D: tl.constexpr, KB: tl.constexpr, K_BASE: tl.constexpr, K_AFFINE: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, MIXED: tl.constexpr, KW: tl.constexpr):
    """(BLOCK_H, BLOCK_T) scores of pre-RoPE keys: each half decoded, the pair (d, d + D/2) of
    token t turned by the angle t * f_d (float32, as kv/rope.py), then q . k per half."""
    c2 = tl.arange(0, D // 2)
    qa = tl.load(q_ptr + qrow[:, None] * D + c2[None, :], mask=h_ok[:, None], other=0.0).to(tl.float32) * qk_scale
    qb = tl.load(q_ptr + qrow[:, None] * D + D // 2 + c2[None, :], mask=h_ok[:, None], other=0.0).to(tl.float32) \
        * qk_scale
    a = _rope_half(kc_ptr, ks_ptr, kz_ptr, koff_ptr, klut_ptr, base, slot, tt, ok, pid_bh, GP, P, k_alpha, k_beta,
                   kc8_ptr, kidx_ptr, ksh_ptr, kmk_ptr, kfa_ptr, kfb_ptr, h,
                   0, G, D, KB, K_BASE, K_AFFINE, BLOCK_T, MIXED, KW)
    b = _rope_half(kc_ptr, ks_ptr, kz_ptr, koff_ptr, klut_ptr, base, slot, tt, ok, pid_bh, GP, P, k_alpha, k_beta,
                   kc8_ptr, kidx_ptr, ksh_ptr, kmk_ptr, kfa_ptr, kfb_ptr, h,
                   1, G, D, KB, K_BASE, K_AFFINE, BLOCK_T, MIXED, KW)
    ang = t.to(tl.float32)[:, None] * tl.load(rope_ptr + c2).to(tl.float32)[None, :]
    cs = tl.cos(ang)
    sn = tl.sin(ang)
    ra = (a * cs - b * sn).to(tl.float16)
    rb = (b * cs + a * sn).to(tl.float16)
    return tl.dot(qa.to(tl.float16), tl.trans(ra)) + tl.dot(qb.to(tl.float16), tl.trans(rb))


def splits_for(B: int, H: int, Q: int, block_t: int, device, per_sm: int = 2) -> int:
    """Splits of the page tokens: about `per_sm` programs per SM over B * H (row, head) pairs,
    each at least `block_t` tokens."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if torch.device(device).type == "cuda" else 8
    return max(1, min(-(-per_sm * sms // (B * H)), -(-Q // block_t)))


def kv_decode_attention(q: torch.Tensor, planes: tuple, table: torch.Tensor, n_tokens: int, skip: int,
                        k_base: torch.Tensor | None, k_lut: torch.Tensor, v_lut: torch.Tensor,
                        k_affine: tuple[float, float] | None, v_affine: tuple[float, float] | None,
                        k_bits: int, v_bits: int, group: int,
                        fk: torch.Tensor, fv: torch.Tensor, scale: float, splits: int | None = None,
                        mask: torch.Tensor | None = None, block_t: int | None = None, num_warps: int | None = None,
                        num_stages: int | None = None, magic: bool = True,
                        v_closed: float | None = None, fold: bool | None = None,
                        asm: bool | None = None, cuda: bool | None = None, minb: int | None = None,
                        rope: torch.Tensor | None = None, k_fields: tuple | None = None) -> torch.Tensor:
    """softmax(q K^T scale) V for one query token per row: q (B, Hq, D) -> (B, Hq, D) in q's dtype.

    K/V: tokens [0, n_tokens) of each row in the pages of `table` (B, columns) int32 (planes:
    the pool's k_codes, k_scale, k_zero, v_codes, v_scale, v_zero; None where absent), those
    below `skip` left out (their fp copies lead the float segment), then the float segment
    fk, fv (B, H, F, D). k_base (B, H, 1, D): the fixed key offset of keys without zero points.
    k_lut / v_lut: the codecs' decode tables (level = lut[code]); k_affine / v_affine: (alpha,
    beta) when every level is alpha * code + beta (kv.codec.affine_levels), so codes meet the
    tensor cores as they are, else None (a table lookup per code). mask (B, T) bool or None:
    which positions (pages then float tokens, T = n_tokens + F - skip) a row attends to.
    splits, block_t (tokens per tile, dividing the group), num_warps, num_stages: launch
    parameters (defaults: about two programs per SM; below 4 rows min(32, group) tokens and 4
    warps, from 4 rows min(64, group) and 8 warps: on the H200 (benchmarks/results/
    gpu_kv_attention.md) 64-token tiles with 4 warps ran 3.5-5x slower than either; Triton's
    stages). magic:
    uniform codes become fp16 by an OR with 1024.0's bits instead of an int->float conversion
    (the offset subtracted after the dot). v_closed: the values' qins curvature a when their
    table is codec.qins.qins_table(v_bits, a) (no zero point): levels computed with one fast
    division instead of a table lookup per code (within 1 ulp of the table); it runs on the first
    kernel. fold: the folded kernel (None: for affine keys and groups of 16 tokens or more).
    asm: its inline-PTX decode (None: affine codes, and the 4-bit value table from 4 rows; never
    under the interpreter). cuda: the CUDA kernel (kernels/cuda_kv.py; None: wherever it runs and
    takes the shape, with no mask and no v_closed; True: it or a clear error; False: Triton); minb:
    its register fit (cuda_kv.MIN_BLOCKS). rope (D/2,) float32 on q's device or None: the pages
    hold pre-RoPE keys (kv/rope.py), turned by t * rope in the first kernel (no fold, no CUDA).
    k_fields (idx, shift, mask, alpha, beta), each (H, D) on q's device (int32 x 3, float32 x 2), or
    None: the keys follow a key plan (kv/plan.py; kv.layout.RowLayout.kernel_fields): channel d of head h is the field
    (byte idx >> shift) & mask of its row (kc's last dim words, RowLayout.mixed) and decodes to
    m + r (alpha c + beta) with the group's zero point m and half-range r; read in the first kernel
    (no fold, no CUDA)."""
    B, Hq, D = q.shape
    kc, ks, kz, vc, vs, vz = planes
    H = kc.shape[1]
    if Hq % H or D < 32 or D & (D - 1) or (k_fields is None and k_bits not in (2, 4, 8)) or v_bits not in (2, 4, 8):
        raise ValueError(f"kv_decode_attention takes Hq a multiple of H, a power-of-two D >= 32 and 2/4/8 bits; "
                         f"got Hq={Hq}, H={H}, D={D}, k{k_bits}v{v_bits}")
    QH = Hq // H
    P = kc.shape[2]
    ka, va = k_affine, v_affine
    fk, fv = fk.contiguous(), fv.contiguous()
    q = q.contiguous()
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != (B, n_tokens + fk.shape[2] - skip):
            raise ValueError(f"mask must be (B, T) bool with T = {n_tokens + fk.shape[2] - skip}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        mask = mask.contiguous().view(torch.uint8)
    k_mode = 1 if kz is not None else 2 if k_base is not None else 0
    if rope is not None and (rope.shape != (D // 2,) or rope.device != q.device):
        raise ValueError(f"rope must be ({D // 2},) frequencies on {q.device}, got {tuple(rope.shape)} on {rope.device}")
    if k_fields is not None:
        if kz is None:
            raise ValueError("a key plan's pages (k_fields) have key zero points; kz is None")
        if len(k_fields) != 5 or any(f.shape != (H, D) or f.device != q.device for f in k_fields) \
                or [f.dtype for f in k_fields] != [torch.int32] * 3 + [torch.float32] * 2:
            raise ValueError(f"k_fields must be (idx, shift, mask) int32 and (alpha, beta) float32, each ({H}, {D}) "
                             f"on {q.device} (RowLayout.kernel_fields)")
    if cuda is not False:
        why = cuda_reason(q, fk, k_base, mask, v_closed, QH, k_bits, v_bits, group, ka, va, rope, k_fields)
        if why is None:
            if splits is None:
                splits = splits_for(B, H, n_tokens, CUDA_SPLIT_TOKENS, q.device, per_sm=CUDA_PER_SM)
            return _cuda_kv.decode(q, planes, table, n_tokens, skip, k_base, v_lut, ka, va, k_bits, v_bits, group,
                                   fk, fv, scale, splits, minb)
        if cuda:
            raise ValueError(f"cuda=True: {why}")
    if fold is None:
        fold = ka is not None and v_closed is None and group >= 16 and rope is None and k_fields is None
    if fold and rope is not None:
        raise ValueError("the folded kernel does not read pre-RoPE keys (rope)")
    if fold and k_fields is not None:
        raise ValueError("the folded kernel does not read a key plan's pages (k_fields)")
    if fold:
        if ka is None:
            raise ValueError("the folded kernel takes affine keys (k_affine)")
        return _fold_launch(q, planes, table, n_tokens, skip, k_base, v_lut, ka, va, k_bits, v_bits, group,
                            fk, fv, scale, splits, mask, block_t, num_warps, num_stages, k_mode,
                            asm=False if _interpreting() else asm)
    wide = B >= 4
    block_t = block_t or min(64 if wide else 32, group)
    num_warps = num_warps or (8 if wide else 4)
    if group % block_t:
        raise ValueError(f"block_t ({block_t}) must divide the key group ({group})")
    if splits is None:
        splits = splits_for(B, H, n_tokens, block_t, q.device)
    tps = -(-(-(-n_tokens // splits)) // block_t) * block_t if n_tokens else block_t
    S1 = splits + 1
    o, ml = _split_outputs(q, S1)
    _kv_decode_kernel[(B * H, S1)](
        q, kc, ks, kz if kz is not None else ks, k_base.contiguous() if k_base is not None else ks, vc, vs,
        vz if vz is not None else vs, k_lut, v_lut, table, fk, fv, o, ml, mask if mask is not None else table,
        rope if rope is not None else ks,
        kc.view(torch.uint8) if k_fields is not None else kc, *(k_fields if k_fields is not None else (ks,) * 5),
        H, QH, n_tokens, P, table.shape[1], skip, fk.shape[2], tps, splits,
        mask.shape[1] if mask is not None else 0, scale * 1.4426950408889634,
        ka[0] if ka else 1.0, ka[1] if ka else 0.0, va[0] if va else 1.0, va[1] if va else 0.0,
        float(v_closed or 0.0),
        G=group, D=D, KB=k_bits, VB=v_bits, K_BASE=k_mode, K_AFFINE=ka is not None, V_ZERO=vz is not None,
        V_AFFINE=va is not None, HAS_MASK=mask is not None, MAGIC=magic,
        V_CLOSED=va is None and v_closed is not None, BLOCK_H=max(16, triton.next_power_of_2(QH)),
        BLOCK_T=block_t, ROPE=rope is not None, MIXED=k_fields is not None, KW=kc.shape[3], num_warps=num_warps,
        **({} if num_stages is None else dict(num_stages=num_stages)))
    return _combine(q, o, ml)


CUDA_PER_SM = 4              # programs per SM the CUDA kernel's splits aim at (H200, kv_cuda_probe: half of 8
                             # was faster at batch 1 and 8, 4k and 32k tokens)
CUDA_SPLIT_TOKENS = 64       # fewest page tokens per split (16 per warp)


def cuda_reason(q, fk, k_base, mask, v_closed, qh, k_bits, v_bits, group, ka, va, rope=None,
                k_fields=None) -> str | None:
    """None when kv_decode_attention(cuda=None) runs this call on the CUDA kernel, else why not."""
    if rope is not None:
        return "pre-RoPE keys are read by the Triton kernel"
    if k_fields is not None:
        return "a key plan's pages are read by the Triton kernel"
    if mask is not None:
        return "a key padding mask is read by the Triton kernel"
    if v_closed is not None:
        return "v_closed is a Triton variant"
    if _interpreting():
        return "TRITON_INTERPRET=1 runs the Triton kernels"
    refused = cuda_refused()
    if refused:
        return refused
    dtypes = (q.dtype, fk.dtype) + ((k_base.dtype,) if k_base is not None else ())
    return (_cuda_kv.why_not(q.device)
            or _cuda_kv.unsupported(q.shape[2], qh, k_bits, v_bits, group, ka, va, dtypes))


def fold_shape(qh: int, group: int) -> tuple[int, int]:
    """(BLOCK_H, J) of the folded kernel: J token phases per head (a power of two, at most
    16 / heads, dividing the group with at least 16 tokens per phase) and the heads padded so
    that BLOCK_H * J >= 16 rows reach the tensor cores."""
    qp = triton.next_power_of_2(qh)
    j = 1
    while j * 2 * qp <= 16 and group % (j * 2) == 0 and j * 2 <= group // 16:
        j *= 2
    return max(qp, 16 // j), j


def _fold_launch(q, planes, table, n_tokens, skip, k_base, v_lut, ka, va, k_bits, v_bits, group, fk, fv, scale,
                 splits, mask, block_t, num_warps, num_stages, k_mode, asm):
    B, Hq, D = q.shape
    kc, ks, kz, vc, vs, vz = planes
    H = kc.shape[1]
    QH = Hq // H
    P = kc.shape[2]
    block_h, j = fold_shape(QH, group)
    wide = B >= 4
    block_t = block_t or min(64, group)
    if group % block_t or block_t % j or block_t < 16:
        raise ValueError(f"block_t ({block_t}) must divide the key group ({group}), be a multiple of {j} and >= 16")
    if splits is None:
        splits = splits_for(B, H, n_tokens, group, q.device, per_sm=8 if wide else 2)
    tps = -(-(-(-n_tokens // splits)) // group) * group if n_tokens else group
    S1 = splits + 1
    o, ml = _split_outputs(q, S1)
    # 4 warps; 2 stages below 4 rows (H200: faster than Triton's default at batch 1 in 13 of 15
    # cases, benchmarks/results/gpu_kv_attention.md)
    opts = dict(num_warps=num_warps or 4)
    if num_stages is not None or not wide:
        opts["num_stages"] = num_stages or 2
    # inline PTX decode (off under the interpreter): affine codes always; the 4-bit value table
    # from 4 rows up (H200, benchmarks/results/gpu_kv_attention.md: it lost at batch 1). 4-bit
    # codes need tiles of 32 tokens or more: on the H200 16-token tiles came out wrong (relative
    # error 1.3-1.9, cause not established; 32 and 64 matched), so those take the plain decode.
    ok4 = block_t >= 32
    k_asm = asm is not False and (k_bits == 8 or (k_bits == 4 and ok4))
    if va is not None:
        v_asm = asm is not False and (v_bits == 8 or (v_bits == 4 and ok4))
    else:
        v_asm = (wide if asm is None else asm) and v_bits == 4 and ok4
    vregs = _prmt.cached_registers(v_lut, torch.float16) if v_asm and va is None else table
    _kv_fold_kernel[(B * H, S1)](
        q, kc, ks, kz if kz is not None else ks, k_base.contiguous() if k_base is not None else ks, vc, vs,
        vz if vz is not None else vs, v_lut, vregs, table, fk, fv, o, ml, mask if mask is not None else table,
        H, QH, n_tokens, P, table.shape[1], skip, fk.shape[2], tps, splits,
        mask.shape[1] if mask is not None else 0, scale * 1.4426950408889634,
        ka[0], ka[1], va[0] if va else 1.0, va[1] if va else 0.0,
        G=group, D=D, KB=k_bits, VB=v_bits, K_BASE=k_mode, V_ZERO=vz is not None, V_AFFINE=va is not None,
        HAS_MASK=mask is not None, BLOCK_H=block_h, J=j, BLOCK_T=block_t, K_ASM=k_asm, V_ASM=v_asm, **opts)
    return _combine(q, o, ml)
