"""Kernel dispatch: one entry point per operation, a torch reference behind every kernel.

    qlinear(x, qw, bias)   y = x W^T + b, W decoded from qw's codes
    dequantize(qw, dtype)  W (or selected rows) as floats

Backends, chosen per call by `QINS_KERNELS` (read on every call):
    auto (default)  CUDA tensors -> the GPU kernels through the torch.library ops in
                    kernels/ops.py: the CUDA kernels built with nvcc (cuda_qlinear.py, cuda_kv.py)
                    where they build and take the call, else Triton; CPU tensors -> the CPU fast
                    path (kernels/cpu.py, a C++ extension built on first use), or the reference
                    with one warning where it cannot build or run; no Triton on CUDA -> the
                    reference
    reference       the pure-PyTorch reference everywhere (kernels/reference.py)
    triton          the Triton kernels only (never the nvcc-built ones), or a clear error where
                    they cannot run; on the CPU this needs TRITON_INTERPRET=1 (how the tests
                    check the kernels without a GPU)
    cpu             the CPU fast path, or a clear error where it cannot run
QINSLinear on CUDA under auto stores 4-bit codes tiled where the CUDA kernel builds
(`tiles_take`; QINS_TILED=0 keeps them K-major); the other backends untile them per call.

Under autograd (x or the bias requires grad) and inside torch.compile the CPU path defers to
the reference: the extension has no backward and is opaque to the compiler.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch
import torch.nn.functional as F

from ..codec.formats import get_format
from ..codec.tensor import QuantizedWeight
from . import cpu, reference

BACKENDS = ("auto", "reference", "triton", "cpu")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)



def is_kmajor(t: torch.Tensor) -> bool:
    """An (N, W) tensor stored K-major: the transpose of a contiguous (W, N) one."""
    return t.dim() == 2 and t.shape[0] > 1 and t.stride(0) == 1


def kmajor(t: torch.Tensor) -> torch.Tensor:
    """The same (N, W) values stored K-major, the order the CUDA kernels read codes and group
    scales in (each code row is one coalesced run across the outputs; kernels/triton_kmajor.py)."""
    return t if is_kmajor(t) else t.t().contiguous().t()


def backend() -> str:
    return _parse_backend(os.environ.get("QINS_KERNELS", "auto"))


@functools.lru_cache(maxsize=16)
def _parse_backend(raw: str) -> str:
    b = raw.strip().lower() or "auto"
    if b not in BACKENDS:
        raise ValueError(f"QINS_KERNELS={b!r}: choose one of {BACKENDS}")
    return b


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")




def cuda_refused() -> str | None:
    """Why the nvcc-built CUDA kernels may not run under the current backend, or None."""
    if backend() == "triton":
        return "QINS_KERNELS=triton runs the Triton kernels only"
    return None


def _use_triton(x: torch.Tensor, qw: QuantizedWeight) -> bool:
    b = backend()
    if b in ("reference", "cpu"):
        return False
    why = None
    if not triton_available():
        why = "Triton is not installed"
    elif not (x.is_cuda or (b == "triton" and _interpreting())):
        why = f"x is on {x.device} (Triton runs on CUDA, or on the CPU under TRITON_INTERPRET=1)"
    elif x.device != qw.qweight.device:
        why = f"x is on {x.device} and the codes on {qw.qweight.device}"
    elif x.dtype not in DTYPES:
        why = f"x has dtype {x.dtype}; the kernels take {DTYPES}"
    elif x.shape[-1] != qw.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the layer takes {qw.shape[1]}")
    if why is None:
        return True
    if b == "triton":
        raise RuntimeError(f"QINS_KERNELS=triton: cannot run the Triton kernel: {why}")
    return False


class _Warned:
    cpu = False


def _cpu_why_not(x: torch.Tensor, codes_device: torch.device, in_features: int,
                 bias: torch.Tensor | None) -> tuple[str | None, bool]:
    """(why the CPU fast path cannot take this call or None, whether that deserves a warning);
    a feature count that does not match the layer raises."""
    if x.device.type != "cpu" or codes_device.type != "cpu":
        return f"x is on {x.device} and the codes on {codes_device} (the fast path runs on the CPU)", False
    if x.dtype not in DTYPES:
        return f"x has dtype {x.dtype}; the kernels take {DTYPES}", False
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the layer takes {in_features}")
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return "autograd needs a backward (the extension has none)", False
    if torch.compiler.is_compiling():
        return "torch.compile traces the reference", False
    if not cpu.available():
        return cpu.why_not(), True
    return None, False


def _use_cpu(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> bool:
    b = backend()
    if b not in ("auto", "cpu"):
        return False
    why, warn = _cpu_why_not(x, qw.qweight.device, qw.shape[1], bias)
    if why is None:
        return True
    if b == "cpu":
        raise RuntimeError(f"QINS_KERNELS=cpu: cannot run the CPU fast path: {why}")
    if warn and not _Warned.cpu:
        _Warned.cpu = True
        warnings.warn(f"qins: the CPU fast path is unavailable ({why}); using the reference, which "
                      f"decodes each whole weight per call (several times slower)", RuntimeWarning,
                      stacklevel=3)
    return False


def cpu_fast(x: torch.Tensor, bias: torch.Tensor | None, in_features: int) -> bool:
    """Whether a CPU layer's codes may go straight to the fast path through a cached
    `cpu.plan` (`qlinear`'s CPU route, checked without building a QuantizedWeight); False
    sends the call through `qlinear`, which warns or raises where it must."""
    if _parse_backend(os.environ.get("QINS_KERNELS", "auto")) not in _CPU_BACKENDS or not x.is_cpu:
        return False
    # the common case first, with the cheapest checks (a generated token makes ~200 calls): the
    # same conditions as _cpu_why_not, which decides (and raises, and says why) otherwise
    if (cpu._State.module is not None and x.dtype in DTYPES and x.shape[-1] == in_features
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))):
        return True
    return _cpu_why_not(x, x.device, in_features, bias)[0] is None


_CPU_BACKENDS = ("auto", "cpu")


def op_mode(config, curvature: torch.Tensor | None) -> tuple[torch.Tensor | None, str]:
    """(the curvature the ops take, their mode) for a layer of `config`: a per-channel curvature
    gives mode "closed" (an (O, 2^bits) table is never built); otherwise "auto" ("auto-qins": the
    closed form is allowed), and the op picks per batch and width (ops.choose)."""
    curv = curvature if get_format(config.format).curved else None
    if curv is not None and curv.numel() > 1:
        return curv, "closed"
    return curv, "auto-qins" if curv is not None else "auto"


def _dequant_mode(mode: str) -> str:
    """The qins::dequantize mode of an op mode: "auto..." decodes through the table."""
    return "table" if mode.startswith("auto") else mode


def _op_args(qw: QuantizedWeight) -> tuple[tuple, str]:
    """((qweight, scales, offsets, table, curvature), mode) for the ops (op_mode)."""
    curv, mode = op_mode(qw.config, qw.curvature)
    table = curv.reshape(1, -1) if mode == "closed" else qw.decode_table()
    return (qw.qweight, qw.scales, qw.offsets, table, curv), mode


def qlinear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None,
            weight: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b with W decoded from codes (or the given pre-decoded `weight`)."""
    if weight is not None:
        return F.linear(x, weight.to(x.dtype), bias)
    if not _use_triton(x, qw):
        if _use_cpu(x, qw, bias):
            return cpu.qlinear(x, qw, bias)
        return reference.qlinear(x, qw, bias)
    from . import ops
    args, mode = _op_args(qw)
    op = torch.ops.qins.qlinear if x.is_cuda else ops.triton_linear
    return op(x, *args, bias, qw.config.bits, qw.group_size, qw.shape[1], mode)


def tiles_take(device) -> bool:
    """Whether a QINSLinear on `device` stores its 4-bit codes tiled (cuda_qlinear.tile_codes,
    read by the CUDA tensor-core kernel 14-22% faster than K-major at batch 1 on an H200): on
    CUDA under the auto backend where that kernel builds, unless QINS_TILED=0."""
    device = torch.device(device)
    if device.type != "cuda" or backend() != "auto" or _interpreting() or os.environ.get("QINS_TILED", "1") == "0":
        return False
    from . import cuda_qlinear
    return cuda_qlinear.why_not(device) is None


def qlinear_tiled(x: torch.Tensor, tiled: torch.Tensor, scales: torch.Tensor, table: torch.Tensor,
                  curvature: torch.Tensor | None, bias: torch.Tensor | None, group_size: int,
                  in_features: int, out_features: int, mode: str) -> torch.Tensor:
    """qlinear over 4-bit codes in the tiled layout (ops.qlinear_tiled)."""
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the layer takes {in_features}")
    from . import ops  # noqa: F401  (registers the op)
    return torch.ops.qins.qlinear_tiled(x, tiled, scales, table, curvature, bias, group_size, in_features,
                                        out_features, mode)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32,
               rows: torch.Tensor | None = None) -> torch.Tensor:
    """(O, I) weight, or the selected rows, decoded as table[code] * s (+ m)."""
    if rows is None and qw.qweight.is_cuda and backend() != "reference" and triton_available():
        from . import ops  # noqa: F401  (registers the op)
        args, mode = _op_args(qw)
        return torch.ops.qins.dequantize(*args, qw.config.bits, qw.group_size, qw.shape[1],
                                         _dequant_mode(mode), dtype)
    return reference.dequantize(qw, dtype, rows)


__all__ = ["backend", "cpu_fast", "cuda_refused", "dequantize", "is_kmajor", "kmajor", "qlinear", "qlinear_tiled",
           "tiles_take", "triton_available", "BACKENDS"]
