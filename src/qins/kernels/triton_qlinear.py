"""Triton kernels for y = x W^T + b with W held as packed QINS codes (codec/packing.py layout).

Two kernels over the stored layout, no repacking:

    _qgemv_kernel     batch 1..16 (decode and skinny GEMM): each program owns BN output rows
                      and walks K in 32-code blocks; codes are decoded in registers
                      (table[code] * s + m), fp32 accumulation; batch 1 multiplies on the
                      CUDA cores, batch 2..16 feeds tl.dot with the decoded tile; split-K
                      adds partial sums with fp32 atomics.
    _dequant_kernel   any batch: decodes W once into x's dtype, then cuBLAS (prefill).

A 32-code block is the unit every width shares: a plane of width w holds one block in w words
(packing.py), so block b of a row starts at word b*w0 of plane 0 and b*w1 of plane 1. Codes of
one block are laid out as (R1, R2) = (w0, 32 // w0) for one plane, (1, 32) for two.

Decode modes (`mode`), chosen per format and width by measurement (benchmarks/gpu/qlinear.py):
    "table"   tl.load(table + code): any format, per-tensor or per-row tables.
    "closed"  qins only: level j = code - (N-1) decodes to j / (N (1 + a) - a |j|), one fast
              division and no memory read (qins.py's closed form, N = 2^(bits-1)).
    "prmt"    4 bits, one table per tensor, one-plane kernel only: the table lives in 8
              registers and byte permutes look codes up 4 at a time (kernels/prmt.py); values
              are the table's bf16 rounding. CUDA only: the interpreter runs no inline PTX.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..codec.packing import padded_length, planes
from . import prmt as _prmt

MODES = ("table", "closed", "prmt")
_PRMT_ASM = tl.constexpr(_prmt.ptx())
_PRMT_CONSTRAINTS = tl.constexpr(_prmt.CONSTRAINTS)


@triton.jit
def _load_codes(qw_ptr, rows, row_ok, blocks, blk_ok, sq_r, sq_w, PLANE1,
                W0: tl.constexpr, W1: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr):
    """(BN, NB, R1, R2) int32 codes of `rows` x 32-code `blocks` (word j of row r at
    r * sq_r + j * sq_w: row-major or K-major storage)."""
    base = qw_ptr + rows[:, None, None] * sq_r                               # (BN, 1, 1)
    ok = row_ok[:, None, None] & blk_ok[None, :, None]
    j0 = tl.arange(0, W0)
    words0 = tl.load(base + (blocks[None, :, None] * W0 + j0[None, None, :]) * sq_w, mask=ok, other=0)
    sh0 = tl.arange(0, 32 // W0) * W0
    c0 = (words0[:, :, :, None] >> sh0[None, None, None, :]) & ((1 << W0) - 1)  # (BN, NB, W0, 32/W0)
    if W1 != 0:
        j1 = tl.arange(0, W1)
        words1 = tl.load(base + (PLANE1 + blocks[None, :, None] * W1 + j1[None, None, :]) * sq_w,
                         mask=ok, other=0)
        sh1 = tl.arange(0, 32 // W1) * W1
        c1 = (words1[:, :, :, None] >> sh1[None, None, None, :]) & ((1 << W1) - 1)
        c0 = tl.reshape(c0, (c0.shape[0], c0.shape[1], R1, R2)) | (
            tl.reshape(c1, (c1.shape[0], c1.shape[1], R1, R2)) << W0)
    return c0


@triton.jit
def _decode(codes, tab_ptr, a_ptr, rows, row_ok, TS: tl.constexpr, MODE: tl.constexpr,
            TAB_PER_ROW: tl.constexpr):
    """(BN, NB, R1, R2) float32 normalized values of `codes` (before the group scale)."""
    if MODE == 0:                                                            # table
        if TAB_PER_ROW:
            return tl.load(tab_ptr + rows[:, None, None, None] * TS + codes)
        return tl.load(tab_ptr + codes)
    # closed form: j = code - (N - 1), value j / (N (1 + a) - a |j|), N = TS / 2
    if TAB_PER_ROW:
        a = tl.load(a_ptr + rows, mask=row_ok, other=0.0)[:, None, None, None]
    else:
        a = tl.load(a_ptr)
    j = codes.to(tl.float32) - (TS // 2 - 1)
    return tl.fdiv(j, (TS // 2) * (1.0 + a) - a * tl.abs(j))


@triton.jit
def _prmt_decode(words, r0, r1, r2, r3, r4, r5, r6, r7):
    """words (BN, NB, 4) int32 -> 8 float32 tensors (BN, NB, 4): code i of every word.
    r0..r7: the table's registers (L0..L3 H0..H3), loaded once per program."""
    z = tl.zeros(words.shape, dtype=tl.int32)
    o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
        _PRMT_ASM, _PRMT_CONSTRAINTS,
        [words, r0 + z, r1 + z, r2 + z, r3 + z, r4 + z, r5 + z, r6 + z, r7 + z],
        dtype=(tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32),
        is_pure=True, pack=1)
    return (o0.to(tl.float32, bitcast=True), o1.to(tl.float32, bitcast=True),
            o2.to(tl.float32, bitcast=True), o3.to(tl.float32, bitcast=True),
            o4.to(tl.float32, bitcast=True), o5.to(tl.float32, bitcast=True),
            o6.to(tl.float32, bitcast=True), o7.to(tl.float32, bitcast=True))


