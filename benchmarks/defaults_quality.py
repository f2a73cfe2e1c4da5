"""Which `qins compress` defaults: quality on the default model, size on Phi-3.5-mini's shapes.

    python benchmarks/defaults_quality.py [--configs 4:64+6:128 4:128+5:128 ...]
        [--rounding gptq nearest] [--windows 12] [--json FILE]

Each config is LINEAR_BITS:GROUP+EMBEDDING_BITS:GROUP (qins format, clip search, per-tensor
curvature; a part ending in "s8", e.g. 4:64s8, stores its scales as log8), quantized as `qins compress` does it: the float32 model, GPTQ Hessians from the
FIRST 8 windows x 512 tokens of the default corpus (the CPython documentation topics),
embeddings and the tied lm_head with the same rounding, float tensors rounded to bfloat16
(what `qins compress` stores) and computed in float32.

Evaluation is on text of OTHER kinds than the calibration text, never the same windows:
  code    the first windows of the running Python's `argparse.py` (Python source)
  legal   the first windows of the GNU GPL v3 text (/usr/share/common-licenses/GPL-3, Debian;
          any --legal FILE instead)
Per text: KL(p_float || p_quant) and top-1 agreement per 512-token window; the table gives the
mean, its standard error over windows, and the paired difference from the first config of the
same rounding with a 95% interval (t over windows). A noise row re-runs the first config with calibration windows
8..15 instead of 0..7: the spread a different calibration sample alone causes.

Size: bytes of model.safetensors' tensors that `qins compress --stream` writes for the full
Phi-3.5-mini shapes (benchmarks/stream_size.py's method: the plan and output specs on the meta
skeleton), and bpw all-in of the default model on disk (the same method at its config).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shlex
import sys
import sysconfig
import time
from datetime import date
from pathlib import Path

import torch

from qins.codec.config import WeightConfig
from qins.metrics.memory import memory_report
from qins.metrics.models import default_corpus, load_model
from qins.metrics.quality import Reference, evaluate, token_windows
from qins.weights.calibration import input_hessians
from qins.weights.quantize import quantize

DEFAULT_CONFIGS = ["4:64+6:128", "4:128+5:128", "4:128+6:128", "4:128+4:128"]
T_975 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26, 11: 2.23,
         12: 2.20, 13: 2.18, 14: 2.16, 15: 2.14, 16: 2.13}


def parse_config(spec: str, rounding: str) -> tuple[WeightConfig, WeightConfig]:
    """BITS:GROUP+EBITS:EGROUP, a part ending in "s8" with log8 scales (codec/scales.py)."""
    def one(part: str) -> tuple[int, int, str]:
        dt = "log8" if part.endswith("s8") else "float16"
        b, g = map(int, part.removesuffix("s8").split(":"))
        return b, g, dt
    (b, g, dt), (eb, eg, edt) = map(one, spec.split("+"))
    cfg = WeightConfig("qins", b, g, rounding=rounding, scale_dtype=dt)
    return cfg, cfg.replace(bits=eb, group_size=eg, scale_dtype=edt)


def phi35_bytes(cfg: WeightConfig, emb: WeightConfig) -> tuple[int, int]:
    """(tensor bytes of the streamed model.safetensors, parameters) at Phi-3.5-mini's shapes."""
    from qins.eval.synthetic_checkpoint import phi35_mini_config
    return disk_bytes(phi35_mini_config(), cfg, emb)


def disk_bytes(hf_config, cfg: WeightConfig, emb: WeightConfig) -> tuple[int, int]:
    """(tensor bytes of model.safetensors as saved, parameters) of a model of `hf_config`
    (bf16 float tensors; log8 scales as stored, not as held in memory)."""
    from qins.weights.stream import predicted_bytes
    return predicted_bytes(hf_config, cfg, embeddings=emb)


def per_window(model, ref: Reference) -> list[dict]:
    out = []
    for i in range(ref.windows.shape[0]):
        r = Reference(windows=ref.windows[i:i + 1], logprobs=[ref.logprobs_slice(i, i + 1)], nll=ref.nll, ppl=ref.ppl)
        out.append(evaluate(model, r, batch_size=1, progress=False))
    return out


def summarize(rows: list[dict], base: list[dict] | None, ref: Reference) -> dict:
    n = len(rows)
    kl = [r["kl"] for r in rows]
    top1 = [r["top1"] for r in rows]
    nll = sum(r["nll"] for r in rows) / n                   # equal tokens per window
    s = {"kl": sum(kl) / n, "kl_se": _se(kl), "top1": sum(top1) / n, "top1_se": _se(top1),
         "ppl": math.exp(nll), "dppl_pct": 100 * (math.exp(nll) / ref.ppl - 1), "windows": n}
    if base is not None:
        d = [a["kl"] - b["kl"] for a, b in zip(rows, base)]
        t = [a["top1"] - b["top1"] for a, b in zip(rows, base)]
        q = T_975.get(n, 2.0)
        s.update(dkl=sum(d) / n, dkl_ci=q * _se(d), dtop1=sum(t) / n, dtop1_ci=q * _se(t))
    return s


