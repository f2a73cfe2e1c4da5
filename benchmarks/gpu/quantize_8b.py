"""How long does qins take to quantize a Llama-3-8B-shaped model on one GPU (issue 11)?

Builds the model from a transformers LlamaConfig with Llama-3-8B's shapes (32 layers, hidden
4096, intermediate 14336, 32 heads / 8 KV heads, vocab 128256, untied head) and random
weights, directly on the device in bf16 (no download), then times

    qins4      data-free qins.quantize, qins 4-bit g64          (target: <= 2 min on an H200)
    qins8      data-free qins.quantize, qins 8-bit g128         (target: <= 2 min)
    gptq4      input_hessians on --windows windows of 512 random token ids, then qins.quantize
               with qins 4-bit g64 rounding="gptq"               (target: <= 15 min for 128)

as `qins compress --rounding gptq` drives them (qins.weights.calibration.input_hessians, then
qins.quantize(..., calibration=H)). The lm_head stays in float, as `qins compress` leaves it.
Each run quantizes a copy of the float model, except the last, which quantizes the model
itself. Times are wall seconds between torch.cuda.synchronize() calls; memory is
torch.cuda.max_memory_allocated over the run (the float model included).

GPTQ holds every layer's Hessian at once (qins.weights.calibration): for these shapes 65.6 GB
of float64 sums while collecting and 32.8 GB of float32 matrices after, beside the 16 GB model.

    python benchmarks/gpu/quantize_8b.py                      # on a CUDA machine, repo root
    python benchmarks/gpu/quantize_8b.py --runs gptq4 --windows 128
    python benchmarks/gpu/quantize_8b.py --tiny --json /tmp/q.json   # CPU smoke run, seconds

Writes $OUT/quantize_8b.json if OUT is set, else the --json path, and prints a table.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import time
from datetime import date, datetime, timezone
from pathlib import Path

import torch

# Llama-3-8B's shapes; --tiny: 2 layers at hidden 256 with the same ratios, for the CPU
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 tie_word_embeddings=False)
TINY = dict(LLAMA3_8B, hidden_size=256, intermediate_size=896, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, vocab_size=1024)
RUNS = {
    "qins4": dict(format="qins", bits=4, group_size=64),
    "qins8": dict(format="qins", bits=8, group_size=128),
    "gptq4": dict(format="qins", bits=4, group_size=64, rounding="gptq"),
}


def build_model(shapes: dict, device: torch.device, seed: int = 0):
    """A LlamaForCausalLM with random bf16 weights, made on `device` (no float32 copy)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(**shapes)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


class Clock:
    """Wall seconds and peak device memory of a block, synchronized on CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        self.peak_gb = torch.cuda.max_memory_allocated() / 1e9 if self.cuda else None


def run(args) -> dict:
    import qins
    from qins.metrics.memory import memory_report
    from qins.weights.calibration import input_hessians

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here: use --tiny (CPU) or run on the GPU machine")
    torch.backends.cuda.matmul.allow_tf32 = False            # the library's numerics, not TF32
    shapes = dict(TINY if args.tiny else LLAMA3_8B)
    if args.layers is not None:
        shapes["num_hidden_layers"] = args.layers
    clock = Clock(device)
    with clock:
        model = build_model(shapes, device)
    n_params = sum(p.numel() for p in model.parameters())
    out = {
        "question": "seconds and peak memory of qins quantization of a Llama-3-8B-shaped model",
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *args.argv]),
        "date": date.today().isoformat(),
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()}, "
                                                                                    f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "qins": qins.__version__,
        "model": {"shapes": shapes, "params": n_params, "dtype": "bfloat16", "build_seconds": clock.seconds},
        "runs": [],
    }
    try:
        import transformers
        out["transformers"] = transformers.__version__
    except ImportError:
        pass

    names = list(args.runs)
    for k, name in enumerate(names):
        cfg = qins.WeightConfig(**RUNS[name])
        last = k == len(names) - 1
        target = model if last else copy.deepcopy(model)        # the last run needs no copy
        row = {"run": name, "config": cfg.label}
        stats = None
        if cfg.rounding == "gptq":
            g = torch.Generator().manual_seed(1)
            windows = torch.randint(0, shapes["vocab_size"], (args.windows, args.window), generator=g)
            with clock:
                stats = input_hessians(target, windows, batch_size=args.batch_size, progress=args.progress)
            distinct = {id(t): t for t in stats.values()}.values()
            row.update(windows=args.windows, window=args.window, hessian_seconds=clock.seconds,
                       hessian_peak_gb=clock.peak_gb,
                       hessian_bytes=sum(t.numel() * t.element_size() for t in distinct))
        with clock:
            qins.quantize(target, cfg, calibration=stats, progress=args.progress)
        mem = memory_report(target)
        row.update(quantize_seconds=clock.seconds, peak_gb=clock.peak_gb,
                   seconds=clock.seconds + row.get("hessian_seconds", 0.0),
                   quantized_bpw=mem["quantized_bpw"], quantized_weights=mem["quantized_weights"])
        out["runs"].append(row)
        print(_row_line(row), flush=True)
        del target, stats
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _row_line(r: dict) -> str:
    peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}"
    line = f"{r['run']:6s} {r['config']:18s} {r['seconds']:9.1f} s   quantize {r['quantize_seconds']:8.1f} s" \
           f"   peak {peak:>6s} GB   {r['quantized_bpw']:.3f} bpw"
    if "hessian_seconds" in r:
        line += (f"   (Hessians: {r['windows']} x {r['window']} tokens, {r['hessian_seconds']:.1f} s, "
                 f"{r['hessian_bytes'] / 1e9:.1f} GB)")
    return line


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; --tiny: 2)")
    ap.add_argument("--windows", type=int, default=None, help="GPTQ calibration windows (default 128; --tiny: 2)")
    ap.add_argument("--window", type=int, default=512, help="tokens per window")
    ap.add_argument("--batch-size", type=int, default=4, help="windows per forward while collecting Hessians")
    ap.add_argument("--device", default=None, help="default cuda (--tiny: cpu)")
    ap.add_argument("--tiny", action="store_true", help="2 layers, hidden 256, on the CPU: a smoke run")
    ap.add_argument("--json", default=None, help="where to write the JSON when OUT is not set")
    ap.add_argument("--progress", action="store_true", help="progress bars")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.device is None:
        args.device = "cpu" if args.tiny else "cuda"
    if args.windows is None:
        args.windows = 2 if args.tiny else 128
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    res = run(args)
    dest = Path(os.environ["OUT"]) / "quantize_8b.json" if os.environ.get("OUT") else (
        Path(args.json) if args.json else None)
    if dest is not None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {dest}")
    m = res["model"]
    print(f"{res['device']}, torch {res['torch']}, {res['date']}: {m['params'] / 1e9:.2f} B params, "
          f"{m['shapes']['num_hidden_layers']} layers, built in {m['build_seconds']:.1f} s")
    return res


if __name__ == "__main__":
    main()
