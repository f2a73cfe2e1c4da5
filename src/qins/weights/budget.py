"""qins.quantize_to_budget: the best per-tensor mix of bit widths for a budget or a bound.

    report = quantize_to_budget(model, windows, target_bpw=5.33)     # best quality, <= 5.33 bpw
    report = quantize_to_budget(model, windows, max_kl=0.05)         # fewest bits, KL <= 0.05
    report = quantize_to_budget(model, windows, max_ppl_increase=5)  # fewest bits, ppl <= +5 %
    print(plan_table(report))

Every tensor counts: bpw is the whole model's stored bits (codes, scales, the float norms and
biases, buffers) over its weight count, embeddings and lm_head included (a tied pair once).
`size=entropy.archive.WeightCodedSize()` charges each quantized tensor its bytes in the .qins
archive instead of its raw packed bytes, so target_bpw bounds the archive (the float tensors
are still charged raw, a slight overcount; the archive's index and other files are not
counted); the report then gives both, "bpw_all" (raw) and "charged_bpw_all" (coded).
`windows` (N, T) is calibration text, never evaluation text. In a bound mode the last quarter
of it is held out: the plan is chosen from statistics of the rest, quantized, and measured on
the held-out windows; if the measurement misses the bound, the estimate is scaled by what was
measured and the plan chosen again (at most `rounds` times).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..codec.config import WeightConfig
from . import allocate as alloc
from .calibration import input_hessians
from ..metrics.memory import memory_report
from ..metrics.quality import Reference, evaluate
from ..metrics.rows import quality_row
from .plan import PLAN_ATTR
from .quantize import decoded_weights, quantize, record_plan


def _float_bits(model: nn.Module, tensors: list[alloc.Tensor]) -> tuple[float, int]:
    """(stored bits of everything that stays float, weight elements of the whole model)."""
    mem = memory_report(model)
    quantizable = sum(8 * model.get_submodule(t.name).weight.untyped_storage().nbytes() for t in tensors)
    return 8 * mem["total_bytes"] - quantizable, mem["params"]


def _measure(model_f: nn.Module, model_q: nn.Module, windows: torch.Tensor) -> dict:
    ref = Reference.build(model_f, windows, progress=False)
    with decoded_weights(model_q):
        return quality_row("check", evaluate(model_q, ref, progress=False))


def quantize_to_budget(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    target_bpw: float | None = None,
    max_kl: float | None = None,
    max_ppl_increase: float | None = None,
    candidates: list[WeightConfig] | None = None,
    include_embeddings: bool = True,
    skip=(),
    rounds: int = 3,
    progress: bool = True,
    describe: str = "calibration windows",
    sensitivity: list[alloc.Tensor] | None = None,
    size: alloc.Size | None = None,
) -> dict:
    """Quantize `model` in place to a per-tensor plan; returns the report (also on the model).

    Exactly one of target_bpw (whole-model bits per weight), max_kl (nats per token) and
    max_ppl_increase (percent) is given. `candidates` default to
    `allocate.default_candidates()`: qins 3b-g64 .. 8b-g128 with GPTQ rounding.
    `sensitivity`: the output of `measure_sensitivity` for this model, windows and
    candidates (and `size`), to share one measurement between several targets.
    `size`: the bytes charged per candidate (allocate.sensitivities); None: raw stored bytes.
    """
    given = [x is not None for x in (target_bpw, max_kl, max_ppl_increase)]
    if sum(given) != 1:
        raise ValueError("give exactly one of target_bpw, max_kl, max_ppl_increase")
    if target_bpw is not None and not 1.0 < target_bpw <= 32:
        raise ValueError(f"target_bpw must be in (1, 32], got {target_bpw}")
    if max_kl is not None and not max_kl > 0:
        raise ValueError(f"max_kl must be > 0, got {max_kl}")
    if max_ppl_increase is not None and not max_ppl_increase > 0:
        raise ValueError(f"max_ppl_increase must be > 0 (percent), got {max_ppl_increase}")
    if windows.dim() != 2 or windows.shape[0] < 1:
        raise ValueError(f"windows must be (N, T) token ids, got {tuple(windows.shape)}")
    candidates = list(candidates or alloc.default_candidates())
    for p in model.parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise ValueError("the model has NaN/Inf parameters; refusing to quantize (left unchanged)")

    bound = target_bpw is None
    if bound and windows.shape[0] >= 4:
        hold = max(1, windows.shape[0] // 4)
        fit_w, check_w = windows[:-hold], windows[-hold:]
    else:
        fit_w, check_w = windows, windows
    tensors = sensitivity if sensitivity is not None else measure_sensitivity(
        model, fit_w, candidates, include_embeddings=include_embeddings, skip=skip, progress=progress, size=size)
    if len(tensors[0].bits) != len(candidates):
        raise ValueError("`sensitivity` was measured for other candidates")
    other_bits, params = _float_bits(model, tensors)

    def build(choice, target):
        pre = {t.name: t.weights[i] for t, i in zip(tensors, choice)}
        return quantize(target, candidates[0], skip=skip, include_embeddings=include_embeddings,
                        prequantized=pre, progress=False)

    rounds_log = []
    if not bound:
        choice = alloc.allocate(tensors, max_bits=target_bpw * params - other_bits)
    else:
        # the estimate is a second-order sum; scale its bound by what measurement shows
        est_bound = max_kl if max_kl is not None else math.log1p(max_ppl_increase / 100)
        scale, choice = 1.0, None
        for r in range(rounds):
            trial = alloc.allocate(tensors, max_loss=est_bound * scale)
            q = build(trial, copy.deepcopy(model))
            m = _measure(model, q, check_w)
            del q
            est = sum(t.loss[i] for t, i in zip(tensors, trial))
            met = m["kl"] <= max_kl if max_kl is not None else m["ppl_increase_pct"] <= max_ppl_increase
            rounds_log.append({"round": r, "estimated_kl": est, "bits": _bits(tensors, trial, other_bits, params),
                               "measured": m, "met": met})
            if met:
                choice = trial
                break
            got = m["kl"] if max_kl is not None else math.log1p(max(m["ppl_increase_pct"], 1e-6) / 100)
            scale *= min(0.9, est_bound / max(got, 1e-12))
        if choice is None:
            raise ValueError(f"no plan met the bound after {rounds} rounds (the model is left unchanged): "
                             f"{rounds_log[-1]['measured']}")
    build(choice, model)

    report = {
        "mode": "target_bpw" if not bound else ("max_kl" if max_kl is not None else "max_ppl_increase"),
        "target": target_bpw if not bound else (max_kl if max_kl is not None else max_ppl_increase),
        "bpw_all": _bits(tensors, choice, other_bits, params, stored=True),
        "charged": "raw" if size is None else repr(size),
        "charged_bpw_all": _bits(tensors, choice, other_bits, params),
        "estimated_kl": sum(t.loss[i] for t, i in zip(tensors, choice)),
        "candidates": [c.label for c in candidates],
        "statistics": f"{describe}: {fit_w.shape[0]} x {fit_w.shape[1]} tokens for Hessians and Fisher",
        "check": (None if not bound else f"{describe}: last {check_w.shape[0]} window(s), held out of the statistics"
                  if check_w is not fit_w else f"{describe} (too few to hold any out)"),
        "rounds": rounds_log,
        "tensors": [{"name": t.name, "numel": t.numel, "config": candidates[i].label,
                     "bits": t.stored_bits(i), "bpw": t.stored_bits(i) / t.numel, "charged_bits": t.bits[i],
                     "estimated_kl": t.loss[i]}
                    for t, i in zip(tensors, choice)],
    }
    record_plan(model, getattr(model, PLAN_ATTR)["modules"], allocation=report)
    return report


def measure_sensitivity(model: nn.Module, windows: torch.Tensor, candidates: list[WeightConfig],
                        include_embeddings: bool = True, skip=(), progress: bool = True,
                        size: alloc.Size | None = None) -> list[alloc.Tensor]:
    """Hessians and Fisher of `model` on `windows`, then every tensor under every candidate."""
    H = input_hessians(model, windows, progress=progress)
    gains, emb_gain = alloc.fisher(model, windows, progress=progress)
    return alloc.sensitivities(model, candidates, H, gains, emb_gain, include_embeddings=include_embeddings,
                               skip=skip, progress=progress, size=size)


def _bits(tensors, choice, other_bits, params, stored: bool = False) -> float:
    """Bits per weight of a choice: charged (raw, or coded with `size`), or raw stored."""
    return (sum(t.stored_bits(i) if stored else t.bits[i] for t, i in zip(tensors, choice)) + other_bits) / params


def plan_table(report: dict) -> str:
    """The chosen plan as text: one row per layer, one column per module kind, plus totals."""
    import re
    rows: dict[str, dict[str, str]] = {}
    cols: list[str] = []
    for t in report["tensors"]:
        m = re.match(r"(.*?\.(?:layers|h|layer|blocks)\.\d+)\.(.+)$", t["name"])
        row, col = (m.group(1), m.group(2).split(".")[-1]) if m else (t["name"], "weight")
        cfg = t["config"].replace("qins-", "").replace("-gptq", "")
        rows.setdefault(row, {})[col] = cfg
        if col not in cols:
            cols.append(col)
    # a column is as wide as its name or its longest config (e.g. 4b-g128-s8), plus a space
    width = max([len(c) for c in cols] + [len(v) for cells in rows.values() for v in cells.values()]) + 1
    namew = max(len(r) for r in rows) + 1
    head = "module".ljust(namew) + "".join(c.rjust(max(width, 9)) for c in cols)
    lines = [head, "-" * len(head)]
    for r, cells in rows.items():
        lines.append(r.ljust(namew) + "".join(cells.get(c, "").rjust(max(width, 9)) for c in cols))
    coded = report.get("charged", "raw") != "raw"
    lines.append(f"whole model: {report['bpw_all']:.3f} bpw (every tensor)"
                 + (f", {report['charged_bpw_all']:.3f} bpw {report['charged']}" if coded else "")
                 + f", estimated KL {report['estimated_kl']:.4f} "
                 f"({report['mode']} {report['target']}); statistics from {report['statistics']}")
    for r in report["rounds"]:
        m = r["measured"]
        lines.append(f"  round {r['round']}: {r['bits']:.3f} bpw, estimated KL {r['estimated_kl']:.4f}, measured KL "
                     f"{m['kl']:.4f}, ppl {m['ppl_increase_pct']:+.2f}% on {report['check']}: "
                     f"{'met' if r['met'] else 'missed'}")
    return "\n".join(lines)