def _se(xs: list[float]) -> float:
    n = len(xs)
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n) if n > 1 else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="BITS:GROUP+EBITS:EGROUP; first = baseline")
    ap.add_argument("--rounding", nargs="+", default=["gptq", "nearest"], choices=("gptq", "nearest"))
    ap.add_argument("--windows", type=int, default=12, help="evaluation windows of 512 tokens per text")
    ap.add_argument("--calibration-windows", type=int, default=8)
    ap.add_argument("--legal", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--no-noise-row", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    tok, model = load_model(None, dtype="float32")
    ncal = a.calibration_windows
    corpus = token_windows(tok, default_corpus(), 512, max_windows=2 * ncal)
    cal = {"0..%d" % (ncal - 1): corpus[:ncal]}
    if not a.no_noise_row:
        cal[f"{ncal}..{2 * ncal - 1}"] = corpus[ncal:2 * ncal]
    argparse_py = Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"
    texts = {"code": argparse_py, "legal": Path(a.legal)}
    refs = {}
    for name, path in texts.items():
        wins = token_windows(tok, path.read_text(encoding="utf-8"), 512, max_windows=a.windows)
        if wins.shape[0] < a.windows:
            raise SystemExit(f"{path}: only {wins.shape[0]} windows of 512 tokens")
        refs[name] = Reference.build(model, wins, 4, progress=False)
        print(f"{name}: {path}, {wins.shape[0]} windows, reference ppl {refs[name].ppl:.3f}", flush=True)
    hess = {k: None for k in cal}
    results = []
    for rounding in a.rounding:
        base_rows = None
        runs = [(c, next(iter(cal))) for c in a.configs]
        if rounding == "gptq" and not a.no_noise_row:
            runs.insert(1, (a.configs[0], list(cal)[1]))
        for spec, cal_name in runs:
            cfg, emb = parse_config(spec, rounding)
            stats = None
            if rounding == "gptq":
                if hess[cal_name] is None:
                    hess[cal_name] = input_hessians(model, cal[cal_name], progress=False)
                stats = hess[cal_name]
            t0 = time.perf_counter()
            q = copy.deepcopy(model)
            quantize(q, cfg, embeddings=emb, calibration=stats, progress=False)
            with torch.no_grad():
                for p in q.parameters():              # what `qins compress` stores: bf16 float tensors
                    p.copy_(p.to(torch.bfloat16).to(p.dtype))
            qs = time.perf_counter() - t0
            mem = memory_report(q)
            nbytes, nparams = phi35_bytes(cfg, emb)
            dbytes, dparams = disk_bytes(model.config, cfg, emb)
            row = {"config": spec, "rounding": rounding, "calibration_windows": cal_name if stats is not None else None,
                   "default_model_bpw_held": mem["bpw_all"], "default_model_bpw_all": 8 * dbytes / dparams,
                   "phi35_bytes": nbytes, "phi35_gb": nbytes / 1e9,
                   "phi35_bpw_all": 8 * nbytes / nparams, "quantize_s": qs, "texts": {}}
            per = {}
            for name, ref in refs.items():
                per[name] = per_window(q, ref)
                row["texts"][name] = summarize(per[name], None if base_rows is None else base_rows[name], ref)
            if base_rows is None:
                base_rows = per
            row["per_window"] = {k: [{"kl": r["kl"], "top1": r["top1"], "nll": r["nll"]} for r in v]
                                 for k, v in per.items()}
            results.append(row)
            del q
            print(json.dumps({k: v for k, v in row.items() if k != "per_window"}), flush=True)
    doc = {"command": "python benchmarks/defaults_quality.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])),
           "date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}, "
           f"{torch.get_num_threads()} torch threads", "torch": torch.__version__,
           "texts": {k: str(v) for k, v in texts.items()}, "reference_ppl": {k: r.ppl for k, r in refs.items()},
           "seconds": time.perf_counter() - t_start, "rows": results}
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=1))
    print(table(doc))


def table(doc: dict) -> str:
    lines = ["| linears + embeddings | rounding | calibration windows | Phi-3.5 GB | default model bpw on disk | "
             + " | ".join(f"{t} KL (± s.e.) | {t} ΔKL vs first (95%) | {t} top-1 % | {t} Δtop-1 pts (95%) | {t} Δppl %"
                         for t in doc["texts"])
             + " |", "|" + "---|" * (5 + 5 * len(doc["texts"]))]
    for r in doc["rows"]:
        cells = [r["config"], r["rounding"], r["calibration_windows"] or "-", f"{r['phi35_gb']:.3f}",
                 f"{r['default_model_bpw_all']:.3f}"]
        for t in doc["texts"]:
            s = r["texts"][t]
            cells += [f"{s['kl']:.4f} ± {s['kl_se']:.4f}",
                      f"{s['dkl']:+.4f} ± {s['dkl_ci']:.4f}" if "dkl" in s else "-",
                      f"{100 * s['top1']:.2f}",
                      f"{100 * s['dtop1']:+.2f} ± {100 * s['dtop1_ci']:.2f}" if "dtop1" in s else "-",
                      f"{s['dppl_pct']:+.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
