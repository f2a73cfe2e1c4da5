"""torch.library custom ops over the Triton kernels, with fakes so torch.compile and CUDA graphs
capture them. The CUDA registration runs Triton; every other device runs the reference.

    qins::qlinear(x, qweight, scales?, offsets?, table, curvature?, bias?, bits, group_size,
                  in_features, mode) -> y (..., N)        x (..., K) in bf16, fp16 or fp32
    qins::dequantize(qweight, scales?, offsets?, table, curvature?, bits, group_size,
                     in_features, mode, dtype) -> (N, K)
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from ..codec.packing import packed_words, planes

from ..codec.qins import qins_table
from ..codec.tensor import decode
from . import _dequant_mode, _interpreting, cuda_refused, is_kmajor
from .prmt import cached_registers

# rows of x up to which the skinny kernels run; above, the weight is decoded once into x's
# dtype and cuBLAS multiplies. Measured on the H200, x cuBLAS bf16 (benchmarks/results/
# gpu_kmajor.md): K-major codes, batch 16, closed form 0.49-0.58x against 0.30-0.41x for
# decode-then-cuBLAS; a table read feeding tl.dot 0.05-0.10x. Row-major codes (a tensor that
# is not a module's, or a tied head): batch 1 only (gpu_qlinear.md).
SKINNY_MAX_BATCH = 16
GEMV_MAX_BATCH = 1



def choose(mode: str, bits: int, m: int, dtype: torch.dtype, kmajor: bool = False,
           per_tensor: bool = True, offsets: bool = False, scaled: bool = True,
           mma: bool = False) -> tuple[str, str]:
    """(route, decode mode) for a batch of m rows. `mode`: "auto" (any table), "auto-qins"
    (the closed form is allowed) or an explicit mode. `mma`: the CUDA tensor-core kernel
    (kernels/cuda_qlinear.py) takes this call.

    K-major codes (benchmarks/results/gpu_kmajor.md, gpu_skinny.md and gpu_mma.md, H200, x cuBLAS bf16):
        4 bits, one table, fp16/bf16, batch 1-16, where the CUDA kernel builds (mma): pair-table
            lookups into tensor-core operands 1.71-2.00 at batch 1, 1.60-1.80 at 8, 1.07-1.31 at 16
        4 bits, one table, batch 1: register table (prmt) over (words, outputs) tiles 1.22-1.35
        4 bits, one table, no offsets, batch 2-16: the same decode feeding tl.dot 0.60-0.62
            (the closed form below: 0.39-0.44)
        qins 8 bits, batch 1: closed form over byte positions (kbyte) 0.67-0.70 (kgemv 0.46-0.50)
        qins, any width:   closed form 0.44-0.64 at batch 1, 0.34-0.58 at batch 16
        other tables:      table read 0.27-0.51 at batch 1; batch > 1 decodes then cuBLAS
    Row-major codes (gpu_qlinear.md): 4 bits prmt 0.48-0.84, 8 bits closed 0.43-0.55, 2 bits
    table 0.37-0.49, 3/5/6 bits table 0.33-0.66.
    route: "mma" (CUDA), "kprmt", "kprmt_mm", "kbyte", "kgemv" (K-major), "words" (row-major one plane:
    2, 4, 8 bits), "gemv" (row-major two planes), "unfused".
    """
    if mma:
        return "mma", "table"
    prmt_ok = bits == 4 and dtype != torch.float32 and not _interpreting() and per_tensor
    if kmajor:
        if not mode.startswith("auto"):
            if m > SKINNY_MAX_BATCH or mode == "table" and m > 1:
                return "unfused", mode if mode != "prmt" else "table"
            return ("kprmt" if mode == "prmt" and m == 1 else "kgemv"), mode
        if m == 1 and prmt_ok:
            return "kprmt", "prmt"
        if m <= SKINNY_MAX_BATCH and prmt_ok and not offsets:
            return "kprmt_mm", "prmt"
        if m == 1 and bits == 8 and mode == "auto-qins" and scaled:
            return "kbyte", "closed"
        if m <= SKINNY_MAX_BATCH and (mode == "auto-qins" or not per_tensor):
            return "kgemv", "closed"
        if m == 1:
            return "kgemv", "table"
        return "unfused", "table"
    if m > GEMV_MAX_BATCH:
        route = "unfused"
    else:
        route = "words" if len(planes(bits)) == 1 else "gemv"
    if not mode.startswith("auto"):
        return route, mode
    if route == "unfused":
        return route, "table"
    # prmt: a bf16-rounded table, and inline PTX, which the interpreter (CPU tests) does not run
    if prmt_ok:
        return route, "prmt"
    if mode == "auto-qins" and bits == 8:
        return route, "closed"
    return route, "table"


@torch.library.custom_op("qins::dequantize", mutates_args=())
def dequantize(qweight: Tensor, scales: Tensor | None, offsets: Tensor | None, table: Tensor,
               curvature: Tensor | None, bits: int, group_size: int, in_features: int,
               mode: str, dtype: torch.dtype) -> Tensor:
    return decode(qweight, scales, offsets, _table(table, curvature, bits, mode), bits, group_size,
                  in_features, dtype)


def _table(table: Tensor, curvature: Tensor | None, bits: int, mode: str) -> Tensor:
    """The reference's table: mode "closed" passes none (qins: built from the curvature)."""
    return qins_table(bits, curvature) if mode == "closed" else table


