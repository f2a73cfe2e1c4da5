"""CPU fast path of qlinear: a C++ extension (csrc/cpu_qlinear.cpp, AVX2 + FMA + F16C) that
decodes packed codes inside the dot product, built with torch.utils.cpp_extension on first
use and cached by torch (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions).

    qlinear(x, qw, bias)   y = x W^T + b
        M <= GEMV_MAX_ROWS   gemv: codes -> table (registers or L1) -> FMA against x, the group
                             scale applied once per group, threads over output rows
        larger M (prefill)   tiles of TILE_BYTES of W decoded to fp32, one GEMM per tile: no
                             float copy of the whole weight is ever held; bfloat16 x on a CPU
                             with native bf16 (bf16_gemm()): tiles rounded to bf16, bf16 GEMM

Otherwise x of any float dtype is computed in fp32 and the result cast back to x's dtype; the weights
are decoded in fp32 (the reference decodes to x's dtype, so for bf16 x the gemv is the more
exact of the two).

`available()` builds (or loads the cached build) once per process; when the CPU lacks AVX2,
or the compiler or ninja is missing, it returns False, `why_not()` says why, and the dispatch
warns once and uses the reference.
"""
from __future__ import annotations

import functools
import hashlib
import sys
from pathlib import Path

import torch

from ..codec.formats import get_format
from ..codec.packing import packed_words
from ..codec.tensor import QuantizedWeight

SOURCE = Path(__file__).with_name("csrc") / "cpu_qlinear.cpp"
GEMV_MAX_ROWS = 8         # fused gemv up to here, tiles + GEMM above (chosen, not yet tuned by measurement)
TILE_BYTES = 1 << 20      # fp32 decoded tile of W per GEMM: fits a core's L2 (2 MB here)
CLOSED_BITS = (6, 8)     # qins widths decoded in closed form (gather measured ~3x slower on a 49152 x 576 layer)
GRAIN_WORDS = 1 << 12     # rows per thread chunk ~ this many packed words (1 << 14 kept 192 x 576 4-bit on one thread: 8.9 us vs 7.9 split, 2 threads)
# The approximate gemv (generation, <= GEMV_MAX_ROWS rows): 4/5/6-bit codes against
# activations rounded per group to int16 (|error| <= max|x_g| / 16382; levels to 16383 steps of
# max|T|), vpmaddwd dot products; 8-bit qins levels with the 12-bit reciprocal and no Newton
# step (|relative error| <= 3.7e-4 per weight). False: the fp32 gemv, exact decode.
APPROX_GEMV = True
# Prefill with bfloat16 x (larger M): tiles rounded to bf16 and torch's bf16 GEMM where the CPU
# multiplies bf16 natively (AVX512-BF16 or AMX: `bf16_gemm()`), the same rounding as the
# reference's decode to bf16; elsewhere fp32 tiles, x widened to fp32 (a bf16 GEMM emulated in
# fp32 is slower than the fp32 one). None: decide by the CPU; True / False force it.
BF16_GEMM: bool | None = None


class _State:
    module = None
    error: str | None = None


def _cpu_supports() -> str | None:
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        return f"the CPU capability is {cap!r} (the fast path needs AVX2 + FMA + F16C)"
    if sys.platform.startswith("linux"):
        try:
            flags = Path("/proc/cpuinfo").read_text().split()
        except OSError:
            return None
        missing = [f for f in ("avx2", "fma", "f16c") if f not in flags]
        if missing:
            return f"the CPU lacks {', '.join(missing)}"
    return None


def _build():
    """Compile (or load torch's cached build of) the extension; raises on any failure."""
    from torch.utils import cpp_extension
    flags = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
    # the name carries the source's hash: checkouts with different sources (worktrees, versions)
    # never load or rebuild each other's cached build
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:12]
    return cpp_extension.load(name=f"qins_cpu_qlinear_{digest}", sources=[str(SOURCE)], extra_cflags=flags,
                              extra_ldflags=["-fopenmp"], verbose=False)


