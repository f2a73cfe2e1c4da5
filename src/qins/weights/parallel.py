"""Tensor parallelism for QINS modules: each rank keeps only its shard of the packed codes.

The styles are transformers' tensor-parallel plan names (`config.base_model_tp_plan`, the
model class's `_tp_plan`). transformers shards and hooks the float modules; qins cuts the
stored tensors of QINS modules (shard_module) and runs them with plain collectives
(install_forward):

    colwise, colwise_rep, colwise_gather_output     output rows [r*O/W, (r+1)*O/W):
        qweight (O, words) -> (O/W, words); scales, offsets (O, G) -> (O/W, G);
        curvature per channel (O,) -> (O/W,), per tensor (1,) kept; bias (O,) -> (O/W,)
    packed_colwise                                  the same on each of the `split_factor`
        fused parts (gate|up) separately, so rank r holds gate_r|up_r
    rowwise, rowwise_split_input, rowwise_rep       input columns [r*I/W, (r+1)*I/W), whole
        groups only: in each bit plane of a packed row (codec/packing.py) a group of g codes is
        g*w/32 whole words, so the slice is words [c0*w/32, c1*w/32) of every plane;
        scales, offsets (O, G) -> (O, G/W); curvature and bias kept (bias added once after the
        all-reduce, by transformers' hook)
    replicate                                       nothing cut

A shard keeps `in_features` / `out_features` global (transformers' hooks read them to rebuild
the full activation) and sets `weight_shape` to the local (rows, cols) the kernels decode.
A group that would straddle two ranks, a world size that does not divide the rows, a tied
lm_head or a QINSEmbedding under a sharding style: ValueError naming the module.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..codec import grid
from ..codec.packing import planes
from .linear import QINSEmbedding, QINSLinear

COLWISE = ("colwise", "colwise_rep", "colwise_gather_output")
ROWWISE = ("rowwise", "rowwise_split_input", "rowwise_rep")
PACKED_COLWISE = ("packed_colwise",)
REPLICATE = ("replicate", "local_params")


def _even(n: int, world: int, what: str, name: str) -> int:
    if n % world:
        raise ValueError(f"{name}: {what} = {n} is not divisible by the world size {world}")
    return n // world


def _cols_of_words(q: torch.Tensor, bits: int, n_pad: int, c0: int, c1: int) -> torch.Tensor:
    """Columns [c0, c1) (multiples of 32) of packed rows (R, W) -> (R, W') int32, plane by plane."""
    parts, start = [], 0
    for w in planes(bits):
        plane_words = n_pad * w // 32
        parts.append(q[:, start + c0 * w // 32: start + c1 * w // 32])
        start += plane_words
    return torch.cat(parts, dim=1)


def _keep(module: nn.Module, name: str, t: torch.Tensor | None) -> None:
    if t is not None:
        module._buffers[name] = t.contiguous().clone()       # clone: the full tensor is freed


def shard_rows(module: QINSLinear, name: str, rank: int, world: int, parts: int = 1) -> None:
    """Keep this rank's output rows (of each of `parts` fused blocks)."""
    module._untile()
    rows, cols = module.weight_shape
    block = _even(rows, parts, "the fused block count", name)
    per = _even(block, world, "out_features" if parts == 1 else "each fused block's rows", name)
    idx = torch.cat([torch.arange(p * block + rank * per, p * block + (rank + 1) * per) for p in range(parts)])
    dev = module.qweight.device
    idx = idx.to(dev)
    _keep(module, "qweight", module.qweight.index_select(0, idx))
    for b in ("scales", "offsets"):
        t = module._buffers.get(b)
        _keep(module, b, None if t is None else t.index_select(0, idx))
    c = module.curvature
    if c is not None and c.numel() > 1:                    # per channel: one per output row
        _keep(module, "curvature", c.index_select(0, idx))
    if module.bias is not None and not _is_dtensor(module.bias):
        module.bias = nn.Parameter(module.bias.data.index_select(0, idx).clone(), requires_grad=False)
    module.weight_shape = (per * parts, cols)
    module._refresh_table()


def shard_cols(module: QINSLinear, name: str, rank: int, world: int) -> None:
    """Keep this rank's input columns: whole groups, whole 32-code words."""
    module._untile()
    rows, cols = module.weight_shape
    cfg = module.config
    g = cols if cfg.group_size is None else cfg.group_size
    n_groups = grid.n_groups(cols, g)
    if cfg.group_size is None or cols % g:
        raise ValueError(f"{name}: row-wise sharding cuts the input dimension ({cols}) into whole groups, but "
                         f"its group is {'the whole row' if cfg.group_size is None else g}: a group would "
                         f"straddle ranks (quantize with a group size that divides in_features / world size)")
    per_groups = _even(n_groups, world, "the number of groups per row", name)
    per = per_groups * g
    if per % 32:
        raise ValueError(f"{name}: a rank's {per} input columns are not whole 32-code words; "
                         f"use a group size that is a multiple of 32")
    c0, c1 = rank * per, (rank + 1) * per
    n_pad = -(-cols // 32) * 32
    _keep(module, "qweight", _cols_of_words(module.qweight, cfg.bits, n_pad, c0, c1))
    for b in ("scales", "offsets"):
        t = module._buffers.get(b)
        _keep(module, b, None if t is None else t[:, rank * per_groups:(rank + 1) * per_groups])
    module.weight_shape = (rows, per)
    module._refresh_table()


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def shard_module(module: nn.Module, name: str, style: str, rank: int, world: int, split_factor: int = 2) -> None:
    """Cut one QINS module's stored tensors to rank `rank`'s shard under the plan style `style`."""
    if style in REPLICATE or world == 1:
        return
    if isinstance(module, QINSEmbedding):
        raise ValueError(f"{name}: tensor-parallel style {style!r} on a QINS embedding is not supported; "
                         f"leave the embedding in float (qins.quantize's default) or replicated")
    if not isinstance(module, QINSLinear):
        raise TypeError(f"{name} is a {type(module).__name__}, not a QINS module")
    if module.tied_to is not None:
        raise ValueError(f"{name}: a tied QINS lm_head shares its embedding's codes and cannot be sharded alone; "
                         f"quantize the model without the embedding (the lm_head then has its own codes)")
    if style in COLWISE:
        shard_rows(module, name, rank, world)
    elif style in PACKED_COLWISE:
        shard_rows(module, name, rank, world, parts=split_factor)
    elif style in ROWWISE:
        shard_cols(module, name, rank, world)
    else:
        raise ValueError(f"{name}: tensor-parallel style {style!r} is not supported for QINS modules; "
                         f"supported: {COLWISE + PACKED_COLWISE + ROWWISE + REPLICATE}")
    module._kmajor_on_cuda()          # the slices are row-major copies; CUDA kernels read K-major


def install_forward(module: QINSLinear, style: str, rank: int, world: int, group=None) -> None:
    """Run a sharded QINS module with plain torch.distributed collectives (no DTensor):

        colwise, packed_colwise        the local output features, as transformers' local path
        colwise_gather_output/_rep     all_gather of the local outputs along the last dim
        rowwise                        input already split; partial product, all_reduce, + bias
        rowwise_split_input/_rep       this rank's slice of the replicated input first

    It replaces the forward transformers' TP hook installed on the module (DTensor wrapping,
    redistribute and a Python-side Partial for every call), so a decode step is kernels and
    collectives only.
    """
    import torch.distributed as dist

    from .. import kernels

    if _is_dtensor(module.bias):               # transformers' placeholder: keep the local shard
        module.bias = nn.Parameter(module.bias.to_local(), requires_grad=False)

    def local(x, bias=True):
        return kernels.qlinear(x, module.quantized, module.bias if bias else None, weight=module._decoded)

    if style in ("colwise", "packed_colwise"):
        def forward(x, *args, **kwargs):
            return local(x)
    elif style in ("colwise_gather_output", "colwise_rep"):
        def forward(x, *args, **kwargs):
            y = local(x).contiguous()
            parts = [torch.empty_like(y) for _ in range(world)]
            dist.all_gather(parts, y, group=group)
            return torch.cat(parts, dim=-1)
    elif style in ROWWISE:
        split = style != "rowwise"
        per = module.weight_shape[1]

        def forward(x, *args, **kwargs):
            if split:
                x = x[..., rank * per:(rank + 1) * per].contiguous()
            y = local(x, bias=False)
            dist.all_reduce(y, group=group)
            return y if module.bias is None else y + module.bias
    else:
        return
    module.forward = forward


def plan_matches(plan: dict[str, str], name: str) -> str | None:
    """The style of the most specific plan key that names module `name` ("*" = a layer number)."""
    best = None
    for key, style in plan.items():
        if re.fullmatch(re.escape(key).replace(r"\*", r"\d+"), name):
            if best is None or len(key) > len(best[0]):
                best = (key, style)
    return None if best is None else best[1]


def shard_qins_modules(model: nn.Module, plan: dict[str, str], rank: int, world: int,
                       group=None, forward: bool = False) -> list[str]:
    """Cut every QINS module the plan names to this rank's shard; returns their names.

    `plan` uses full module names (transformers' `model.tp_plan`, which prefixes the base
    model's plan). QINS modules the plan does not name stay whole (replicated). `forward`:
    also install_forward on each, with collectives over `group`."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside the world size {world}")
    done = []
    for name, m in list(model.named_modules()):
        if not isinstance(m, (QINSLinear, QINSEmbedding)):
            continue
        style = plan_matches(plan, name)
        if style is None:
            continue
        shard_module(m, name, style, rank, world)
        if forward and world > 1 and style not in REPLICATE:
            install_forward(m, style, rank, world, group)
        done.append(name)
    return done


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the QINS buffers this process holds (codes, scales, offsets, curvature)."""
    return sum(t.numel() * t.element_size() for m in model.modules() if isinstance(m, (QINSLinear, QINSEmbedding))
               for t in m.buffers(recurse=False) if t is not None)
