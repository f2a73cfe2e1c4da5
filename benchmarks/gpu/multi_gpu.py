"""QINS on 1 vs 2 GPUs: accelerate's device_map and transformers' tensor parallelism (issue 15).

The Llama-3-8B-shaped random model (benchmarks/gpu/decode.py's LLAMA8B, bf16, layer i copies
layer i mod --unique-layers), quantized to QINS 4 bits (WeightConfig("qins", 4, 64)) and saved
once with qins.save, is decoded greedily (qins.metrics.decode.greedy_decode: static cache,
eager prefill, decode step in a CUDA graph where it can be captured, else eager, the row says
which and why) at batch 1 and 16 in three set-ups, each in its own process:

    one         qins.load(dir, device="cuda:0")
    device_map  qins.load(dir, device_map="balanced") over 2 GPUs (layers split pipeline style)
    tp          torchrun --nproc-per-node 2: AutoModelForCausalLM.from_pretrained(dir,
                distributed_config=DistributedConfig(tp_plan="auto")), NCCL; rank 0 reports

Each row: decode tok/s (batch x steps / seconds of the timed steps), the ratio to one GPU at
the same batch, the greedy tokens against one GPU's (share equal position by position, the
first position that differs), max |first-token logit difference|, and the QINS weight bytes
each GPU holds against one GPU's. With random weights the logits are nearly flat: a change of
summation order (the tensor-parallel all-reduce) can flip a near-tie and part the tokens;
the first-token logit difference says whether the paths agree numerically.

    PYTHONPATH=$PWD/src:$PWD python benchmarks/gpu/multi_gpu.py            # 2 GPUs, all set-ups
    PYTHONPATH=$PWD/src:$PWD python benchmarks/gpu/multi_gpu.py --tiny     # small model smoke run
                                                                           # (CPU + gloo if no GPU)

Writes $OUT/multi_gpu_<model>.json (and --json PATH) with the card, date and command. Not yet
run on GPUs: written on a CPU-only machine (see the README section "Several GPUs").
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
SETUPS = ("one", "device_map", "tp")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="decode.py's 2-layer TINY shape instead of LLAMA8B")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--unique-layers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    p.add_argument("--dir", help="where the quantized model is saved (default: $TMPDIR/qins_multi_gpu_<model>)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--phase", choices=("prepare", *SETUPS), help=argparse.SUPPRESS)   # internal: one child
    return p.parse_args(argv)


def model_name(args) -> str:
    return "tiny" if args.tiny else "llama8b"


def work_dir(args) -> Path:
    import tempfile
    return Path(args.dir or Path(tempfile.gettempdir()) / f"qins_multi_gpu_{model_name(args)}")


def prompt(args, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, vocab, (max(args.batch), args.prompt_len), generator=g)


# ---- phases (each runs in its own process) -----------------------------------------------------

def prepare(args) -> None:
    """Build the random bf16 model on cuda:0 (or the CPU), quantize it to 4 bits, qins.save it."""
    import qins
    from benchmarks.gpu.decode import LLAMA8B, TINY, quantize, random_llama

    dev = "cuda:0" if torch.cuda.is_available() else "cpu"
    shape = dict(TINY if args.tiny else LLAMA8B)
    t0 = time.perf_counter()
    model = random_llama(shape, dev, None, args.unique_layers, args.seed)
    quantize(model, ("qins", 4, 64), args.unique_layers)
    qins.save(model, work_dir(args))
    print(f"prepared {work_dir(args)} in {time.perf_counter() - t0:.1f} s", flush=True)


def qins_bytes(model) -> int:
    from qins.weights.parallel import stored_bytes
    return stored_bytes(model)


def decode_rows(model, args, setup: str) -> list[dict]:
    from qins.metrics.decode import greedy_decode

    ids = prompt(args, model.config.vocab_size)
    rows = []
    for B in args.batch:
        run = greedy_decode(model, ids[:B], args.new_tokens, mode="graph")
        rows.append({"setup": setup, "batch": B, "tok_s": run.tokens_per_second, "steps": run.steps,
                     "seconds": run.seconds, "prefill_seconds": run.prefill_seconds, "mode": run.mode,
                     "error": run.error, "graph_matches_eager": run.graph_matches_eager,
                     "tokens": run.tokens.tolist(), "first_logits": run.first_logits.float()})
    return rows


def run_phase(args) -> None:
    out = work_dir(args) / f"{args.phase}.pt"
    if args.phase == "prepare":
        return prepare(args)
    import qins

    qins.register_transformers()
    cuda = torch.cuda.is_available()
    if args.phase == "one":
        model = qins.load(work_dir(args), device="cuda:0" if cuda else "cpu", dtype=torch.bfloat16)
        per_gpu = [qins_bytes(model)]
    elif args.phase == "device_map":
        model = qins.load(work_dir(args), dtype=torch.bfloat16, device_map="balanced")
        per_gpu = {}
        from qins.weights.placement import qins_module_names
        for _, m in qins_module_names(model).items():
            d = str(m.qweight.device)
            per_gpu[d] = per_gpu.get(d, 0) + sum(t.numel() * t.element_size()
                                                 for t in m.buffers(recurse=False) if t is not None)
        per_gpu = [per_gpu[k] for k in sorted(per_gpu)]
    else:                                                   # tp: one process per GPU, under torchrun
        import torch.distributed as dist
        from transformers import AutoModelForCausalLM
        from transformers.distributed import DistributedConfig

        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        model = AutoModelForCausalLM.from_pretrained(
            work_dir(args), distributed_config=DistributedConfig(tp_plan="auto"), dtype=torch.bfloat16)
        per_gpu = [None] * dist.get_world_size()
        dist.all_gather_object(per_gpu, qins_bytes(model))
    model.eval()
    rows = decode_rows(model, args, args.phase)
    if args.phase != "tp" or int(os.environ.get("RANK", "0")) == 0:
        torch.save({"rows": rows, "qins_bytes_per_gpu": per_gpu}, out)


# ---- the driver --------------------------------------------------------------------------------

def child(args, phase: str, argv: list[str]) -> list[str]:
    base = [str(HERE), *argv, "--phase", phase, "--dir", str(work_dir(args))]
    if phase == "tp":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *base]
    return [sys.executable, *base]


def environment() -> dict:
    import transformers

    if torch.cuda.is_available():
        cards = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        cards = [f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"]
    return {"cards": cards, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def summarize(parts: dict) -> list[dict]:
    one = {r["batch"]: r for r in parts["one"]["rows"]} if "one" in parts else {}
    one_bytes = parts["one"]["qins_bytes_per_gpu"][0] if "one" in parts else None
    table = []
    for setup, part in parts.items():
        for r in part["rows"]:
            ref = one.get(r["batch"])
            row = {k: v for k, v in r.items() if k not in ("tokens", "first_logits")}
            row["qins_bytes_per_gpu"] = part["qins_bytes_per_gpu"]
            if one_bytes:
                row["max_gpu_share_of_one_gpu_bytes"] = max(part["qins_bytes_per_gpu"]) / one_bytes
            if ref is not None:
                a, b = torch.tensor(r["tokens"]), torch.tensor(ref["tokens"])
                n = min(a.shape[1], b.shape[1])
                eq = (a[:, :n] == b[:, :n])
                diverge = [int((~e).nonzero()[0]) if not bool(e.all()) else None for e in eq]
                row.update(speedup_vs_one=r["tok_s"] / ref["tok_s"], token_match_vs_one=float(eq.float().mean()),
                           sequences_identical=int(eq.all(1).sum()), first_divergence=diverge,
                           first_logit_max_abs_diff=float((r["first_logits"] - ref["first_logits"]).abs().max()))
            table.append(row)
    return table


def markdown(rows: list[dict]) -> str:
    lines = ["| setup | batch | tok/s | x one GPU | tokens = one GPU | max GPU bytes / one GPU | step |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda k, fmt: (fmt.format(r[k]) if r.get(k) is not None else "-")  # noqa: E731
        lines.append(f"| {r['setup']} | {r['batch']} | {r['tok_s']:.1f} | {f('speedup_vs_one', '{:.2f}x')} | "
                     f"{f('token_match_vs_one', '{:.1%}')} | {f('max_gpu_share_of_one_gpu_bytes', '{:.1%}')} | "
                     f"{r['mode']}{' (' + r['error'] + ')' if r['error'] else ''} |")
    return "\n".join(lines)


def main(argv=None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.phase:
        run_phase(args)
        return None
    if torch.cuda.is_available() and torch.cuda.device_count() < 2 and set(args.setups) - {"one"}:
        raise SystemExit(f"{torch.cuda.device_count()} GPU(s) visible: device_map and tp need 2")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    doc = {"command": "PYTHONPATH=$PWD/src:$PWD python benchmarks/gpu/multi_gpu.py " + shlex.join(argv),
           "environment": environment(), "model": model_name(args), "weights": "qins-4b-g64",
           "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    w = work_dir(args)
    if not (w / "qins.json").exists():
        subprocess.run(child(args, "prepare", argv), env=env, check=True)
    parts, failures = {}, {}
    for setup in args.setups:
        (w / f"{setup}.pt").unlink(missing_ok=True)
        t0 = time.perf_counter()
        proc = subprocess.run(child(args, setup, argv), env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            failures[setup] = proc.stderr[-3000:]
            print(f"{setup}: failed (rc {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
            continue
        parts[setup] = torch.load(w / f"{setup}.pt")
        print(f"{setup}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    doc["rows"] = summarize(parts)
    doc["failures"] = failures
    paths = [Path(args.json)] if args.json else []
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / f"multi_gpu_{model_name(args)}.json")
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(doc, indent=1, default=str))
        p.with_suffix(".md").write_text(markdown(doc["rows"]) + "\n")
    print(markdown(doc["rows"]))
    return doc


if __name__ == "__main__":
    main()