def load():
    """The built extension module, or None (then `why_not()` says why). Builds once per process."""
    if _State.module is None and _State.error is None:
        why = _cpu_supports()
        if why is not None:
            _State.error = why
        else:
            try:
                _State.module = _build()
            except Exception as e:  # compiler, ninja, headers: any failure means the reference
                msg = str(e).strip().splitlines()
                _State.error = f"building the C++ extension failed: {type(e).__name__}: {msg[-1] if msg else ''}"
    return _State.module


def available() -> bool:
    return load() is not None


def why_not() -> str | None:
    load()
    return _State.error


def reset() -> None:
    """Forget the build result (tests force a failure and then restore)."""
    _State.module, _State.error = None, None


@functools.lru_cache(maxsize=64)
def _tile_rows(in_features: int) -> int:
    return max(8, TILE_BYTES // (4 * (-(-in_features // 32) * 32)) // 8 * 8)


def _grain(qw: QuantizedWeight) -> int:
    return max(1, GRAIN_WORDS // max(1, qw.qweight.shape[1]))


def _table(qw: QuantizedWeight) -> tuple[torch.Tensor, bool]:
    """(table (A, 2^bits), False), or for qins at 6 and 8 bits (curvatures (A, 1), True): the
    kernel decodes those in closed form (a 64/256-entry table would need a gather per 8 codes)."""
    if get_format(qw.config.format).curved and qw.config.bits in CLOSED_BITS:
        return qw.curvature.detach().to(torch.float32).reshape(-1, 1).contiguous(), True
    return qw.decode_table().to(torch.float32).contiguous(), False


def plan(qw: QuantizedWeight, bias: torch.Tensor | None) -> tuple:
    """The extension's arguments for one layer after x (`run` takes them): a module builds
    them once and keeps them while its tensors stay the same objects."""
    O, I = qw.shape
    tab, closed = _table(qw)
    _check_layout(qw.qweight, tab, qw.config.bits, I, closed)
    return (qw.qweight, qw.scales, qw.offsets, tab, bias, qw.config.bits, qw.group_size, I, closed,
            _grain(qw), _tile_rows(I), GEMV_MAX_ROWS, APPROX_GEMV, bf16_gemm())


@functools.lru_cache(maxsize=None)
def _native_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_gemm() -> bool:
    """Whether prefill with bfloat16 x runs a bf16 GEMM over bf16 tiles (BF16_GEMM, else the CPU)."""
    return _native_bf16() if BF16_GEMM is None else bool(BF16_GEMM)


def _check_layout(qweight: torch.Tensor, table: torch.Tensor, bits: int, in_features: int, closed: bool) -> None:
    """The extension checks these too, but an exception thrown inside it crashed the process on
    one machine (torch 2.11, the H200 image): plans are checked here, in Python, first."""
    words = packed_words(in_features, bits)
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or qweight.shape[1] != words:
        raise ValueError(f"qweight has {tuple(qweight.shape)} {qweight.dtype}: expected int32 with {words} "
                         f"words per row for {in_features} {bits}-bit codes")
    cols = 1 if closed else 2 ** bits
    if table.dim() != 2 or table.shape[1] != cols or table.shape[0] not in (1, qweight.shape[0]):
        raise ValueError(f"table has shape {tuple(table.shape)}: expected (1 or {qweight.shape[0]}, {cols})")


def run(x: torch.Tensor, args: tuple) -> torch.Tensor:
    """y = x W^T + b for x (..., I) on the CPU of any float dtype, through `plan(qw, bias)`."""
    mod = _State.module or load()
    if mod is None:
        raise RuntimeError(f"the qins CPU kernels are not available: {_State.error}")
    return mod.linear(x, *args)


def qlinear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T + b through the extension; x (..., I) on the CPU, any float dtype."""
    return run(x, plan(qw, bias))


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """(O, I) float32 decoded by the extension's decode loop (what the tiles hold)."""
    mod = load()
    if mod is None:
        raise RuntimeError(f"the qins CPU kernels are not available: {_State.error}")
    tab, closed = _table(qw)
    return mod.decode(qw.qweight, qw.scales, qw.offsets, tab, qw.config.bits, qw.group_size, qw.shape[1], closed)


__all__ = ["available", "bf16_gemm", "dequantize", "load", "plan", "qlinear", "run", "why_not", "SOURCE"]
