"""`qins demo`: compress the embedded model, measure it against the float model, write a report."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..codec.config import WeightConfig
from ..metrics.render import plot_frontier, print_table, write_json, write_markdown
from .harness import Harness, Protocol

DEMO_CONFIGS = (
    WeightConfig("qins", 8, 128),
    WeightConfig("int-asym", 8, 128),
    WeightConfig("qins-seed", 8, None),
    WeightConfig("qins", 4, 64),
    WeightConfig("nf4", 4, 64),
)
# measured with calibration text (the corpus's first windows): GPTQ rounding
DEMO_CALIBRATED = (WeightConfig("qins", 4, 64, rounding="gptq"),)
ROUNDTRIP = WeightConfig("qins", 4, 64)                 # saved, reloaded, compared bit for bit


def run_demo(out_dir: str | Path = "runs/demo", protocol: Protocol | None = None, progress: bool = True,
             command: str = "qins demo") -> dict:
    """Measure DEMO_CONFIGS on the default model, check a save/load round trip, write a report."""
    from tqdm.auto import tqdm

    from ..metrics.models import DEFAULT_MODEL_NAME, load_default_model
    from ..weights.serialization import load, save

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    protocol = protocol or Protocol(windows=8, prompts=32, new_tokens=64, calibration_windows=8)
    tok, model = load_default_model()
    h = Harness(tok, model, protocol, progress=progress)
    jobs = [(c, False) for c in DEMO_CONFIGS] + [(c, True) for c in DEMO_CALIBRATED if protocol.calibration_windows]
    jobs.sort(key=lambda j: -j[0].bits)                  # 8-bit rows first, as in compare
    rows, same, saved, disk = [], None, None, 0
    for cfg, calibrated in tqdm(jobs, desc="demo", disable=not progress):
        roundtrip = cfg == ROUNDTRIP and not calibrated
        out = h.measure_config(cfg, match=cfg.bits == 8, calibrated=calibrated, keep=roundtrip)
        if roundtrip:
            # the saved model gives bit-identical logits to the in-memory one
            row, variant = out
            saved = save(variant, out_dir / cfg.label, tokenizer=tok)
            reloaded = load(saved)
            ids = h.eval_windows[:1]
            with torch.inference_mode():
                same = torch.equal(variant(ids).logits, reloaded(ids).logits)
            disk = sum(f.stat().st_size for f in saved.iterdir() if f.is_file())
            del variant, reloaded
        else:
            row = out
        rows.append(row)

    meta = h.describe()
    meta["model"] = DEFAULT_MODEL_NAME
    meta["roundtrip"] = {"path": str(saved), "bit_identical_logits": same, "disk_bytes": disk}
    meta["seconds"] = time.perf_counter() - t0
    write_json(out_dir / "results.json", {"meta": meta, "rows": rows})
    write_markdown(out_dir / "report.md", "qins demo: compressed vs float SmolLM2-135M-Instruct", meta, rows, command)
    plot_frontier(rows, out_dir)
    print_table(rows, title=f"qins demo — {meta['eval_windows']}; float ppl {meta['ppl_ref']:.3f}")
    print(f"save -> load of {saved}: bit-identical logits: {same}; {disk / 1e6:.1f} MB on disk")
    print(f"report: {out_dir / 'report.md'}  ({meta['seconds']:.0f} s)")
    return {"meta": meta, "rows": rows}
