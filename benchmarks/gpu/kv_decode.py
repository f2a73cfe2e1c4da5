"""End to end at long context: decode tokens/s with a QINSCache against a bf16 StaticCache (issue 12).

The issue's target: at 32k tokens of context, with 4-bit weights, a 4-bit QINSCache decodes >= 1.3x
the tokens per second of the same model with a bf16 static cache. Every variant runs the same model
(weights `--weights`, default QINS 4-bit g64, data-free) on the same random prompt of `--context`
tokens, then `--steps` greedy decode steps:

    static-bf16        transformers' StaticCache (bf16), the step captured in a CUDA graph
                       (qins.metrics.decode.greedy_decode; the CPU runs it eagerly): the baseline
    static-bf16-eager  the same cache and loop, eager: what the graph alone is worth
    qins-kvB           QINSCache(model, bits=B) with its defaults (residual 128), eager steps (its
                       float segment grows, so a step is not captured yet); on CUDA the paged
                       kernels (quantize-on-append, decode attention) run, `paths` says which
    qins-kv4-r0        the same at residual 0 (every token but the sink in pages)
    qins-kv4-recipe    residual 0, pre-RoPE keys, rotated values and a key plan from the model's
                       own samples (--recipe; the Triton kernels)

Prefill: the prompt in chunks of `--prefill-chunk` tokens (eager, not timed in tok/s). Greedy
tokens of each variant are compared with static-bf16's (random weights give nearly flat logits,
so a quantized cache parts from it early; the match is reported, not required).

    PYTHONPATH=$PWD/src:$PWD python3 benchmarks/gpu/kv_decode.py --model llama8b --context 32768   # GPU
    PYTHONPATH=$PWD/src:$PWD python3 benchmarks/gpu/kv_decode.py --tiny --context 300 --steps 8   # CPU smoke

Writes --json PATH (and $OUT/kv_decode_<model>.json when OUT is set); prints the table last.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import LLAMA8B, TINY, quantize, random_llama  # noqa: E402

WEIGHTS = {"bf16": None, "qins-8b": ("qins", 8, 128), "qins-4b": ("qins", 4, 64)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("llama8b",), default="llama8b")
    p.add_argument("--tiny", action="store_true", help="a 2-layer hidden-256 Llama (CPU unless --device)")
    p.add_argument("--layers", type=int, help="keep only this many decoder layers")
    p.add_argument("--unique-layers", type=int, default=1, help="distinct random layers (the others copy them)")
    p.add_argument("--weights", choices=list(WEIGHTS), default="qins-4b")
    p.add_argument("--context", type=int, default=32768, help="prompt tokens before the timed steps")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--kv-bits", type=int, nargs="*", default=[4, 8])
    p.add_argument("--r0", action="store_true", help="also qins-kv4-r0 (residual 0)")
    p.add_argument("--recipe", action="store_true", help="also qins-kv4-recipe (pre-RoPE, rotated values, sampled plan)")
    p.add_argument("--prefill-chunk", type=int, default=4096)
    p.add_argument("--device", help="default: cuda if available (cpu with --tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    if a.device is None:
        a.device = "cpu" if a.tiny or not torch.cuda.is_available() else "cuda"
    return a


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def qins_cache_decode(model, prompt: torch.Tensor, steps: int, cache, chunk: int) -> dict:
    """Chunked prefill into `cache`, then `steps` eager greedy steps; tokens and timings."""
    from qins._compat import cache_kwarg
    dev = next(model.parameters()).device
    kw = {cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": 1}
    B, P = prompt.shape
    x = prompt.to(dev)
    with torch.inference_mode():
        _sync(dev)
        t0 = time.perf_counter()
        for s in range(0, P, chunk):
            pos = torch.arange(s, min(s + chunk, P), device=dev).expand(B, -1)
            logits = model(input_ids=x[:, s:s + chunk], position_ids=pos, **kw).logits[:, -1]
        _sync(dev)
        prefill_s = time.perf_counter() - t0
        nxt = logits.argmax(-1, keepdim=True)
        out = [nxt]
        pos = torch.full((B, 1), P, dtype=torch.long, device=dev)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            nxt = model(input_ids=nxt, position_ids=pos, **kw).logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            pos += 1
        _sync(dev)
        seconds = time.perf_counter() - t0
    return dict(tokens=torch.cat(out, 1).cpu(), seconds=seconds, prefill_seconds=prefill_s, steps=steps)


def variants(a) -> list[tuple[str, dict | None]]:
    """(label, QINSCache keyword arguments or None for a static cache)."""
    out = [("static-bf16", None), ("static-bf16-eager", None)]
    out += [(f"qins-kv{b}", dict(bits=b)) for b in a.kv_bits]
    if a.r0:
        out.append(("qins-kv4-r0", dict(bits=4, residual=0)))
    if a.recipe:
        out.append(("qins-kv4-recipe", dict(bits=4, residual=0, k_prerope=True, v_rotate=True, key_plan="sampled")))
    return out


def table(rows: list[dict]) -> str:
    lines = ["| variant | tok/s | x static-bf16 (graph) | x static eager | KV bytes | step mode | greedy match | paths / error |",
             "|---|---|---|---|---|---|---|---|"]
    base = {r["variant"]: r.get("tokens_per_second") for r in rows}
    for r in rows:
        tps = r.get("tokens_per_second")
        ratio = lambda k: f"{tps / base[k]:.2f}x" if tps and base.get(k) else ""   # noqa: E731
        lines.append(f"| {r['variant']} | {tps or 0:.1f} | {ratio('static-bf16')} | {ratio('static-bf16-eager')} | "
                     f"{r.get('kv_bytes', '')} | {r.get('mode', '')} | {r.get('match', '')} | "
                     f"{r.get('error') or r.get('paths', '')} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    import qins
    from qins.metrics.decode import greedy_decode

    a = parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)                 # noqa: E731
    command = "python benchmarks/gpu/kv_decode.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    shape = dict(TINY if a.tiny else LLAMA8B)
    shape["max_position_embeddings"] = max(shape.get("max_position_embeddings", 0), a.context + a.steps + 8)
    model = random_llama(shape, a.device, a.layers, a.unique_layers, a.seed)
    n = model.config.num_hidden_layers
    if WEIGHTS[a.weights] is not None:
        t0 = time.perf_counter()
        quantize(model, WEIGHTS[a.weights], a.unique_layers if 0 < a.unique_layers < n else 0)
        log(f"weights {a.weights}: quantized in {time.perf_counter() - t0:.1f} s")
    g = torch.Generator().manual_seed(a.seed)
    prompt = torch.randint(0, model.config.vocab_size, (a.batch, a.context), generator=g)
    rows, ref = [], None
    for label, kw in variants(a):
        row = dict(variant=label)
        try:
            if kw is None:
                run = greedy_decode(model, prompt, a.steps, mode="eager" if label.endswith("eager") else "graph")
                row.update(tokens_per_second=run.tokens_per_second, seconds=run.seconds, mode=run.mode,
                           prefill_seconds=run.prefill_seconds, error=run.error,
                           kv_bytes=2 * n * a.batch * model.config.num_key_value_heads
                           * (a.context + a.steps) * (model.config.hidden_size // model.config.num_attention_heads) * 2)
                tokens = run.tokens
            else:
                cache = qins.QINSCache(model, max_tokens=a.context + a.steps + 1, **kw)
                r = qins_cache_decode(model, prompt, a.steps, cache, a.prefill_chunk)
                row.update(tokens_per_second=a.batch * r["steps"] / r["seconds"], seconds=r["seconds"], mode="eager",
                           prefill_seconds=r["prefill_seconds"], kv_bytes=cache.nbytes(),
                           bits_per_element=cache.bits_per_element(),
                           paths=sorted({str(p) for p in cache.paths().values()}))
                tokens = r["tokens"]
            if ref is None:
                ref = tokens
            row["match"] = round(float((tokens == ref).float().mean()), 3)
        except Exception as e:                                        # noqa: BLE001 - reported
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        log(json.dumps(row))
        rows.append(row)
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
               card=torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.processor() or "cpu",
               torch=torch.__version__)
    doc = dict(command=command, env=env, model="tiny" if a.tiny else a.model, layers=n, weights=a.weights,
               context=a.context, steps=a.steps, batch=a.batch, rows=rows)
    paths = [Path(a.json)] if a.json else []
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / f"kv_decode_{doc['model']}.json")
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(doc, indent=1))
    print(f"# {doc['model']} ({n} layers), weights {a.weights}, context {a.context}, batch {a.batch}, "
          f"{a.steps} steps, {env['card']}, {env['date']}")
    print(table(rows))
    return doc


if __name__ == "__main__":
    main()