@triton.jit
def _prmt_regs(tab_ptr):
    return (tl.load(tab_ptr), tl.load(tab_ptr + 1), tl.load(tab_ptr + 2), tl.load(tab_ptr + 3),
            tl.load(tab_ptr + 4), tl.load(tab_ptr + 5), tl.load(tab_ptr + 6), tl.load(tab_ptr + 7))


@triton.jit
def _group_params(p_ptr, rows, row_ok, blocks, blk_ok, G, GS, ss_r, ss_g):
    """(BN, NB) float32 per-group parameter of each 32-code block (the last group takes the rest)."""
    g = tl.minimum(blocks * 32 // GS, G - 1)
    return tl.load(p_ptr + rows[:, None] * ss_r + g[None, :] * ss_g,
                   mask=row_ok[:, None] & blk_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _epilogue(y_ptrs, out, ok, bias_ptr, cols, col_ok, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Store an output tile: + bias and cast to y's dtype, or (split-K) an fp32 atomic add into
    the buffer `_finish` completes. out (rows, BN) fp32; cols (BN,) the output columns."""
    if SPLIT_K == 1:
        if HAS_BIAS:
            out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, out.to(y_ptrs.dtype.element_ty), mask=ok)
    else:
        tl.atomic_add(y_ptrs, out, mask=ok)


@triton.jit
def _qgemv_kernel(x_ptr, qw_ptr, s_ptr, m_ptr, tab_ptr, a_ptr, bias_ptr, y_ptr,
                  M, N, K, W, PLANE1, G, GS, NBLK, BLK_PER_SPLIT, stride_xm, stride_ym,
                  sq_r, sq_w, ss_r, ss_g,
                  W0: tl.constexpr, W1: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr,
                  TS: tl.constexpr, MODE: tl.constexpr, TAB_PER_ROW: tl.constexpr,
                  HAS_SCALE: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr,
                  SPLIT_K: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    row_ok = rows < N
    b_start = pid_k * BLK_PER_SPLIT                     # BLK_PER_SPLIT: a multiple of NB
    # column of element (block, r1, r2): block * 32 + r1 * R2 + r2
    k_in = tl.arange(0, R1)[:, None] * R2 + tl.arange(0, R2)[None, :]         # (R1, R2)
    if DOT:
        ms = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
    else:
        acc4 = tl.zeros((BN, NB, R1, R2), dtype=tl.float32)
    for b0 in range(b_start, b_start + BLK_PER_SPLIT, NB):
        blocks = b0 + tl.arange(0, NB)
        blk_ok = blocks < NBLK
        if HAS_SCALE:
            s = _group_params(s_ptr, rows, row_ok, blocks, blk_ok, G, GS, ss_r, ss_g)  # (BN, NB)
            if HAS_OFFSET:
                m = _group_params(m_ptr, rows, row_ok, blocks, blk_ok, G, GS, ss_r, ss_g)
        cols = blocks[:, None, None] * 32 + k_in[None, :, :]                  # (NB, R1, R2)
        col_ok = (cols < K) & blk_ok[:, None, None]
        codes = _load_codes(qw_ptr, rows, row_ok, blocks, blk_ok, sq_r, sq_w, PLANE1, W0, W1, R1, R2)
        vals = _decode(codes, tab_ptr, a_ptr, rows, row_ok, TS, MODE, TAB_PER_ROW)
        if HAS_SCALE:
            vals = vals * s[:, :, None, None]
            if HAS_OFFSET:
                vals = vals + m[:, :, None, None]
        if DOT:
            xt = tl.load(x_ptr + ms[:, None, None, None] * stride_xm + cols[None],
                         mask=(ms[:, None, None, None] < M) & col_ok[None], other=0.0)
            xt = tl.reshape(xt, (BLOCK_M, NB * 32))
            wt = tl.reshape(vals, (BN, NB * 32)).to(xt.dtype)             # rounded like the reference
            if IEEE:
                acc += tl.dot(xt, tl.trans(wt), input_precision="ieee")
            else:
                acc += tl.dot(xt, tl.trans(wt))
        else:
            xv = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            acc4 += vals * xv[None]
    if DOT:
        out = acc
        out_rows = ms[:, None]
        ok = (ms[:, None] < M) & row_ok[None, :]
        cols_out = rows[None, :]
    else:
        out = tl.sum(tl.sum(tl.sum(acc4, axis=3), axis=2), axis=1)[None, :]   # (1, BN)
        out_rows = tl.zeros((1, 1), dtype=tl.int32)
        ok = row_ok[None, :]
        cols_out = rows[None, :]
    y_ptrs = y_ptr + out_rows * stride_ym + cols_out
    _epilogue(y_ptrs, out, ok, bias_ptr, rows, row_ok, HAS_BIAS, SPLIT_K)


@triton.jit
def _dequant_kernel(qw_ptr, s_ptr, m_ptr, tab_ptr, a_ptr, out_ptr,
                    N, K, W, PLANE1, G, GS, NBLK, sq_r, sq_w, ss_r, ss_g,
                    W0: tl.constexpr, W1: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr,
                    TS: tl.constexpr, MODE: tl.constexpr, TAB_PER_ROW: tl.constexpr,
                    HAS_SCALE: tl.constexpr, HAS_OFFSET: tl.constexpr,
                    BN: tl.constexpr, NB: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    row_ok = rows < N
    blocks = tl.program_id(1) * NB + tl.arange(0, NB)
    blk_ok = blocks < NBLK
    codes = _load_codes(qw_ptr, rows, row_ok, blocks, blk_ok, sq_r, sq_w, PLANE1, W0, W1, R1, R2)
    vals = _decode(codes, tab_ptr, a_ptr, rows, row_ok, TS, MODE, TAB_PER_ROW)
    if HAS_SCALE:
        vals = vals * _group_params(s_ptr, rows, row_ok, blocks, blk_ok, G, GS, ss_r, ss_g)[:, :, None, None]
        if HAS_OFFSET:
            vals = vals + _group_params(m_ptr, rows, row_ok, blocks, blk_ok, G, GS, ss_r, ss_g)[:, :, None, None]
    # stored as (BN, NB * 32) rows: one-plane tiles kept as (BN, NB, w, 32 / w) stored 2.1x
    # slower than two-plane ones (benchmarks/results/gpu_qlinear.md, 4 vs 3 bits, unfused)
    vals = tl.reshape(vals, (BN, NB * 32))
    cols = tl.program_id(1) * NB * 32 + tl.arange(0, NB * 32)
    ok = row_ok[:, None] & (cols < K)[None, :]
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], vals.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _word_values(words, i: tl.constexpr, tab_ptr, a_ptr, rows, row_ok, W0: tl.constexpr,
                 TS: tl.constexpr, MODE: tl.constexpr, TAB_PER_ROW: tl.constexpr):
    """(BN, BKW) float32 normalized values of code i of every word (one plane of width W0)."""
    code = (words >> (i * W0)) & ((1 << W0) - 1)
    if MODE == 0:
        if TAB_PER_ROW:
            v = tl.load(tab_ptr + rows[:, None] * TS + code)
        else:
            v = tl.load(tab_ptr + code)
    else:
        if TAB_PER_ROW:
            a = tl.load(a_ptr + rows, mask=row_ok, other=0.0)[:, None]
        else:
            a = tl.load(a_ptr)
        j = code.to(tl.float32) - (TS // 2 - 1)
        v = tl.fdiv(j, (TS // 2) * (1.0 + a) - a * tl.abs(j))
    return v


@triton.jit
def _fma_word(part, v, x_ptr, cols, ok):
    """part (BN, BKW) += v * x[cols] for batch 1. (x read as a (1, BKW) tile instead made Triton
    lay the whole tile out along x and move every decoded value through shared memory.)"""
    return part + v * tl.load(x_ptr + cols, mask=ok, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _dot_word(acc, v, x_ptr, ms, m_ok, stride_xm, cols, ok, IEEE: tl.constexpr):
    """acc (BLOCK_M, BN) += x[:, cols] v^T: one tl.dot over this code position of BKW words."""
    xt = tl.load(x_ptr + ms[:, None] * stride_xm + cols[None, :], mask=m_ok[:, None] & ok[None, :],
                 other=0.0)
    if IEEE:
        return acc + tl.dot(xt, tl.trans(v.to(xt.dtype)), input_precision="ieee")
    return acc + tl.dot(xt, tl.trans(v.to(xt.dtype)))


@triton.jit
def _qmm_words_kernel(x_ptr, qw_ptr, s_ptr, m_ptr, tab_ptr, a_ptr, bias_ptr, y_ptr,
                      M, N, K, W, G, GS, WORDS_PER_SPLIT, stride_xm, stride_ym,
                      sq_r, sq_w, ss_r, ss_g, W0: tl.constexpr, TS: tl.constexpr, MODE: tl.constexpr,
                      TAB_PER_ROW: tl.constexpr, HAS_SCALE: tl.constexpr,
                      HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr,
                      SPLIT_K: tl.constexpr, IEEE: tl.constexpr):
    """One plane (2, 4, 8 bits): tiles of (BN rows, BKW words); code i of each word is decoded
    as a (BN, BKW) tensor and meets x at columns word * PW + i, so no tile is reshaped.
    BLOCK_M == 1: CUDA-core FMAs, the group scale once per word; else PW tl.dots per tile."""
    PW: tl.constexpr = 32 // W0                                                # codes per word
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    row_ok = rows < N
    w_start = tl.program_id(1) * WORDS_PER_SPLIT                               # a multiple of BKW
    ms = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = ms < M
    if BLOCK_M == 1:
        acc = tl.zeros((BN, BKW), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
    if MODE == 2:
        r0, r1, r2, r3, r4, r5, r6, r7 = _prmt_regs(tab_ptr)               # once per program
    for w0 in range(w_start, w_start + WORDS_PER_SPLIT, BKW):
        wi = w0 + tl.arange(0, BKW)
        w_ok = wi < W
        tile_ok = row_ok[:, None] & w_ok[None, :]
        words = tl.load(qw_ptr + rows[:, None] * sq_r + wi[None, :] * sq_w, mask=tile_ok, other=0)
        if HAS_SCALE:
            g = tl.minimum(wi * PW // GS, G - 1)
            s = tl.load(s_ptr + rows[:, None] * ss_r + g[None, :] * ss_g, mask=tile_ok, other=0.0).to(tl.float32)
            if HAS_OFFSET:
                m = tl.load(m_ptr + rows[:, None] * ss_r + g[None, :] * ss_g, mask=tile_ok,
                            other=0.0).to(tl.float32)
        col0 = wi * PW
        if BLOCK_M == 1:
            part = tl.zeros((BN, BKW), dtype=tl.float32)
            if MODE == 2:
                v0, v1, v2, v3, v4, v5, v6, v7 = _prmt_decode(words, r0, r1, r2, r3, r4, r5, r6, r7)
                part = _fma_word(part, v0, x_ptr, col0, w_ok & (col0 < K))
                part = _fma_word(part, v1, x_ptr, col0 + 1, w_ok & (col0 + 1 < K))
                part = _fma_word(part, v2, x_ptr, col0 + 2, w_ok & (col0 + 2 < K))
                part = _fma_word(part, v3, x_ptr, col0 + 3, w_ok & (col0 + 3 < K))
                part = _fma_word(part, v4, x_ptr, col0 + 4, w_ok & (col0 + 4 < K))
                part = _fma_word(part, v5, x_ptr, col0 + 5, w_ok & (col0 + 5 < K))
                part = _fma_word(part, v6, x_ptr, col0 + 6, w_ok & (col0 + 6 < K))
                part = _fma_word(part, v7, x_ptr, col0 + 7, w_ok & (col0 + 7 < K))
            else:
                for i in tl.static_range(PW):
                    v = _word_values(words, i, tab_ptr, a_ptr, rows, row_ok, W0, TS, MODE, TAB_PER_ROW)
                    part = _fma_word(part, v, x_ptr, col0 + i, w_ok & (col0 + i < K))
            if HAS_SCALE:
                part = part * s
                if HAS_OFFSET:
                    xs = tl.zeros((BKW,), dtype=tl.float32)
                    for i in tl.static_range(PW):
                        xs += tl.load(x_ptr + col0 + i, mask=w_ok & (col0 + i < K), other=0.0).to(tl.float32)
                    part += m * xs[None, :]
            acc += part
        else:
            if MODE == 2:
                v0, v1, v2, v3, v4, v5, v6, v7 = _prmt_decode(words, r0, r1, r2, r3, r4, r5, r6, r7)
                if HAS_SCALE:
                    v0, v1, v2, v3 = v0 * s, v1 * s, v2 * s, v3 * s
                    v4, v5, v6, v7 = v4 * s, v5 * s, v6 * s, v7 * s
                    if HAS_OFFSET:
                        v0, v1, v2, v3 = v0 + m, v1 + m, v2 + m, v3 + m
                        v4, v5, v6, v7 = v4 + m, v5 + m, v6 + m, v7 + m
                acc = _dot_word(acc, v0, x_ptr, ms, m_ok, stride_xm, col0, w_ok & (col0 < K), IEEE)
                acc = _dot_word(acc, v1, x_ptr, ms, m_ok, stride_xm, col0 + 1, w_ok & (col0 + 1 < K), IEEE)
                acc = _dot_word(acc, v2, x_ptr, ms, m_ok, stride_xm, col0 + 2, w_ok & (col0 + 2 < K), IEEE)
                acc = _dot_word(acc, v3, x_ptr, ms, m_ok, stride_xm, col0 + 3, w_ok & (col0 + 3 < K), IEEE)
                acc = _dot_word(acc, v4, x_ptr, ms, m_ok, stride_xm, col0 + 4, w_ok & (col0 + 4 < K), IEEE)
                acc = _dot_word(acc, v5, x_ptr, ms, m_ok, stride_xm, col0 + 5, w_ok & (col0 + 5 < K), IEEE)
                acc = _dot_word(acc, v6, x_ptr, ms, m_ok, stride_xm, col0 + 6, w_ok & (col0 + 6 < K), IEEE)
                acc = _dot_word(acc, v7, x_ptr, ms, m_ok, stride_xm, col0 + 7, w_ok & (col0 + 7 < K), IEEE)
            else:
                for i in tl.static_range(PW):
                    v = _word_values(words, i, tab_ptr, a_ptr, rows, row_ok, W0, TS, MODE, TAB_PER_ROW)
                    if HAS_SCALE:
                        v = v * s
                        if HAS_OFFSET:
                            v = v + m
                    acc = _dot_word(acc, v, x_ptr, ms, m_ok, stride_xm, col0 + i, w_ok & (col0 + i < K), IEEE)
    if BLOCK_M == 1:
        out = tl.sum(acc, axis=1)[None, :]                                     # (1, BN)
    else:
        out = acc
    y_ptrs = y_ptr + ms[:, None] * stride_ym + rows[None, :]
    ok = m_ok[:, None] & row_ok[None, :]
    _epilogue(y_ptrs, out, ok, bias_ptr, rows, row_ok, HAS_BIAS, SPLIT_K)


# -- launchers -------------------------------------------------------------------------------

def _layout(bits: int) -> tuple[int, int, int, int]:
    """(W0, W1, R1, R2): plane widths (W1 = 0: one plane) and the (R1, R2) shape of a block."""
    widths = planes(bits)
    w0, w1 = widths[0], (widths[1] if len(widths) > 1 else 0)
    return (w0, w1, w0, 32 // w0) if w1 == 0 else (w0, w1, 1, 32)


def _common(qweight, scales, offsets, table, curvature, bits, group_size, in_features, mode):
    if mode not in MODES:
        raise ValueError(f"unknown decode mode {mode!r}; choose one of {MODES}")
    w0, w1, r1, r2 = _layout(bits)
    k_pad = padded_length(in_features)
    ts = 2 ** bits
    if mode == "closed" and curvature is None:
        raise ValueError("mode='closed' needs the qins curvature")
    if mode == "prmt":
        if bits != 4 or table.shape[0] != 1:
            raise ValueError("mode='prmt' takes 4-bit codes with one table per tensor")
        if table.dtype != torch.int32:                   # (1, 16) values, not yet (1, 8) registers
            table = _prmt.table_registers(table)
    # a table per row (prmt has one, checked above), or a curvature per row (closed form)
    per_row = curvature.numel() > 1 if mode == "closed" else table.shape[0] > 1
    G = 1 if scales is None else scales.shape[1]
    dummy = qweight                                          # never read: its flag is off
    if offsets is not None and offsets.stride() != scales.stride():
        raise ValueError("scales and offsets must share one storage order")
    return dict(
        sq_r=qweight.stride(0), sq_w=qweight.stride(1),
        ss_r=0 if scales is None else scales.stride(0), ss_g=0 if scales is None else scales.stride(1),
        s_ptr=dummy if scales is None else scales,
        m_ptr=dummy if offsets is None else offsets,
        tab_ptr=table, a_ptr=dummy if curvature is None else curvature,
        K=in_features, W=qweight.shape[1], PLANE1=k_pad * w0 // 32, G=G, GS=group_size,
        NBLK=k_pad // 32, W0=w0, W1=w1, R1=r1, R2=r2, TS=ts, MODE=MODES.index(mode),
        TAB_PER_ROW=per_row, HAS_SCALE=scales is not None, HAS_OFFSET=offsets is not None)


def _output(M: int, N: int, split: int, x2: torch.Tensor) -> torch.Tensor:
    """y in x's dtype, or a zeroed fp32 buffer the split-K programs add into."""
    if split == 1:
        return torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    return torch.zeros(M, N, device=x2.device, dtype=torch.float32)


def _finish(y: torch.Tensor, split: int, bias, dtype: torch.dtype) -> torch.Tensor:
    """The split-K buffer plus the bias (added once, here), in x's dtype."""
    if split == 1:
        return y
    if bias is not None:
        y += bias.float()
    return y.to(dtype)


def split_k(n: int, k: int, bn: int, nb: int, sms: int = 132) -> int:
    """Splits of K so that the programs fill `sms` 4 times over, keeping >= 4 steps per split."""
    nblk = padded_length(k) // 32
    split = 1
    while triton.cdiv(n, bn) * split < 4 * sms and nblk // (split * 2) >= 4 * nb:
        split *= 2
    return split


def gemv_config(m: int, n: int, k: int, bits: int, sms: int = 132) -> dict:
    """Block sizes for the skinny kernel."""
    bn = 32 if m == 1 else 64
    nb = 4 if bits <= 4 else 2
    return dict(BN=bn, NB=nb, SPLIT_K=split_k(n, k, bn, nb, sms), num_warps=4)


def qgemv(x2, qweight, scales, offsets, table, curvature, bias, bits, group_size, in_features,
          mode="table", config: dict | None = None) -> torch.Tensor:
    """(M, K) x (M <= 16) times the decoded (N, K) weight -> (M, N) in x's dtype."""
    if mode == "prmt":
        raise ValueError("mode='prmt' runs in the one-plane kernel (qmm_words) only")
    M, K = x2.shape
    N = qweight.shape[0]
    cfg = dict(config or gemv_config(M, N, K, bits))
    split, bn, nb = cfg.pop("SPLIT_K"), cfg.pop("BN"), cfg.pop("NB")
    args = _common(qweight, scales, offsets, table, curvature, bits, group_size, in_features, mode)
    nblk = args["NBLK"]
    per_split = triton.cdiv(triton.cdiv(nblk, split), nb) * nb
    split = triton.cdiv(nblk, per_split)
    dot = M > 1
    y = _output(M, N, split, x2)
    grid = (triton.cdiv(N, bn), split)
    _qgemv_kernel[grid](
        x2, qweight, args.pop("s_ptr"), args.pop("m_ptr"), args.pop("tab_ptr"), args.pop("a_ptr"),
        bias if bias is not None else qweight, y,
        M, N, args.pop("K"), args.pop("W"), args.pop("PLANE1"), args.pop("G"), args.pop("GS"),
        args.pop("NBLK"), per_split, x2.stride(0), y.stride(0),
        args.pop("sq_r"), args.pop("sq_w"), args.pop("ss_r"), args.pop("ss_g"),
        **args, HAS_BIAS=bias is not None,
        BLOCK_M=16 if dot else 1, BN=bn, NB=nb, SPLIT_K=split, DOT=dot,
        IEEE=x2.dtype == torch.float32, **cfg)
    return _finish(y, split, bias, x2.dtype)


def dequantize(qweight, scales, offsets, table, curvature, bits, group_size, in_features,
               dtype: torch.dtype, mode="table", bn: int = 32, nb: int = 8) -> torch.Tensor:
    """(N, K) weight decoded into `dtype` in one pass over the codes."""
    if mode == "prmt":
        raise ValueError("mode='prmt' runs in the one-plane kernel (qmm_words) only")
    N = qweight.shape[0]
    out = torch.empty(N, in_features, device=qweight.device, dtype=dtype)
    args = _common(qweight, scales, offsets, table, curvature, bits, group_size, in_features, mode)
    grid = (triton.cdiv(N, bn), triton.cdiv(args["NBLK"], nb))
    _dequant_kernel[grid](qweight, args.pop("s_ptr"), args.pop("m_ptr"), args.pop("tab_ptr"),
                          args.pop("a_ptr"), out, N, args.pop("K"), args.pop("W"), args.pop("PLANE1"),
                          args.pop("G"), args.pop("GS"), args.pop("NBLK"), args.pop("sq_r"),
                          args.pop("sq_w"), args.pop("ss_r"), args.pop("ss_g"), **args, BN=bn, NB=nb)
    return out


def words_config(m: int, n: int, k: int, bits: int, sms: int = 132) -> dict:
    """Tiles of the one-plane kernel: (BLOCK_M, BN, BKW), warps and split-K."""
    # the fastest tiles of the sweep in benchmarks/gpu/qlinear.py on every H200 shape
    if m == 1:
        bm, bn, bkw, warps = 1, 16, 128, 4
    elif m <= 16:
        bm, bn, bkw, warps = 16, 64, 16, 4
    else:
        bm, bn, bkw, warps = 128, 256, 16, 8
    words = padded_length(k) * bits // 32
    split = 1
    programs = triton.cdiv(n, bn) * triton.cdiv(m, bm)
    while programs * split < 4 * sms and words // (split * 2) >= 4 * bkw:
        split *= 2
    return dict(BLOCK_M=bm, BN=bn, BKW=bkw, SPLIT_K=split, num_warps=warps)


def qmm_words(x2, qweight, scales, offsets, table, curvature, bias, bits, group_size, in_features,
              mode="table", config: dict | None = None) -> torch.Tensor:
    """(M, K) x times the decoded (N, K) weight of a one-plane width (2, 4, 8 bits)."""
    if len(planes(bits)) != 1:
        raise ValueError(f"{bits}-bit codes have two planes; use qgemv")
    M, K = x2.shape
    N = qweight.shape[0]
    cfg = dict(config or words_config(M, N, K, bits))
    bm, bn, bkw, split = cfg.pop("BLOCK_M"), cfg.pop("BN"), cfg.pop("BKW"), cfg.pop("SPLIT_K")
    args = _common(qweight, scales, offsets, table, curvature, bits, group_size, in_features, mode)
    W = qweight.shape[1]
    per_split = triton.cdiv(triton.cdiv(W, split), bkw) * bkw
    split = triton.cdiv(W, per_split)
    y = _output(M, N, split, x2)
    grid = (triton.cdiv(N, bn), split, triton.cdiv(M, bm))
    _qmm_words_kernel[grid](
        x2, qweight, args["s_ptr"], args["m_ptr"], args["tab_ptr"], args["a_ptr"],
        bias if bias is not None else qweight, y, M, N, K, W, args["G"], group_size, per_split,
        x2.stride(0), y.stride(0), args["sq_r"], args["sq_w"], args["ss_r"], args["ss_g"], W0=bits, TS=2 ** bits, MODE=args["MODE"],
        TAB_PER_ROW=args["TAB_PER_ROW"], HAS_SCALE=args["HAS_SCALE"], HAS_OFFSET=args["HAS_OFFSET"],
        HAS_BIAS=bias is not None, BLOCK_M=bm, BN=bn, BKW=bkw, SPLIT_K=split,
        IEEE=x2.dtype == torch.float32, **cfg)
    return _finish(y, split, bias, x2.dtype)
