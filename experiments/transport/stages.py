"""Staged application of Pattern B to a decoder model, its calibration, and its layer errors.

Stages (the seed's Phases 2 and 5, in the order it plans them):

    v-one     one decoder layer's v_proj (default: the middle layer)
    v-all     every v_proj
    down      every MLP's down_proj (the MLP input side stays float)
    gate-up   every MLP's gate_proj + up_proj (one E(x), two D before SiLU)
    mlp       every whole MLP (gate+up, decode, SiLU * up, re-encode, down)
    all       every v_proj and every whole MLP (the seed's V path + MLP)

Each transported layer is calibrated on the FLOAT model's own activations (operating points
from calibration tokens), never on an already transported model's, so stages only differ
in what they replace.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from qins.weights.swap import replace_module

from qins.codec.qins import SEED_ALPHA
from .jacobian import OperatingPoint
from .native import QINSNativeLinear, QINSNativeMLP

STAGES = ("v-one", "v-all", "down", "gate-up", "mlp", "all")
_MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LayerSites:
    """Module names of one decoder layer: its value projection and its gated MLP."""
    index: int
    v_proj: str
    mlp: str


def find_sites(model: nn.Module) -> list[LayerSites]:
    """The v_proj and gated MLP of every decoder layer, in layer order (Llama-style models)."""
    v, mlp = {}, {}
    for name, mod in model.named_modules():
        m = re.search(r"\.(\d+)\.(self_attn\.v_proj|mlp)$", name)
        if not m:
            continue
        i = int(m.group(1))
        if m.group(2) == "mlp":
            if all(isinstance(getattr(mod, p, None), nn.Linear) for p in _MLP_PROJ) and hasattr(mod, "act_fn"):
                mlp[i] = name
        elif isinstance(mod, nn.Linear):
            v[i] = name
    layers = sorted(set(v) & set(mlp))
    if not layers:
        raise TypeError(f"{type(model).__name__}: no decoder layers with self_attn.v_proj and a gated MLP "
                        "(gate_proj, up_proj, down_proj, act_fn); Pattern B transport supports Llama-style models")
    return [LayerSites(i, v[i], mlp[i]) for i in layers]


def _targets(sites: list[LayerSites]) -> list[str]:
    """Names of every linear layer a stage may transport."""
    return [n for s in sites for n in (s.v_proj, *(f"{s.mlp}.{p}" for p in _MLP_PROJ))]


@torch.inference_mode()
def operating_points(model: nn.Module, windows: torch.Tensor, sites: list[LayerSites] | None = None,
                     batch_size: int = 4, progress: bool = True) -> dict[str, OperatingPoint]:
    """{linear name: OperatingPoint} of every v_proj and MLP projection over `windows` (N, T)."""
    sites = sites or find_sites(model)
    acc: dict[str, list] = {}
    hooks = []

    def make_hook(name):
        def hook(mod, args, out):
            x = args[0].detach().double().reshape(-1, mod.in_features)          # (N, I)
            y = out.detach().double().reshape(-1, mod.out_features)             # (N, O)
            if mod.bias is not None:
                y = y - mod.bias.double()                           # the transport sees W x only
            s = acc.setdefault(name, [0.0, 0.0, torch.zeros(mod.out_features, dtype=torch.float64), 0])
            s[0] = s[0] + x.abs().sum(0).cpu()
            s[1] = s[1] + y.abs().sum(0).cpu()
            s[2] = torch.maximum(s[2], y.abs().amax(0).cpu())
            s[3] += x.shape[0]
        return hook

    for name in _targets(sites):
        hooks.append(model.get_submodule(name).register_forward_hook(make_hook(name)))
    forward_windows(model, windows, batch_size, "operating points", progress, handles=hooks)
    return {n: OperatingPoint(s[0] / s[3], s[1] / s[3], s[2], s[3]) for n, s in acc.items()}


def build_stage(model: nn.Module, stage: str, ops: dict[str, OperatingPoint], variant: str = "first-order",
                alpha: float = SEED_ALPHA, signs: str = "carry", layer: int | None = None,
                sites: list[LayerSites] | None = None) -> dict[str, nn.Module]:
    """{module name: replacement} for `stage` (STAGES); `layer` picks v-one's layer (default: middle)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    sites = sites or find_sites(model)
    kw = dict(variant=variant, alpha=alpha, signs=signs)
    out: dict[str, nn.Module] = {}
    if stage == "v-one":
        idx = [s.index for s in sites]
        layer = idx[len(idx) // 2] if layer is None else layer
        if layer not in idx:
            raise ValueError(f"layer {layer} is not a decoder layer index ({idx[0]}..{idx[-1]})")
        chosen = [s for s in sites if s.index == layer]
    else:
        chosen = sites
    if stage in ("v-one", "v-all", "all"):
        for s in chosen:
            out[s.v_proj] = QINSNativeLinear.from_float(model.get_submodule(s.v_proj), ops[s.v_proj], **kw)
    if stage in ("down", "gate-up", "mlp", "all"):
        gate_up, down = stage != "down", stage != "gate-up"
        for s in chosen:
            mlp = model.get_submodule(s.mlp)
            mlp_ops = {p: ops[f"{s.mlp}.{p}"] for p in _MLP_PROJ}
            out[s.mlp] = QINSNativeMLP.from_mlp(mlp, mlp_ops, gate_up=gate_up, down=down, **kw)
    return out


@contextlib.contextmanager
def applied(model: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[nn.Module]:
    """Swap the replacements in for the duration of the block; the float modules come back after."""
    old: dict[str, nn.Module] = {}
    try:
        for name, new in replacements.items():
            old[name] = replace_module(model, name, new)
        yield model
    finally:
        for name, mod in old.items():
            replace_module(model, name, mod)


@torch.inference_mode()
def unit_errors(model: nn.Module, windows: torch.Tensor, candidates: dict[str, dict[str, nn.Module]],
                batch_size: int = 4, progress: bool = True) -> dict[str, dict[str, float]]:
    """Relative output error of candidate replacements on the float model's own inputs.

    candidates  {module name: {key: replacement}}; each replacement sees the exact input of the
                float module in a run of the float model over `windows` (N, T).
    Returns {key: {module name: ||y_hat - y||_F / ||y||_F}} over every token of `windows`.
    """
    err: dict[tuple[str, str], list[float]] = {}
    hooks = []

    def make_hook(name, cands):
        def hook(_mod, args, out):
            y = out.detach().double()
            ref = float(y.pow(2).sum())
            for key, cand in cands.items():
                d = float((cand(args[0]).double() - y).pow(2).sum())
                e = err.setdefault((key, name), [0.0, 0.0])
                e[0] += d
                e[1] += ref
        return hook

    for name, cands in candidates.items():
        hooks.append(model.get_submodule(name).register_forward_hook(make_hook(name, cands)))
    forward_windows(model, windows, batch_size, "layer errors", progress, handles=hooks)
    out: dict[str, dict[str, float]] = {}
    for (key, name), (d, ref) in err.items():
        out.setdefault(key, {})[name] = (d / ref) ** 0.5 if ref > 0 else float("inf") if d > 0 else 0.0
    return out


def forward_windows(model, windows, batch_size: int = 4, desc: str = "forward", progress: bool = True,
                    handles=()) -> None:
    """Run `model` over (N, T) token windows in batches, without a KV cache, for its hooks.

    `handles` (hook handles the caller registered) are removed afterwards, also on error.
    """
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for i in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
                model(input_ids=windows[i:i + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