@dequantize.register_fake
def _(qweight, scales, offsets, table, curvature, bits, group_size, in_features, mode, dtype):
    return qweight.new_empty(qweight.shape[0], in_features, dtype=dtype)


@dequantize.register_kernel("cuda")
def _(qweight, scales, offsets, table, curvature, bits, group_size, in_features, mode, dtype):
    from . import triton_qlinear
    return triton_qlinear.dequantize(qweight, scales, offsets, table, curvature, bits, group_size,
                                     in_features, dtype, mode=mode)


@torch.library.custom_op("qins::qlinear", mutates_args=())
def qlinear(x: Tensor, qweight: Tensor, scales: Tensor | None, offsets: Tensor | None,
            table: Tensor, curvature: Tensor | None, bias: Tensor | None, bits: int,
            group_size: int, in_features: int, mode: str) -> Tensor:
    w = decode(qweight, scales, offsets, _table(table, curvature, bits, mode), bits, group_size,
               in_features, x.dtype)
    return F.linear(x, w, bias)


@qlinear.register_fake
def _(x, qweight, scales, offsets, table, curvature, bias, bits, group_size, in_features, mode):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@qlinear.register_kernel("cuda")
def _(x, qweight, scales, offsets, table, curvature, bias, bits, group_size, in_features, mode):
    return triton_linear(x, qweight, scales, offsets, table, curvature, bias, bits, group_size,
                         in_features, mode)


@torch.library.custom_op("qins::qlinear_tiled", mutates_args=())
def qlinear_tiled(x: Tensor, tiled: Tensor, scales: Tensor, table: Tensor, curvature: Tensor | None,
                  bias: Tensor | None, group_size: int, in_features: int, out_features: int, mode: str) -> Tensor:
    """qlinear over 4-bit codes in cuda_qlinear's tiled layout: on CUDA the tensor-core kernel
    where it takes the call (1..16 rows), else (and on other devices) the codes untiled for the
    call (a transient K-major copy), then qlinear."""
    from . import cuda_qlinear
    q = cuda_qlinear.untile_codes(tiled, out_features, packed_words(in_features, 4))
    return qlinear(x, q, scales, None, table, curvature, bias, 4, group_size, in_features, mode)


@qlinear_tiled.register_fake
def _(x, tiled, scales, table, curvature, bias, group_size, in_features, out_features, mode):
    return x.new_empty(*x.shape[:-1], out_features)


@qlinear_tiled.register_kernel("cuda")
def _(x, tiled, scales, table, curvature, bias, group_size, in_features, out_features, mode):
    x2 = _rows(x, in_features)
    if mode.startswith("auto") and _mma_takes(x2, tiled, scales, None, table, 4, group_size, in_features, out_features):
        from . import cuda_qlinear
        y = cuda_qlinear.qlinear(x2, tiled, scales, table, bias, group_size, in_features, out_features=out_features)
        return y.reshape(*x.shape[:-1], out_features)
    q = cuda_qlinear.untile_codes(tiled, out_features, packed_words(in_features, 4))
    return triton_linear(x, q, scales, None, table, curvature, bias, 4, group_size, in_features, mode)


# Backward through the products (a loss through a quantized layer, e.g. adapters trained on a
# quantized model): the codes are constants; dL/dx = dL/dy W and dL/db = the sum of dL/dy over
# rows, with W decoded once in dL/dy's dtype.
def _linear_backward(ctx, grad: Tensor, weight, bias_at: int) -> tuple[Tensor | None, Tensor | None]:
    """(dL/dx, dL/db), each only where needed (x is input 0, the bias input `bias_at`);
    `weight()` decodes W, only when dL/dx is."""
    needs = ctx.needs_input_grad
    gx = grad @ weight() if needs[0] else None
    gb = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype) if needs[bias_at] else None
    return gx, gb


