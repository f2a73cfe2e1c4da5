"""CUDA decode attention over the KV page pool (csrc/kv_decode.cu): codes decoded straight into
the tensor-core operand registers, one warp per run of 16-token tiles.

    why_not(device)        None when the CUDA kernel can run on `device`, else the reason
    unsupported(...)       None when it takes this layer's shape and codecs, else the reason
    decode(...)            softmax(q K^T scale) V over the pages and the float segment

The source is compiled once per (source, GPU architecture) with `nvcc` into a shared library
(no PyTorch headers: a few seconds) cached under $QINS_CACHE or ~/.cache/qins, written
atomically, and called through ctypes on the current stream, so CUDA graphs capture it. Where
nvcc is missing or the build fails, `why_not` says why and triton_kv runs the Triton kernel.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from . import _nvcc
from . import prmt as _prmt

SOURCE = _nvcc.CSRC / "kv_decode.cu"
HEAD_DIMS = (64, 128)
BITS = ((4, 4), (8, 8))
MAX_QUERY_HEADS = 8            # query heads per KV head: the 8 columns of one mma n-tile
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_PTRS = ("q", "kc", "ks", "kz", "koff", "vc", "vs", "vz", "vtab", "table", "fk", "fv", "o", "ml", "out")
_INTS = ("B", "H", "QH", "Q", "P", "COLS", "SKIP", "F", "TPS", "NSPLIT", "FS", "G",
         "D", "KB", "VB", "kmode", "use_tab", "vzero", "q_dtype", "f_dtype", "koff_dtype", "minb",
         "probe")
FLOAT_TOKENS = 64              # float-segment tokens per program (16 per warp)
# programs per SM the kernel's registers are fitted to, by code width (4, or 1: no limit). H200
# (benchmarks/gpu/kv_cuda_probe.py): 4 at 4 bits (batch 8, 32k tokens: 225 against 275 us); at 8
# bits the fit spills (256 bytes) and no limit was faster (281 against 340 us)
MIN_BLOCKS = {4: 4, 8: 1}
_FLOATS = ("qk_scale", "k_alpha", "k_beta", "v_alpha", "v_beta")


class _Args(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_void_p) for n in _PTRS] + [(n, ctypes.c_int) for n in _INTS]
                + [(n, ctypes.c_float) for n in _FLOATS])


@functools.lru_cache(maxsize=4)
def _library(arch: str) -> ctypes.CDLL:
    """Build (or load the cached build of) the kernel library for sm_`arch`; raises on failure."""
    return _nvcc.load(SOURCE, arch, "qins_kv_decode", "qins_kv_abi", _Args)


_arch = _nvcc.arch


def why_not(device) -> str | None:
    """None when the CUDA kernel can run on `device` (builds it on first call), else the reason."""
    return _nvcc.why_not(device, "the CUDA KV kernel", _library)


def unsupported(D: int, qh: int, k_bits: int, v_bits: int, group: int, k_affine, v_affine, dtypes) -> str | None:
    """None when the kernel takes this shape and these codecs, else the reason."""
    if D not in HEAD_DIMS:
        return f"head dim {D} (the CUDA kernel takes {HEAD_DIMS})"
    if (k_bits, v_bits) not in BITS:
        return f"k{k_bits}v{v_bits} (the CUDA kernel takes {BITS})"
    if not 1 <= qh <= MAX_QUERY_HEADS:
        return f"{qh} query heads per KV head (the CUDA kernel takes 1..{MAX_QUERY_HEADS})"
    if group % 16:
        return f"key group {group} (the CUDA kernel takes multiples of 16)"
    if k_affine is None:
        return "keys with a decode table (the CUDA kernel takes affine keys)"
    if v_affine is None and v_bits != 4:
        return f"{v_bits}-bit values with a decode table (the CUDA kernel looks up 4-bit tables only)"
    bad = [d for d in dtypes if d not in _DTYPES]
    if bad:
        return f"dtype {bad[0]} (the CUDA kernel reads {tuple(_DTYPES)})"
    return None


def pair_table(v_lut: torch.Tensor) -> torch.Tensor:
    """(256,) int32: entry i is the half2 (lut[i & 15], lut[i >> 4]) of a 4-bit fp16 table, so
    one lookup by the codes of two tokens gives both levels (prmt.pair_table). Cached per table."""
    return _prmt.pair_table(v_lut, torch.float16)


def decode(q, planes, table, n_tokens, skip, k_base, v_lut, k_affine, v_affine, k_bits, v_bits, group,
           fk, fv, scale, splits, minb: int | None = None, probe: int = 0) -> torch.Tensor:
    """softmax(q K^T scale) V for one query token per row, q (B, Hq, D) -> (B, Hq, D) in q's dtype,
    with the arguments of triton_kv.kv_decode_attention: `splits` programs per (row, KV head) over
    the page tokens, ceil(F / FLOAT_TOKENS) over the float segment, then a launch that merges the
    splits (a program per query head); at most 1000 page splits. probe: timing probes that leave
    work out (benchmarks/gpu/kv_cuda_probe.py; the result is then wrong): 1 the values, 2 the float
    segment, 4 the merge, 8 all but the loads."""
    B, Hq, D = q.shape
    kc, ks, kz, vc, vs, vz = planes
    H, P = kc.shape[1], kc.shape[2]
    for t in (q, kc, ks, vc, vs, table, fk, fv) + tuple(x for x in (kz, vz) if x is not None):
        if not t.is_contiguous():
            raise ValueError("the CUDA KV kernel takes contiguous queries, pool planes and float segment")
    if not 1 <= splits <= 1000:
        raise ValueError(f"the CUDA KV kernel takes 1..1000 page splits, got {splits}")
    tps = -(-n_tokens // splits) if n_tokens else 16
    tps = -(-tps // 16) * 16
    F = fk.shape[2]
    fs = -(-F // FLOAT_TOKENS)
    o = torch.empty(B, Hq, fs + splits, D, dtype=torch.float32, device=q.device)
    ml = torch.empty(B, Hq, fs + splits, 2, dtype=torch.float32, device=q.device)
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    k_mode = 1 if kz is not None else 2 if k_base is not None else 0
    koff = k_base.contiguous() if k_base is not None else None
    vtab = pair_table(v_lut) if v_affine is None else None
    ka, va = k_affine, v_affine or (1.0, 0.0)
    ptr = lambda t: None if t is None else t.data_ptr()
    args = _Args(
        q=ptr(q), kc=ptr(kc), ks=ptr(ks), kz=ptr(kz), koff=ptr(koff), vc=ptr(vc), vs=ptr(vs), vz=ptr(vz),
        vtab=ptr(vtab), table=ptr(table), fk=ptr(fk), fv=ptr(fv), o=ptr(o), ml=ptr(ml), out=ptr(out),
        B=B, H=H, QH=Hq // H, Q=n_tokens, P=P, COLS=table.shape[1], SKIP=skip, F=F, TPS=tps,
        NSPLIT=splits, FS=fs, G=group, D=D, KB=k_bits, VB=v_bits, kmode=k_mode, use_tab=int(vtab is not None),
        vzero=int(vz is not None), q_dtype=_DTYPES[q.dtype], f_dtype=_DTYPES[fk.dtype],
        koff_dtype=_DTYPES[koff.dtype] if koff is not None else 0, minb=MIN_BLOCKS[k_bits] if minb is None else minb, probe=probe,
        qk_scale=scale * 1.4426950408889634, k_alpha=ka[0], k_beta=ka[1], v_alpha=va[0], v_beta=va[1])
    lib = _library(_arch(q.device))
    rc = _nvcc.launch(lib.qins_kv_decode, args, q.device, "the CUDA KV kernel")
    if rc < 0:
        raise ValueError(f"the CUDA KV kernel does not hold this combination (code {rc}): D={D}, k{k_bits}v{v_bits}, "
                         f"{Hq // H} query heads per KV head, group {group}, page {P}")
    return out
