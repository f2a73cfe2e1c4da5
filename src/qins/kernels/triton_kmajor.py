"""Skinny y = x W^T (+ b) over codes read along K: tiles of (BK codes, BN outputs).

Any width, either storage order of the packed (N, W) codes (codec/packing.py): the kernel
takes the strides, so a row-major tensor works and a K-major one (the same words, stored as
the transpose of an (W, N) contiguous tensor, weights/linear.py does this on CUDA) reads
each code row as one coalesced run of BN words across the threads. Element (k, n) of a tile
is code k of output n: plane 0 holds bits [0, W0) in word k // (32 / W0) at bit
(k mod 32 / W0) * W0; plane 1 (two-plane widths) the bits above, from word PLANE1 + ....
x is indexed by k only, so it broadcasts over the outputs with no layout change.

Each step covers BK codes of one group: the tile's values (table[code] or the QINS closed
form) meet x, and the group's scale (and offset times sum x) multiply the step's partial
sum once. BLOCK_M == 1 reduces on the CUDA cores; BLOCK_M >= 16 feeds one tl.dot per step
with the decoded tile in x's dtype (batch 2..16; above that, tiles of rows on a third program
axis). Split-K programs add fp32 partials with atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..codec.packing import padded_length, planes
from . import _interpreting
from .prmt import registers_table
from .triton_qlinear import _epilogue, _finish, _output, _prmt_decode, _prmt_regs


@triton.jit
def _codes(qw_ptr, kk, cols, ok, stride_qn, stride_qw, PLANE1,
           W0: tl.constexpr, W1: tl.constexpr):
    """(BK, BN) int32 codes k of outputs `cols`."""
    P0: tl.constexpr = 32 // W0
    base = qw_ptr + cols[None, :] * stride_qn
    w = tl.load(base + (kk // P0)[:, None] * stride_qw, mask=ok, other=0)
    c = (w >> ((kk % P0) * W0)[:, None]) & ((1 << W0) - 1)
    if W1 != 0:
        P1: tl.constexpr = 32 // W1
        w1 = tl.load(base + (PLANE1 + kk // P1)[:, None] * stride_qw, mask=ok, other=0)
        c = c | (((w1 >> ((kk % P1) * W1)[:, None]) & ((1 << W1) - 1)) << W0)
    return c


@triton.jit
def _values(c, tab_ptr, a_ptr, cols, col_ok, TS: tl.constexpr, MODE: tl.constexpr,
            PER_ROW: tl.constexpr):
    """(BK, BN) float32 normalized values (before the group scale)."""
    if MODE == 0:                                                   # table[code]
        if PER_ROW:
            return tl.load(tab_ptr + cols[None, :] * TS + c)
        return tl.load(tab_ptr + c)
    # QINS closed form: j = code - (N - 1), value j / (N (1 + a) - a |j|), N = TS / 2
    if PER_ROW:
        a = tl.load(a_ptr + cols, mask=col_ok, other=0.0)[None, :]
    else:
        a = tl.load(a_ptr)
    # code -> float by the exponent trick (2^23 + c as a float's bits, less 2^23): no I2F
    j = (c | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + (TS // 2 - 1))
    return tl.fdiv(j, (TS // 2) * (1.0 + a) - a * tl.abs(j))


@triton.jit
def _step(qw_ptr, tab_ptr, a_ptr, k0, ks, cols, col_ok, K, stride_qn, stride_qw, PLANE1,
          W0: tl.constexpr, W1: tl.constexpr, TS: tl.constexpr, MODE: tl.constexpr,
          PER_ROW: tl.constexpr):
    """Columns kk = k0 + ks of the step, their mask, and the (BK, BN) decoded values."""
    kk = k0 + ks
    k_ok = kk < K
    c = _codes(qw_ptr, kk, cols, k_ok[:, None] & col_ok[None, :], stride_qn, stride_qw, PLANE1, W0, W1)
    return kk, k_ok, _values(c, tab_ptr, a_ptr, cols, col_ok, TS, MODE, PER_ROW)


@triton.jit
def _kgemv_kernel(x_ptr, qw_ptr, s_ptr, m_ptr, tab_ptr, a_ptr, bias_ptr, y_ptr,
                  M, N, K, PLANE1, G, GS, STEPS, stride_xm, stride_ym,
                  stride_qn, stride_qw, stride_sn, stride_sg,
                  W0: tl.constexpr, W1: tl.constexpr, TS: tl.constexpr, MODE: tl.constexpr,
                  PER_ROW: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_OFFSET: tl.constexpr,
                  HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BK: tl.constexpr,
                  BN: tl.constexpr, SPLIT_K: tl.constexpr, IEEE: tl.constexpr,
                  ACC2D: tl.constexpr = False):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < N
    ks = tl.arange(0, BK)
    ms = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)      # rows of x (tiles over M)
    m_ok = ms < M
    if BLOCK_M == 1 and ACC2D:
        acc2 = tl.zeros((BK, BN), dtype=tl.float32)
        acc = tl.zeros((BN,), dtype=tl.float32)
    elif BLOCK_M == 1:
        acc = tl.zeros((BN,), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
    if BLOCK_M == 1 and ACC2D and not HAS_OFFSET:
        # no reduction per step: (BK, BN) partial products, reduced once after the loop
        for step in range(STEPS):
            k0 = (pid_k * STEPS + step) * BK
            kk, k_ok, v = _step(qw_ptr, tab_ptr, a_ptr, k0, ks, cols, col_ok, K, stride_qn, stride_qw,
                                PLANE1, W0, W1, TS, MODE, PER_ROW)
            xv = tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            prod = xv[:, None] * v
            if HAS_SCALE:
                g = tl.minimum(k0 // GS, G - 1)
                s = tl.load(s_ptr + cols * stride_sn + g * stride_sg, mask=col_ok, other=0.0)
                prod = prod * s.to(tl.float32)[None, :]
            acc2 += prod
    else:
        for step in range(STEPS):
            k0 = (pid_k * STEPS + step) * BK
            kk, k_ok, v = _step(qw_ptr, tab_ptr, a_ptr, k0, ks, cols, col_ok, K, stride_qn, stride_qw,
                                PLANE1, W0, W1, TS, MODE, PER_ROW)
            if BLOCK_M == 1:
                xv = tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
                part = tl.sum(xv[:, None] * v, axis=0)                        # (BN,)
                if HAS_OFFSET:
                    xs = tl.sum(xv, axis=0)
            else:
                xt = tl.load(x_ptr + ms[:, None] * stride_xm + kk[None, :],
                             mask=m_ok[:, None] & k_ok[None, :], other=0.0)    # (BLOCK_M, BK)
                if IEEE:
                    part = tl.dot(xt, v.to(xt.dtype), input_precision="ieee")
                else:
                    part = tl.dot(xt, v.to(xt.dtype))                         # (BLOCK_M, BN)
                if HAS_OFFSET:
                    xs = tl.sum(xt.to(tl.float32), axis=1)[:, None]
            if HAS_SCALE:
                g = tl.minimum(k0 // GS, G - 1)
                s = tl.load(s_ptr + cols * stride_sn + g * stride_sg, mask=col_ok, other=0.0)
                if BLOCK_M == 1:
                    part = part * s.to(tl.float32)
                else:
                    part = part * s.to(tl.float32)[None, :]
                if HAS_OFFSET:
                    m = tl.load(m_ptr + cols * stride_sn + g * stride_sg, mask=col_ok, other=0.0)
                    if BLOCK_M == 1:
                        part += xs * m.to(tl.float32)
                    else:
                        part += xs * m.to(tl.float32)[None, :]
            acc += part
    if BLOCK_M == 1 and ACC2D and not HAS_OFFSET:
        acc += tl.sum(acc2, axis=0)
    if BLOCK_M == 1:
        out = acc[None, :]
        ok = col_ok[None, :]
        y_ptrs = y_ptr + cols[None, :]
    else:
        out = acc
        ok = m_ok[:, None] & col_ok[None, :]
        y_ptrs = y_ptr + ms[:, None] * stride_ym + cols[None, :]
    _epilogue(y_ptrs, out, ok, bias_ptr, cols, col_ok, HAS_BIAS, SPLIT_K)


@triton.jit
def _kprmt_kernel(x_ptr, qw_ptr, s_ptr, m_ptr, tab_ptr, bias_ptr, y_ptr, N, K, G, GS, STEPS,
                  stride_qn, stride_qw, stride_sn, stride_sg, HAS_OFFSET: tl.constexpr,
                  HAS_BIAS: tl.constexpr, BKW: tl.constexpr, BN: tl.constexpr,
                  SPLIT_K: tl.constexpr):
    """Batch 1, 4-bit codes with one table per tensor: a (BKW words, BN outputs) tile decoded
    by byte permutes against the table held in 8 registers (kernels/prmt.py), 8 codes per
    word; code i of word w meets x[8 w + i]."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < N
    wi0 = tl.arange(0, BKW)
    r0, r1, r2, r3, r4, r5, r6, r7 = _prmt_regs(tab_ptr)
    acc2 = tl.zeros((BKW, BN), dtype=tl.float32)
    for step in range(STEPS):
        w0 = (pid_k * STEPS + step) * BKW
        wi = w0 + wi0
        k8 = wi * 8
        w_ok = k8 < K
        words = tl.load(qw_ptr + wi[:, None] * stride_qw + cols[None, :] * stride_qn,
                        mask=w_ok[:, None] & col_ok[None, :], other=0)
        v0, v1, v2, v3, v4, v5, v6, v7 = _prmt_decode(words, r0, r1, r2, r3, r4, r5, r6, r7)
        x0 = tl.load(x_ptr + k8, mask=w_ok, other=0.0).to(tl.float32)
        x1 = tl.load(x_ptr + k8 + 1, mask=k8 + 1 < K, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + k8 + 2, mask=k8 + 2 < K, other=0.0).to(tl.float32)
        x3 = tl.load(x_ptr + k8 + 3, mask=k8 + 3 < K, other=0.0).to(tl.float32)
        x4 = tl.load(x_ptr + k8 + 4, mask=k8 + 4 < K, other=0.0).to(tl.float32)
        x5 = tl.load(x_ptr + k8 + 5, mask=k8 + 5 < K, other=0.0).to(tl.float32)
        x6 = tl.load(x_ptr + k8 + 6, mask=k8 + 6 < K, other=0.0).to(tl.float32)
        x7 = tl.load(x_ptr + k8 + 7, mask=k8 + 7 < K, other=0.0).to(tl.float32)
        part = v0 * x0[:, None] + v1 * x1[:, None] + v2 * x2[:, None] + v3 * x3[:, None]
        part += v4 * x4[:, None] + v5 * x5[:, None] + v6 * x6[:, None] + v7 * x7[:, None]
        g = tl.minimum(w0 * 8 // GS, G - 1)
        s = tl.load(s_ptr + cols * stride_sn + g * stride_sg, mask=col_ok, other=0.0)
        acc2 += part * s.to(tl.float32)[None, :]
        if HAS_OFFSET:                                      # + m * (sum of the word's 8 x)
            m = tl.load(m_ptr + cols * stride_sn + g * stride_sg, mask=col_ok, other=0.0)
            xw = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7
            acc2 += xw[:, None] * m.to(tl.float32)[None, :]
    out = tl.sum(acc2, axis=0)[None, :]
    ok = col_ok[None, :]
    y_ptrs = y_ptr + cols[None, :]
    _epilogue(y_ptrs, out, ok, bias_ptr, cols, col_ok, HAS_BIAS, SPLIT_K)


def kprmt(x2, qweight, scales, offsets, regs, bias, group_size, in_features,
          config: dict | None = None) -> torch.Tensor:
    """Batch 1, 4 bits, scaled codes, one table per tensor given as its (1, 8) registers."""
    if x2.shape[0] != 1 or scales is None or regs.dtype != torch.int32:
        raise ValueError("kprmt takes one row of x, 4-bit scaled codes and the table's registers")
    _check_offsets(scales, offsets)
    K = in_features
    N = qweight.shape[0]
    G, gs = _groups(scales, group_size, K)
    cfg = dict(config or kprmt_config(N, K, gs))
    bk, bn, split = cfg.pop("BK"), cfg.pop("BN"), cfg.pop("SPLIT_K")
    cfg.pop("ACC2D", None)
    if gs % bk or bk % 8:
        raise ValueError(f"BK={bk} must be a multiple of 8 dividing the group size {gs}")
    steps, split = _steps(K, bk, split)
    y = _output(1, N, split, x2)
    _kprmt_kernel[(triton.cdiv(N, bn), split)](
        x2, qweight, scales, scales if offsets is None else offsets, regs,
        bias if bias is not None else qweight, y, N, K, G, gs, steps,
        qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        HAS_OFFSET=offsets is not None, HAS_BIAS=bias is not None, BKW=bk // 8, BN=bn, SPLIT_K=split, **cfg)
    return _finish(y, split, bias, x2.dtype)


def _groups(scales, group_size: int | None, k: int) -> tuple[int, int]:
    """(G, codes per group) of scales (N, G): a single group spans the padded row."""
    G = 1 if scales is None else scales.shape[1]
    return G, (group_size if G > 1 else padded_length(k))


def _steps(k: int, step: int, split: int) -> tuple[int, int]:
    """(steps per program, programs along K) for `step` codes per step and about `split`
    programs; the split shrinks until every program has a step."""
    total = triton.cdiv(k, step)
    steps = triton.cdiv(total, split)
    return steps, triton.cdiv(total, steps)


def _check_offsets(scales, offsets) -> None:
    if offsets is not None and offsets.stride() != scales.stride():
        raise ValueError("scales and offsets must share one storage order")


def _pow2_split(steps_total: int, cap: int, min_steps: int) -> int:
    """The largest power of two <= cap that leaves each program >= min_steps steps."""
    split = 1
    while split * 2 <= cap and steps_total // (split * 2) >= min_steps:
        split *= 2
    return split


# Tiles measured on the H200 (benchmarks/results/gpu_skinny.md, 2026-12-04): the best of the
# sweep on the first shape, kept if it was best or within 0.07x of the best on the other two.
def kprmt_config(n: int, k: int, group_size: int = 64) -> dict:
    """kprmt: 256 outputs x 64 codes per step (fewer when the group is smaller), split-K to 32
    (1.22-1.35x cuBLAS bf16 against 1.08-1.15x for the 128-output tile it replaced)."""
    bk = 64 if group_size % 64 == 0 else 32                # groups are multiples of 32
    return dict(BK=bk, BN=256, SPLIT_K=_pow2_split(triton.cdiv(k, bk), 32, 2), num_warps=4)


def kgemv_config(m: int, n: int, k: int, bits: int, group_size: int, sms: int = 132) -> dict:
    """Tile and split of the K-major kernel; BK divides the group (one scale per step). Above
    16 rows: (128 rows, 64 outputs) tiles, no split (the best of benchmarks/gpu/prefill.py's
    sweep: 0.23-0.25x cuBLAS bf16 at batch 512, so ops.choose decodes then calls cuBLAS there)."""
    if m > 16:
        return dict(BK=min(64, group_size), BN=64, SPLIT_K=1, BLOCK_M=128, num_warps=8, num_stages=3)
    bk = min(64 if m == 1 else 32, group_size)
    bn = 128 if m == 1 else 64
    steps_total = triton.cdiv(k, bk)
    split = 1
    while triton.cdiv(n, bn) * split < 4 * sms and steps_total // (split * 2) >= 2:
        split *= 2
    return dict(BK=bk, BN=bn, SPLIT_K=split, num_warps=4)


def kgemv(x2, qweight, scales, offsets, table, curvature, bias, bits, group_size, in_features,
          mode="table", config: dict | None = None) -> torch.Tensor:
    """(M, K) x (M <= 16) times the decoded (N, K) weight -> (M, N) in x's dtype. `qweight`
    may be row-major or K-major (see the module docstring); scales and offsets likewise."""
    if mode not in ("table", "closed"):
        raise ValueError(f"the K-major kernel decodes by 'table' or 'closed', not {mode!r}")
    if mode == "closed" and curvature is None:
        raise ValueError("mode='closed' needs the qins curvature")
    M, K = x2.shape
    N = qweight.shape[0]
    widths = planes(bits)
    w0, w1 = widths[0], (widths[1] if len(widths) > 1 else 0)
    G, gs = _groups(scales, group_size, in_features)
    cfg = dict(config or kgemv_config(M, N, K, bits, gs))
    bk, bn, split = cfg.pop("BK"), cfg.pop("BN"), cfg.pop("SPLIT_K")
    bm = 1 if M == 1 else cfg.pop("BLOCK_M", 16)
    if gs % bk:
        raise ValueError(f"BK={bk} must divide the group size {gs}")
    steps, split = _steps(K, bk, split)
    per_row = (table.shape[0] > 1) if mode == "table" else (curvature.numel() > 1)
    y = _output(M, N, split, x2)
    dummy = qweight
    stride_sn, stride_sg = (scales.stride(0), scales.stride(1)) if scales is not None else (0, 0)
    _check_offsets(scales, offsets)
    grid = (triton.cdiv(N, bn), split, triton.cdiv(M, bm))
    _kgemv_kernel[grid](
        x2, qweight, dummy if scales is None else scales, dummy if offsets is None else offsets,
        table, dummy if curvature is None else curvature, bias if bias is not None else dummy, y,
        M, N, K, padded_length(in_features) * w0 // 32, G, gs, steps, x2.stride(0), y.stride(0),
        qweight.stride(0), qweight.stride(1), stride_sn, stride_sg,
        W0=w0, W1=w1, TS=2 ** bits, MODE=0 if mode == "table" else 1, PER_ROW=per_row,
        HAS_SCALE=scales is not None, HAS_OFFSET=offsets is not None, HAS_BIAS=bias is not None,
        BLOCK_M=bm, BK=bk, BN=bn, SPLIT_K=split,
        IEEE=x2.dtype == torch.float32, **cfg)
    return _finish(y, split, bias, x2.dtype)


@triton.jit
def _kbyte_kernel(x_ptr, qw_ptr, s_ptr, m_ptr, a_ptr, bias_ptr, y_ptr, N, K, G, GS, STEPS,
                  stride_qn, stride_qw, stride_sn, stride_sg, PER_ROW: tl.constexpr,
                  HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, BKW: tl.constexpr,
                  BN: tl.constexpr, SPLIT_K: tl.constexpr, ACC1D: tl.constexpr = False):
    """Batch 1, 8-bit qins codes by the closed form: a (BKW words, BN outputs) tile, 4 codes
    per word, code i of word w meets x[4 w + i] (the kprmt structure: x indexed by k only,
    each byte position a whole tile, no per-element shift amounts)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < N
    wi0 = tl.arange(0, BKW)
    if PER_ROW:
        a = tl.load(a_ptr + cols, mask=col_ok, other=0.0)[None, :]
    else:
        a = tl.load(a_ptr)
    den0 = 128.0 * (1.0 + a)                        # N (1 + a), N = 128
    acc2 = tl.zeros((BKW, BN), dtype=tl.float32)
    acc = tl.zeros((BN,), dtype=tl.float32)         # ACC1D: each step reduced over its words
    for step in range(STEPS):
        w0 = (pid_k * STEPS + step) * BKW
        wi = w0 + wi0
        k4 = wi * 4
        w_ok = k4 < K
        words = tl.load(qw_ptr + wi[:, None] * stride_qw + cols[None, :] * stride_qn,
                        mask=w_ok[:, None] & col_ok[None, :], other=0)
        part = tl.zeros((BKW, BN), dtype=tl.float32)
        xw = tl.zeros((BKW,), dtype=tl.float32)
        for i in tl.static_range(4):
            # byte i as a float's low mantissa bits: 2^23 + code, less 2^23 + N - 1 -> j
            c = ((words >> (8 * i)) & 0xFF) | 0x4B000000
            j = c.to(tl.float32, bitcast=True) - (8388608.0 + 127.0)
            xi = tl.load(x_ptr + k4 + i, mask=k4 + i < K, other=0.0).to(tl.float32)
            part += tl.fdiv(j * xi[:, None], den0 - a * tl.abs(j))
            if HAS_OFFSET:
                xw += xi
        g = tl.minimum(w0 * 4 // GS, G - 1)
        s = tl.load(s_ptr + cols * stride_sn + g * stride_sg, mask=col_ok, other=0.0)
        if ACC1D:
            acc += tl.sum(part, axis=0) * s.to(tl.float32)
        else:
            acc2 += part * s.to(tl.float32)[None, :]
        if HAS_OFFSET:                                      # + m * (sum of the word's 4 x)
            m = tl.load(m_ptr + cols * stride_sn + g * stride_sg, mask=col_ok, other=0.0)
            if ACC1D:
                acc += tl.sum(xw, axis=0) * m.to(tl.float32)
            else:
                acc2 += xw[:, None] * m.to(tl.float32)[None, :]
    if ACC1D:
        out = acc[None, :]
    else:
        out = tl.sum(acc2, axis=0)[None, :]
    ok = col_ok[None, :]
    y_ptrs = y_ptr + cols[None, :]
    _epilogue(y_ptrs, out, ok, bias_ptr, cols, col_ok, HAS_BIAS, SPLIT_K)


def kbyte_config(n: int, k: int, group_size: int) -> dict:
    """kbyte: 8 words (32 codes) x 512 outputs per step, 8 warps, split-K to 64 (0.67-0.70x
    cuBLAS bf16 on the three shapes; 16-word steps measured 0.53-0.56x)."""
    bkw = min(8, max(1, group_size // 4))
    return dict(BKW=bkw, BN=512, SPLIT_K=_pow2_split(triton.cdiv(k, 4 * bkw), 64, 2), num_warps=8)


def kbyte(x2, qweight, scales, offsets, curvature, bias, group_size, in_features,
          config: dict | None = None) -> torch.Tensor:
    """Batch 1, 8-bit qins codes (one plane), scaled, decoded by the closed form."""
    if x2.shape[0] != 1 or scales is None or curvature is None:
        raise ValueError("kbyte takes one row of x, 8-bit scaled codes and the qins curvature")
    _check_offsets(scales, offsets)
    K = in_features
    N = qweight.shape[0]
    G, gs = _groups(scales, group_size, K)
    cfg = dict(config or kbyte_config(N, K, gs))
    bkw, bn, split = cfg.pop("BKW"), cfg.pop("BN"), cfg.pop("SPLIT_K")
    if gs % (4 * bkw):
        raise ValueError(f"BKW={bkw} words of 4 codes must divide the group size {gs}")
    steps, split = _steps(K, 4 * bkw, split)
    y = _output(1, N, split, x2)
    _kbyte_kernel[(triton.cdiv(N, bn), split)](
        x2, qweight, scales, scales if offsets is None else offsets, curvature,
        bias if bias is not None else qweight, y, N, K, G, gs, steps,
        qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        PER_ROW=curvature.numel() > 1, HAS_OFFSET=offsets is not None, HAS_BIAS=bias is not None,
        BKW=bkw, BN=bn, SPLIT_K=split, **cfg)
    return _finish(y, split, bias, x2.dtype)


@triton.jit
def _kprmt_mm_kernel(x_ptr, qw_ptr, s_ptr, tab_ptr, ftab_ptr, bias_ptr, y_ptr, M, N, K, G, GS,
                     STEPS, stride_xm, stride_ym, stride_qn, stride_qw, stride_sn, stride_sg,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BKW: tl.constexpr,
                     BN: tl.constexpr, SPLIT_K: tl.constexpr, EMULATE: tl.constexpr):
    """Batch 2-16, 4-bit codes, one table, scales without offsets: the kprmt decode of a
    (BKW words, BN outputs) tile, its 8 code positions joined into one (8 BKW, BN) tile in k
    order (row 8 w + i = code i of word w), scaled, and one tl.dot against x's (BLOCK_M, 8 BKW)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < N
    ms = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)      # rows of x (tiles over M)
    m_ok = ms < M
    wi0 = tl.arange(0, BKW)
    ks0 = tl.arange(0, 8 * BKW)
    if not EMULATE:
        r0, r1, r2, r3, r4, r5, r6, r7 = _prmt_regs(tab_ptr)
    acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
    for step in range(STEPS):
        w0 = (pid_k * STEPS + step) * BKW
        wi = w0 + wi0
        words = tl.load(qw_ptr + wi[:, None] * stride_qw + cols[None, :] * stride_qn,
                        mask=(wi * 8 < K)[:, None] & col_ok[None, :], other=0)
        if EMULATE:
            v0 = tl.load(ftab_ptr + (words & 15))
            v1 = tl.load(ftab_ptr + ((words >> 4) & 15))
            v2 = tl.load(ftab_ptr + ((words >> 8) & 15))
            v3 = tl.load(ftab_ptr + ((words >> 12) & 15))
            v4 = tl.load(ftab_ptr + ((words >> 16) & 15))
            v5 = tl.load(ftab_ptr + ((words >> 20) & 15))
            v6 = tl.load(ftab_ptr + ((words >> 24) & 15))
            v7 = tl.load(ftab_ptr + ((words >> 28) & 15))
        else:
            v0, v1, v2, v3, v4, v5, v6, v7 = _prmt_decode(words, r0, r1, r2, r3, r4, r5, r6, r7)
        g = tl.minimum(w0 * 8 // GS, G - 1)
        s = tl.load(s_ptr + cols * stride_sn + g * stride_sg, mask=col_ok, other=0.0).to(tl.float32)
        # join's new axis is the last, so the innermost join picks bit 2 of the code position
        # and the outermost bit 0: (BKW, BN, 2, 2, 2) flattens to (BKW, BN, 8) in position order,
        # then (BKW, 8, BN) -> (8 BKW, BN)
        t = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
        t = tl.reshape(t, (BKW, BN, 8))
        t = tl.reshape(tl.permute(t, (0, 2, 1)), (8 * BKW, BN)) * s[None, :]
        kk = w0 * 8 + ks0
        xt = tl.load(x_ptr + ms[:, None] * stride_xm + kk[None, :],
                     mask=m_ok[:, None] & (kk < K)[None, :], other=0.0)
        acc += tl.dot(xt, t.to(xt.dtype))
    ok = m_ok[:, None] & col_ok[None, :]
    y_ptrs = y_ptr + ms[:, None] * stride_ym + cols[None, :]
    _epilogue(y_ptrs, acc, ok, bias_ptr, cols, col_ok, HAS_BIAS, SPLIT_K)


def kprmt_mm_config(n: int, k: int, group_size: int, m: int = 16) -> dict:
    """kprmt_mm: up to 16 rows, 32 outputs x 64 codes per step, split-K 4 (0.60-0.62x cuBLAS
    bf16 at batch 16; 64 outputs 0.49-0.52x); more rows: (256 rows, 64 outputs) tiles, no split,
    the best of benchmarks/gpu/prefill.py's sweep at batch 512 (0.39-0.52x cuBLAS bf16, slower
    than decode-then-cuBLAS's 0.67-0.69x, so ops.choose does not route rows above 16 here)."""
    bk = 64 if group_size % 64 == 0 else 32
    if m > 16:
        return dict(BK=bk, BN=64, SPLIT_K=1, BLOCK_M=256, num_warps=8, num_stages=3)
    return dict(BK=bk, BN=32, SPLIT_K=_pow2_split(triton.cdiv(k, bk), 4, 2), num_warps=4)


def kprmt_mm(x2, qweight, scales, regs, bias, group_size, in_features,
             config: dict | None = None) -> torch.Tensor:
    """Batch 2-16, 4-bit scaled codes without offsets, one table given as its (1, 8) registers."""
    M = x2.shape[0]
    if M < 1 or scales is None or regs.dtype != torch.int32:
        raise ValueError("kprmt_mm takes rows of x, 4-bit scaled codes and the table's registers")
    K = in_features
    N = qweight.shape[0]
    G, gs = _groups(scales, group_size, K)
    cfg = dict(config or kprmt_mm_config(N, K, gs, M))
    bk, bn, split = cfg.pop("BK"), cfg.pop("BN"), cfg.pop("SPLIT_K")
    bm = cfg.pop("BLOCK_M", 16)
    if gs % bk or bk % 16:
        raise ValueError(f"BK={bk} must be a multiple of 16 dividing the group size {gs}")
    steps, split = _steps(K, bk, split)
    y = _output(M, N, split, x2)
    emulate = _interpreting()
    ftab = registers_table(regs).reshape(16).contiguous() if emulate else regs
    _kprmt_mm_kernel[(triton.cdiv(N, bn), split, triton.cdiv(M, bm))](
        x2, qweight, scales, regs, ftab, bias if bias is not None else qweight, y, M, N, K, G, gs, steps,
        x2.stride(0), y.stride(0), qweight.stride(0), qweight.stride(1), scales.stride(0),
        scales.stride(1), HAS_BIAS=bias is not None, BLOCK_M=bm, BKW=bk // 8, BN=bn,
        SPLIT_K=split, EMULATE=emulate, **cfg)
    return _finish(y, split, bias, x2.dtype)