def _qlinear_setup(ctx, inputs, output):
    x, qweight, scales, offsets, table, curvature, bias, bits, group_size, in_features, mode = inputs
    ctx.save_for_backward(qweight, scales, offsets, table, curvature)
    ctx.args = (bits, group_size, in_features, mode)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _qlinear_backward(ctx, grad):
    qweight, scales, offsets, table, curvature = ctx.saved_tensors
    bits, group_size, in_features, mode = ctx.args
    gx, gb = _linear_backward(ctx, grad, lambda: dequantize(
        qweight, scales, offsets, table, curvature, bits, group_size, in_features, _dequant_mode(mode),
        grad.dtype), 6)
    return gx, None, None, None, None, None, gb, None, None, None, None


qlinear.register_autograd(_qlinear_backward, setup_context=_qlinear_setup)


def _tiled_setup(ctx, inputs, output):
    x, tiled, scales, table, curvature, bias, group_size, in_features, out_features, mode = inputs
    ctx.save_for_backward(tiled, scales, table, curvature)
    ctx.args = (group_size, in_features, out_features, mode)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _tiled_backward(ctx, grad):
    from . import cuda_qlinear
    tiled, scales, table, curvature = ctx.saved_tensors
    group_size, in_features, out_features, mode = ctx.args
    gx, gb = _linear_backward(ctx, grad, lambda: dequantize(
        cuda_qlinear.untile_codes(tiled, out_features, packed_words(in_features, 4)), scales, None, table,
        curvature, 4, group_size, in_features, _dequant_mode(mode), grad.dtype), 5)
    return gx, None, None, None, None, gb, None, None, None, None


qlinear_tiled.register_autograd(_tiled_backward, setup_context=_tiled_setup)


def _mma_takes(x2, qweight, scales, offsets, table, bits, group_size, in_features, out_features=None) -> bool:
    """Whether the CUDA tensor-core kernel runs this call (4 bits, one table, 1..16 rows:
    cuda_qlinear.unsupported; tiled codes name out_features)."""
    if not x2.is_cuda or _interpreting() or cuda_refused():
        return False
    from . import cuda_qlinear
    return (cuda_qlinear.unsupported(x2, qweight, scales, offsets, table, bits, group_size, in_features,
                                     out_features) is None
            and cuda_qlinear.why_not(x2.device) is None)


def _rows(x: Tensor, in_features: int) -> Tensor:
    """x as (rows, in_features), contiguous along both (a copy only where it is not)."""
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) != in_features):
        x2 = x2.contiguous()
    return x2


def triton_linear(x, qweight, scales, offsets, table, curvature, bias, bits, group_size,
                  in_features, mode):
    """The Triton path on any device Triton runs on (CUDA; the CPU under TRITON_INTERPRET=1)."""
    from . import triton_qlinear as tq
    lead = x.shape[:-1]
    x2 = _rows(x, in_features)
    kmajor = is_kmajor(qweight)
    route, mode = choose(mode, bits, x2.shape[0], x.dtype, kmajor=kmajor,
                         per_tensor=table.shape[0] == 1 and (curvature is None or curvature.numel() == 1)
                         and scales is not None, offsets=offsets is not None, scaled=scales is not None,
                         mma=kmajor and mode.startswith("auto") and _mma_takes(x2, qweight, scales, offsets,
                                                                             table, bits, group_size, in_features))
    if route == "mma":
        from . import cuda_qlinear
        y = cuda_qlinear.qlinear(x2, qweight, scales, table, bias, group_size, in_features)
        return y.reshape(*lead, qweight.shape[0])
    if mode == "prmt":
        table = cached_registers(table)
    args = (qweight, scales, offsets, table, curvature)
    if route == "kprmt":
        from . import triton_kmajor as km
        y = km.kprmt(x2, qweight, scales, offsets, table, bias, group_size, in_features)
    elif route == "kprmt_mm":
        from . import triton_kmajor as km
        y = km.kprmt_mm(x2, qweight, scales, table, bias, group_size, in_features)
    elif route == "kbyte":
        from . import triton_kmajor as km
        y = km.kbyte(x2, qweight, scales, offsets, curvature, bias, group_size, in_features)
    elif route == "kgemv":
        from . import triton_kmajor as km
        y = km.kgemv(x2, *args, bias, bits, group_size, in_features, mode=mode)
    elif route == "words":
        y = tq.qmm_words(x2, *args, bias, bits, group_size, in_features, mode=mode)
    elif route == "gemv":
        y = tq.qgemv(x2, *args, bias, bits, group_size, in_features, mode=mode)
    else:
        w = tq.dequantize(*args, bits, group_size, in_features, x.dtype, mode=mode)
        # a module's bias keeps its own dtype (float32 beside bf16 activations): cast it, as
        # the fused kernels' epilogue does
        y = F.linear(x2, w, None if bias is None else bias.to(x2.dtype))
    return y.reshape(*lead, qweight.shape[0])
