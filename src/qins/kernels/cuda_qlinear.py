"""y = x W^T (+ b) for 1..16 rows over 4-bit K-major codes on the tensor cores (csrc/qlinear_mma.cu):
each byte of two codes is one lookup in a pair table in shared memory, straight into the mma.sync
operand registers; group scales multiply each group's fp32 products once.

    why_not(device)         None when the kernel can run on `device` (builds it), else the reason
    unsupported(x, ...)     None when it takes this call, else the reason
    qlinear(x, ...)         the product, in x's dtype
    tile_codes(q, K)        codes in the tiled layout (14-22% faster at batch 1), untile_codes back

It takes 4-bit codes with one decode table per tensor, fp16 group scales and no offsets, x in
fp16 or bf16 with K a multiple of 8, N a multiple of 4, groups of 32, 64 or 128 codes (the
last group takes the remainder of K, as the codec's). The library is built by nvcc on first use
(kernels/_nvcc.py); where it cannot be, or QINS_KERNELS=triton, the Triton kernels run.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from . import _nvcc, is_kmajor
from .prmt import pair_table

SOURCE = _nvcc.CSRC / "qlinear_mma.cu"
MAX_ROWS = 16
_DTYPES = {torch.float16: 1, torch.bfloat16: 2}
_BIAS_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
GROUPS = (32, 64, 128)
SHAPES = ((8, 4), (8, 2), (4, 4))       # (warps per block, loads in flight per warp) built
MAX_SPLITS = 8                          # blocks of a tile along K: one thread-block cluster (sm_90)
_PTRS = ("x", "qw", "s", "tab", "bias", "y")
_INTS = ("M", "N", "K", "QS", "SS", "LDX", "G", "SPLITS", "dtype", "bias_dtype", "warps", "depth", "tiled", "wide")


class _Args(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in _PTRS] + [(n, ctypes.c_int) for n in _INTS]


@functools.lru_cache(maxsize=4)
def _library(arch: str) -> ctypes.CDLL:
    """Build (or load the cached build of) the kernel library for sm_`arch`; raises on failure."""
    return _nvcc.load(SOURCE, arch, "qins_qlinear4", "qins_qlinear_abi", _Args)


def why_not(device) -> str | None:
    """None when the kernel can run on `device` (builds it on first call), else the reason."""
    return _nvcc.why_not(device, "the CUDA weight kernel", _library)


def layer_unsupported(bits: int, scales, offsets, table: torch.Tensor | None, group_size: int,
                      N: int, K: int) -> str | None:
    """None when the kernel takes a layer of this kind and shape (whatever its layout and x), else
    the reason; QINSLinear tiles the codes of the layers it takes."""
    if bits != 4:
        return f"{bits}-bit codes (the CUDA kernel reads 4 bits)"
    if offsets is not None or scales is None or scales.dtype != torch.float16:
        return "the CUDA kernel takes fp16 group scales and no offsets"
    if table is None or table.shape[0] != 1:
        return "a table per channel (the CUDA kernel takes one per tensor)"
    if K % 8 or N % 4 or group_size not in GROUPS:
        return f"K={K}, N={N}, group {group_size} (the CUDA kernel takes K % 8 == 0, N % 4 == 0, groups {GROUPS})"
    return None


def _tiles_why(tiled: torch.Tensor, N: int | None, K: int) -> str | None:
    if N is None or tuple(tiled.shape) != tiled_shape(N, K) or not tiled.is_contiguous():
        return f"tiled codes of shape {tuple(tiled.shape)} do not hold {N} x {K} codes (tile_codes makes them)"
    return None


def unsupported(x: torch.Tensor, qweight: torch.Tensor, scales, offsets, table: torch.Tensor,
                bits: int, group_size: int, in_features: int, out_features: int | None = None) -> str | None:
    """None when `qlinear` takes this call (x (M, K) two-dimensional), else the reason. qweight:
    K-major codes, or tiled ones (tile_codes; then out_features gives N)."""
    if x.dtype not in _DTYPES:
        return f"x in {x.dtype} (the CUDA kernel takes fp16 and bf16)"
    if not 1 <= x.shape[0] <= MAX_ROWS:
        return f"{x.shape[0]} rows (the CUDA kernel takes 1..{MAX_ROWS})"
    tiled = is_tiled(qweight)
    N, K = out_features if tiled else qweight.shape[0], in_features
    why = layer_unsupported(bits, scales, offsets, table, group_size, N, K)
    if why:
        return why
    # a single group's scales (N, 1) have no stride along groups to check
    if scales.shape[1] > 1 and (not is_kmajor(scales) or scales.stride(1) % 4):
        return "scales must be K-major with rows of 16 bytes (QINSLinear on CUDA stores them so)"
    if tiled:
        why = _tiles_why(qweight, N, K)
        if why:
            return why
    elif not is_kmajor(qweight) or qweight.stride(1) % 4:
        return "codes must be K-major with rows of 16 bytes, or tiled (QINSLinear on CUDA stores them so)"
    if x.stride(1) != 1 or (x.shape[0] > 1 and x.stride(0) % 8) or x.data_ptr() % 16 or qweight.data_ptr() % 16 or scales.data_ptr() % 8:
        return "x, codes and scales must be contiguous along K and 16-byte aligned"
    if not tiled and qweight.shape[1] * 8 < -(-K // 32) * 32:
        return f"{qweight.shape[1]} words per output hold fewer than the {K} codes"
    return None


def default_config(M: int, N: int, K: int, group_size: int, device) -> tuple[int, int, int]:
    """(splits, warps, depth) for a call (the table: wide with 8 warps, narrow with 4). H200 sweep
    (benchmarks/gpu/mma.py --sweep --tiled, 4-bit g64, bf16, 2026-12-04): with tiles of 32 outputs
    for 12 warps per SM, 4 warps, 4 loads in flight and the 32 KB table at batch 1-8 (four blocks
    per SM; 4096 x 14336: 17.7 us K-major, 14.6 us tiled), 8 warps with 2 loads at 9-16
    (registers); with fewer tiles, blocks of 8 warps and the 64 KB table, two per SM, split along K
    (sm_90 clusters) up to that (14336 x 4096: 2 blocks, 16.6 / 13.8 us; 3 took 23.4 / 20.1)."""
    tiles = -(-N // 32)
    props = torch.cuda.get_device_properties(device)
    sms = props.multi_processor_count
    if tiles * 4 >= sms * 12:
        return (1, 4, 4) if M <= 8 else (1, 8, 2)
    depth = 4 if M <= 8 else 2
    if (props.major, props.minor) < (9, 0):
        return 1, 8, depth
    groups = max(1, K // group_size)
    return max(1, min(sms * 2 // tiles, MAX_SPLITS, groups // 8)), 8, depth


def is_tiled(t: torch.Tensor) -> bool:
    """Codes laid out by tile_codes: (tiles, chunks, 32, 4) int32."""
    return t.dim() == 4 and tuple(t.shape[2:]) == (32, 4)


def tiled_shape(N: int, K: int) -> tuple[int, int, int, int]:
    return -(-N // 32), -(-K // 32), 32, 4


def tile_codes(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """The 4-bit codes (N, words), any strides, tiled for the kernel: tile T (outputs 32T .. 32T + 31)
    and chunk c (32 codes along K) are 512 contiguous bytes, lane 4g + t's 16 bytes holding word
    4c + t of outputs 32T + 4g .. + 3; outputs past N and words past K are zero. A warp reads its
    run of chunks as one contiguous stream (the K-major layout reads four 128-byte pieces a chunk,
    N words apart). untile_codes inverts it."""
    N, words = qweight.shape
    chunks = -(-in_features // 32)
    padded = torch.zeros(-(-N // 32) * 32, chunks * 4, dtype=torch.int32, device=qweight.device)
    padded[:N, :min(words, chunks * 4)] = qweight[:, :chunks * 4]
    # (T, g, j, c, t) -> (T, c, g, t, j)
    return padded.view(-1, 8, 4, chunks, 4).permute(0, 3, 1, 4, 2).reshape(-1, chunks, 32, 4)


def untile_codes(tiled: torch.Tensor, N: int, words: int) -> torch.Tensor:
    """The (N, words) codes of tile_codes' output, K-major (a copy)."""
    T, chunks = tiled.shape[:2]
    if not is_tiled(tiled) or T * 32 < N or chunks * 4 < words:
        raise ValueError(f"tiled codes of shape {tuple(tiled.shape)} do not hold {N} x {words} words")
    # (T, c, g, t, j) -> (c, t, T, g, j): rows are words, columns outputs
    kmaj = tiled.view(T, chunks, 8, 4, 4).permute(1, 3, 0, 2, 4).reshape(chunks * 4, T * 32)
    return kmaj[:words, :N].t()


