"""The gate experiment: every stage x variant, measured against the float model in one process.

    tok, model = qins.load_default_model()
    doc = run_gates(tok, model, Protocol(windows=4, prompts=32, new_tokens=64, calibration_windows=3))
    print(markdown_gate_table(doc["rows"]))

Data (DESIGN.md protocol): calibration windows are the FIRST `calibration_windows` windows of
the corpus; all but the last set the operating points, the last is held out for the layer
errors. Perplexity, KL and top-1 use the LAST `windows` windows; greedy token match uses
`prompts` x `new_tokens` (Harness). The model is transported in place for each row and
restored after; the float reference is computed before anything is swapped in.
"""
from __future__ import annotations

import math
import time
from typing import Callable

from torch import nn

from qins.codec.qins import SEED_ALPHA
from .counter import decode_ops
from .gates import GATES, verdict
from .jacobian import VARIANTS
from .stages import STAGES, applied, build_stage, find_sites, operating_points, unit_errors

_MLP_KIND = {"down": "down", "gate-up": "gate-up", "mlp": "mlp", "all": "mlp"}


def _candidates(model, stages, ops, variant, alpha, signs, sites) -> dict[str, dict[str, nn.Module]]:
    """{kind: {module name: replacement}}: "v" (every v_proj) and each MLP kind the stages need."""
    kinds: dict[str, dict[str, nn.Module]] = {}
    if any(s in ("v-one", "v-all", "all") for s in stages):
        kinds["v"] = build_stage(model, "v-all", ops, variant, alpha, signs, sites=sites)
    for s in stages:
        k = _MLP_KIND.get(s)
        if k and k not in kinds:
            kinds[k] = build_stage(model, k, ops, variant, alpha, signs, sites=sites)
    return kinds


def _stage_modules(stage: str, kinds: dict[str, dict[str, nn.Module]], v_one: str) -> dict[str, nn.Module]:
    if stage == "v-one":
        return {v_one: kinds["v"][v_one]}
    if stage == "v-all":
        return dict(kinds["v"])
    if stage == "all":
        return {**kinds["v"], **kinds["mlp"]}
    return dict(kinds[_MLP_KIND[stage]])


def _stage_errors(stage: str, errs: dict[str, dict[str, float]], modules: dict[str, nn.Module]) -> list[float]:
    out = []
    for name in modules:
        kind = "v" if name.endswith("v_proj") else _MLP_KIND[stage]
        out.append(errs[kind][name])
    return out


