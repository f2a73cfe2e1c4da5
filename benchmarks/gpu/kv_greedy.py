"""Greedy tokens through QINSCache on the GPU against the CPU reference path (issue 12).

    # on the CPU machine: the reference generations of a saved model, one JSON per model
    PYTHONPATH=src python benchmarks/gpu/kv_greedy.py MODEL_DIR --device cpu --out benchmarks/results/kv_greedy_cpu.json
    # on the GPU machine (the model directory and that JSON carried): the same prompts on CUDA
    PYTHONPATH=$PWD/src python3 benchmarks/gpu/kv_greedy.py MODEL_DIR --device cuda --ref kv_greedy_cpu.json

MODEL_DIR: a qins-saved model (`qins compress -o DIR ...`; the GPU machine has no default-model
package, so a compressed default model is carried, as for kernel_kl.md). The CPU run tokenizes
the first `--prompts` instruction prompts (qins/data/prompts.json, through the chat template of
the tokenizer in MODEL_DIR) and stores their ids in its JSON, so the GPU run needs no tokenizer.
Each prompt is generated greedily on its own (batch 1: no padding, so on CUDA every decode step
takes the page kernels without a mask), `--new-tokens` tokens cut after the first EOS, through a
fresh QINSCache for every KV setting in `--kv`, and with no cache at all (transformers' default)
as the floor: where the float path itself parts between the devices, the cache cannot be asked
to agree more.

KV settings: BITS[,rRESIDUAL][,pre][,vrot][,plan] e.g. `4` (the default residual 128), `4,r0`, `8,r0`,
`4,r0,pre` (pre-RoPE keys), `4,r0,pre,vrot,plan` (and rotated values and the key plan of `--plan FILE`,
which the CPU run makes from the model's own samples when missing; the GPU run reads the same file). On CUDA the JSON records each layer's last decode path (cuda / triton / reference).
Writes OUT (default $OUT/kv_greedy.json) and prints a table: per setting, sequences identical to
the reference, token match, mean first divergence.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

import qins
from qins._compat import cache_kwarg
from qins.kv import KVConfig
from qins.metrics.generation import _cut_after_eos, _render, load_prompts, token_match


def parse_kv(spec: str) -> tuple[KVConfig | None, bool]:
    """(config, whether the setting uses the key plan) of a --kv spec."""
    if spec == "none":
        return None, False
    parts = spec.split(",")
    fields, plan = dict(k_bits=int(parts[0])), False
    for p in parts[1:]:
        if p.startswith("r"):
            fields["residual"] = int(p[1:])
        elif p == "pre":
            fields["k_prerope"] = True
        elif p == "vrot":
            fields["v_rotate"] = True
        elif p == "plan":
            plan = True
        else:
            raise ValueError(f"--kv {spec!r}: parts are BITS, rRESIDUAL, pre, vrot, plan")
    return KVConfig(**fields), plan


def key_plan(path: str | None, model, cfg: KVConfig, device: str):
    """The key plan of a ',plan' setting: the saved file (both machines read the same plan); on the
    CPU a missing file is made from the model's own samples (kv.plan.model_samples) and saved."""
    from qins.kv import KeyPlan
    from qins.kv.plan import resolve_key_plan
    if path is None:
        raise SystemExit("a ',plan' setting needs --plan FILE")
    if os.path.exists(path):
        return KeyPlan.load(path)
    if device != "cpu":
        raise SystemExit(f"--plan {path}: no such file (make it on the CPU run and carry it)")
    plan = resolve_key_plan("sampled", model, cfg)
    plan.save(path)
    return plan


def prompt_ids(model_dir: str, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for p in load_prompts(n):
        text, special = _render(tok, p)
        out.append(tok(text, add_special_tokens=special).input_ids)
    return out


def generate(model, prompts: list[list[int]], new_tokens: int, make_cache) -> list[list[int]]:
    """Greedy new tokens per prompt (batch 1), cut after the first EOS (kept)."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    dev = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids], device=dev)
            kw = {} if make_cache is None else {cache_kwarg(model): make_cache()}
            seq = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=new_tokens, pad_token_id=next(iter(eos), 0), **kw)[0, len(ids):].tolist()
            out.append(_cut_after_eos(seq, eos))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                    help="default: float32 on the CPU, bfloat16 on CUDA")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--kv", nargs="+", default=["none", "4", "4,r0", "8,r0", "4,r0,pre"])
    ap.add_argument("--ref", default=None, help="the CPU run's JSON to compare against")
    ap.add_argument("--plan", default=None, help="key plan JSON for ',plan' settings (made on the CPU run if missing)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype or ("float32" if a.device == "cpu" else "bfloat16"))
    model = qins.load(a.model, device=a.device, dtype=dtype).eval()
    ref = json.load(open(a.ref)) if a.ref else None
    prompts = ref["prompt_ids"][:a.prompts] if ref else prompt_ids(a.model, a.prompts)
    rows = []
    for spec in a.kv:
        cfg, planned = parse_kv(spec)
        plan = key_plan(a.plan, model, cfg, a.device) if planned else None
        make = None if cfg is None else (lambda cfg=cfg, plan=plan: qins.QINSCache(model, config=cfg, key_plan=plan))
        caches = []

        def make_logged():
            caches.append(make())
            return caches[-1]
        t0 = time.perf_counter()
        gen = generate(model, prompts, a.new_tokens, make_logged if make else None)
        row = dict(kv=spec, config=None if cfg is None else cfg.to_dict(), seconds=round(time.perf_counter() - t0, 1),
                   generations=gen)
        if caches:
            paths = {}
            for p in caches[-1].paths().values():
                paths[str(p)] = paths.get(str(p), 0) + 1
            row["last_paths"] = paths                     # layers by how the last prompt's last step read them
        if ref is not None:
            theirs = next((r for r in ref["rows"] if r["kv"] == spec), None)
            if theirs is not None:
                row["vs_ref"] = token_match(theirs["generations"][:len(gen)], gen)   # --prompts may take fewer
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("generations", "config")}), file=sys.stderr, flush=True)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"), device=a.device,
                card=torch.cuda.get_device_name() if a.device == "cuda" else None, dtype=str(dtype),
                torch=torch.__version__, model=a.model, prompts=a.prompts, new_tokens=a.new_tokens,
                command="python benchmarks/gpu/kv_greedy.py " + " ".join(sys.argv[1:]))
    out = a.out or os.path.join(os.environ.get("OUT", "out"), "kv_greedy.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(meta=meta, prompt_ids=prompts, rows=rows), f)
    print(f"| kv | seconds | identical | token match | first divergence | last step's paths |")
    print(f"|---|---|---|---|---|---|")
    for r in rows:
        m = r.get("vs_ref", {})
        print(f"| {r['kv']} | {r['seconds']} | {m.get('identical', '')}/{m.get('sequences', '')} | "
              f"{m.get('match', float('nan')):.3f} | {m.get('first_divergence_mean', float('nan')):.1f} | "
              f"{r.get('last_paths', '')} |")


if __name__ == "__main__":
    main()