def qlinear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, table: torch.Tensor,
            bias: torch.Tensor | None, group_size: int, in_features: int, *, splits: int | None = None,
            warps: int | None = None, depth: int | None = None, wide: bool | None = None,
            out_features: int | None = None) -> torch.Tensor:
    """x (M, K) @ W^T (+ bias) -> (M, N) in x's dtype; `unsupported` must have returned None.
    qweight: K-major codes or tiled ones (tile_codes; then out_features gives N). splits, warps,
    depth: the launch (default_config where not given); wide: the 64 KB table (default: with
    blocks of 8 warps, see csrc look)."""
    M, K = x.shape[0], in_features
    tiled = is_tiled(qweight)
    N = out_features if tiled else qweight.shape[0]
    if tiled:
        why = _tiles_why(qweight, N, K)
        if why or qweight.device != x.device:
            raise ValueError(why or f"tiled codes on {qweight.device}, x on {x.device}")
    if splits is None or warps is None or depth is None:
        d = default_config(M, N, K, group_size, x.device)
        splits, warps, depth = (d[0] if splits is None else splits, d[1] if warps is None else warps,
                                d[2] if depth is None else depth)
    if (warps, depth) not in SHAPES:
        raise ValueError(f"(warps, depth) = {(warps, depth)}; built: {SHAPES}")
    if not 1 <= splits <= MAX_SPLITS or (splits > 1 and torch.cuda.get_device_capability(x.device) < (9, 0)):
        raise ValueError(f"splits={splits}: 1..{MAX_SPLITS} on sm_90 and newer, 1 below")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    tab = pair_table(table, x.dtype)
    if bias is not None and (bias.dtype not in _BIAS_DTYPES or not bias.is_contiguous()):
        bias = bias.float().contiguous()
    ptr = lambda t: None if t is None else t.data_ptr()
    args = _Args(x=ptr(x), qw=ptr(qweight), s=ptr(scales), tab=ptr(tab), bias=ptr(bias), y=ptr(y),
                 M=M, N=N, K=K, QS=4 if tiled else qweight.stride(1),
                 SS=scales.stride(1) if scales.shape[1] > 1 else 4, LDX=x.stride(0) if M > 1 else K, G=group_size,
                 SPLITS=splits, dtype=_DTYPES[x.dtype], bias_dtype=_BIAS_DTYPES[bias.dtype] if bias is not None else 0,
                 warps=warps, depth=depth, tiled=qweight.shape[1] if tiled else 0,
                 wide=int(warps == 8 if wide is None else wide))
    rc = _nvcc.launch(_library(_nvcc.arch(x.device)).qins_qlinear4, args, x.device, "the CUDA weight kernel")
    if rc < 0:
        raise ValueError(f"the CUDA weight kernel does not take this call (code {rc}): M={M}, N={N}, K={K}, "
                         f"group {group_size}, {x.dtype}")
    return y