def run_gates(tok, model: nn.Module, protocol=None, stages=STAGES, variants=VARIANTS,
              alphas=(SEED_ALPHA,), signs: str = "carry", layer: int | None = None, text: str | None = None,
              error_only: bool = False, progress: bool = True,
              on_row: Callable[[list[dict]], None] | None = None) -> dict:
    """Measure each (alpha, variant, stage): layer error, decode ops, and unless `error_only`
    perplexity, KL, top-1 and greedy token match against the float model; with gate verdicts.

    Returns {"meta": {...}, "rows": [...]}; `on_row(rows)` is called after every row.
    """
    from qins.eval.harness import Harness, Protocol
    from qins.metrics.quality import token_windows
    from qins.metrics.models import default_corpus

    protocol = protocol or Protocol(windows=4, prompts=32, new_tokens=64, calibration_windows=3)
    if protocol.calibration_windows < 2:
        raise ValueError("transport needs calibration_windows >= 2: operating points from all but the last, "
                         "layer errors on the last (held out)")
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ValueError(f"unknown stage(s) {bad}; choose from {STAGES}")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"unknown variant(s) {bad}; choose from {VARIANTS}")
    t0 = time.perf_counter()
    sites = find_sites(model)
    idx = [s.index for s in sites]
    layer = idx[len(idx) // 2] if layer is None else layer
    if layer not in idx:
        raise ValueError(f"layer {layer} is not a decoder layer index ({idx[0]}..{idx[-1]})")
    v_one = next(s.v_proj for s in sites if s.index == layer)

    if error_only:
        h = None
        wins = token_windows(tok, text if text is not None else default_corpus(), protocol.window)
        calib = wins[:protocol.calibration_windows]
        meta = {"protocol": {"calibration_windows": protocol.calibration_windows, "window": protocol.window},
                "eval": "layer errors and decode ops only (no perplexity, KL or token match)"}
    else:
        h = Harness(tok, model, protocol, text=text, progress=progress)
        h.reference_generations()                  # of the float model, before any swap
        calib = h.calibration_windows
        meta = h.describe()
    n_cal = calib.shape[0] - 1
    meta.update({
        "operating_points": f"calibration windows 0..{n_cal - 1} ({n_cal * protocol.window} tokens)",
        "held_out_layer_errors": f"calibration window {n_cal} ({protocol.window} tokens)",
        "signs": signs, "alphas": list(alphas), "v_one_layer": layer, "layers": len(sites),
    })
    ops = operating_points(model, calib[:-1], sites, protocol.batch_size, progress)
    meta["pattern_a"] = decode_ops(model)
    pa = meta["pattern_a"]["decode_ops"]

    rows: list[dict] = []
    for alpha in alphas:
        for variant in variants:
            kinds = _candidates(model, stages, ops, variant, alpha, signs, sites)
            by_site: dict[str, dict[str, nn.Module]] = {}
            for kind, mods in kinds.items():
                for name, mod in mods.items():
                    by_site.setdefault(name, {})[kind] = mod
            errs = unit_errors(model, calib[-1:], by_site, protocol.batch_size, progress)   # {kind: {name: err}}
            for stage in stages:
                mods = _stage_modules(stage, kinds, v_one)
                e = _stage_errors(stage, errs, mods)
                sg = "ignore" if variant == "seed" else signs
                label = f"{stage} / {variant}" + ("" if sg == "carry" or variant == "seed" else f" ({sg} signs)") \
                    + ("" if len(alphas) == 1 else f" / alpha={alpha:g}")
                row = {"stage": stage, "variant": variant, "signs": sg, "alpha": alpha, "units": len(mods),
                       "rel_err": sum(e) / len(e), "rel_err_max": max(e)}
                with applied(model, mods):
                    row.update(decode_ops(model))
                    if h is not None:
                        q = h.measure(model, label)
                        row.update({k: q[k] for k in ("ppl", "ppl_ref", "ppl_increase_pct", "kl", "top1", "windows",
                                                      "tokens", "match", "identical", "sequences",
                                                      "first_divergence", "seconds")})
                row["label"] = label
                row["gate"] = verdict(stage, row, pa)
                rows.append(row)
                if on_row is not None:
                    on_row(rows)
            del kinds
    meta["seconds"] = time.perf_counter() - t0
    return {"meta": meta, "rows": rows}


# -- tables ---------------------------------------------------------------------------------
COLUMNS = ("stage", "variant", "rel. err mean / max", "token match", "identical", "1st div.", "Δppl %",
           "KL", "top-1 %", "decode ops (W + A) / enc", "gate", "verdict")


def _fmt(v, spec):
    if v is None:
        return "–"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec)


def _cells(r: dict) -> list[str]:
    gate = "; ".join(f"{k} {_fmt(c['threshold'], '.3g')}" for k, c in r["gate"]["checks"].items())
    variant = r["variant"] + ("" if r["variant"] == "seed" or r["signs"] == "carry" else f" ({r['signs']} signs)")
    if "alpha" in r and r["alpha"] != SEED_ALPHA:
        variant += f", α={r['alpha']:g}"
    return [
        r["stage"], variant,
        f"{_fmt(r['rel_err'], '.3g')} / {_fmt(r['rel_err_max'], '.3g')}",
        _fmt(None if r.get("match") is None else 100 * r["match"], ".1f"),
        "–" if r.get("identical") is None else f"{r['identical']}/{r['sequences']}",
        _fmt(r.get("first_divergence"), ".1f"),
        _fmt(r.get("ppl_increase_pct"), "+.2f" if abs(r.get("ppl_increase_pct") or 0) < 1e4 else "+.1e"),
        _fmt(r.get("kl"), ".3g"),
        _fmt(None if r.get("top1") is None else 100 * r["top1"], ".1f"),
        f"{r['decode_ops']} ({r['weight_decodes']} + {r['activation_decodes']}) / {r['activation_encodes']}",
        gate, r["gate"]["verdict"].upper(),
    ]


def markdown_gate_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def print_gate_table(rows: list[dict], title: str = "") -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    t = Table(title=title or None)
    for c in COLUMNS:
        t.add_column(c, justify="left" if c in ("stage", "variant", "gate") else "right")
    for r in rows:
        t.add_row(*_cells(r))
    Console(width=200 if not sys.stdout.isatty() else None).print(t)


def describe_gates() -> str:
    """One line per stage: its thresholds (for the README and --help)."""
    return "; ".join(f"{s}: " + ", ".join(f"{k} {v:.3g}" for k, v in g.items()) for s, g in GATES.items())


__all__ = ["run_gates", "markdown_gate_table", "print_gate_table", "describe_gates"]
