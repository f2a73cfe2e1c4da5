"""CPU speed of the default model: float32 / bf16 / QINS 8-bit / QINS 4-bit / llama.cpp.

    python benchmarks/cpu_speed.py            # the full run (about 10 min on 2 cores)
    python benchmarks/cpu_speed.py --quick    # 16 generated tokens, 128-token prefill

Each variant runs in its own fresh process (so its RSS is its own), REPEATS timed runs per
thread count after one warm-up (their median counts): greedy generation of GEN new tokens after a 16-token prompt, and one
forward over a PREFILL-token prompt (logits of the last position only, like generation's
prefill). RSS: the process's peak resident set (VmHWM, reset after loading) while
generating, beside the RSS before the model was loaded (python + torch + transformers).
The 2 cores are shared with other machines' work and speed drifts by tens of percent between
minutes, so `--rounds R` runs every variant R times, alternating the order (forward, reversed,
...): a ratio to bf16 is taken within each round and the table shows the median of the rounds'
ratios with their range.

QINS variants: every decoder linear layer at the stated bits/group, the input embedding and
the tied lm_head (one copy of the codes) at qins 6-bit g128, as `qins compress` defaults do
(nearest rounding here, not GPTQ: rounding does not change speed); norms and activations in
float32, or in bfloat16 for the "-bf16" variants (like the bf16 model: where the CPU multiplies
bf16 natively, their prefill runs bf16 tiles through torch's bf16 GEMM). The QINS variants also report the KL of the fast path vs the reference
path (QINS_KERNELS=reference) on one 512-token window, and where the time of one generated
token goes (time inside the QINS linear layers vs the rest of the forward).

llama.cpp (if `llama_cpp` imports: `make peers`): the very GGUF the default model ships
(Q4_1), and Q8_0 / Q4_0 re-quantized from it with llama.cpp's own quantizer.
Results: benchmarks/results/cpu_speed.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("float32", "bf16", "qins8-g128", "qins4-g64", "qins8-g128-bf16", "qins4-g64-bf16",
            "llama.cpp-Q4_1", "llama.cpp-Q8_0", "llama.cpp-Q4_0")
PROMPT_TOKENS = 16
DECODE_KL_TOKENS, DECODE_KL_CHUNK = 64, 8     # generation's path (gemv: <= 8 rows per call)
BF16_ACT = "-bf16"                            # QINS variant suffix: norms and activations in bfloat16
QINS = {f"{v}{act}": bg for v, bg in {"qins8-g128": (8, 128), "qins4-g64": (4, 64)}.items() for act in ("", BF16_ACT)}


def _prepared_dir(variant: str) -> Path:
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"qins_cpu_speed_{variant}"


def _prepare(variants) -> None:
    """Write each torch variant to disk once (the workers then load it without the float model:
    their RSS is their own). float32/bf16: save_pretrained; QINS: quantize + qins.save."""
    import torch
    import qins
    from qins.codec.config import WeightConfig
    tok, model = qins.load_default_model()
    for v in variants:
        d = _prepared_dir(v)
        if v.startswith("llama") or (d / "done").exists():
            continue
        if v in QINS:
            bits, group = QINS[v]
            m = qins.quantize(copy.deepcopy(model), WeightConfig("qins", bits, group),
                              embeddings=WeightConfig("qins", 6, 128), progress=False)
            if v.endswith(BF16_ACT):
                m.to(torch.bfloat16)            # norms and activations; codes and scales keep theirs
                m.config.dtype = torch.bfloat16
            qins.save(m, d, tokenizer=tok)
        else:
            m = copy.deepcopy(model).to(torch.bfloat16 if v == "bf16" else torch.float32)
            m.save_pretrained(d)
            tok.save_pretrained(d)
        (d / "done").write_text("ok")
        del m
        gc.collect()


def _load_prepared(variant: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = _prepared_dir(variant)
    tok = AutoTokenizer.from_pretrained(d)
    if variant in QINS:
        import qins
        return tok, qins.load(d, dtype=torch.bfloat16 if variant.endswith(BF16_ACT) else torch.float32)
    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    return tok, AutoModelForCausalLM.from_pretrained(d, dtype=dtype)


def _rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")     # resets VmHWM to the current RSS
    except OSError:
        pass


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _rates(fn, tokens: int, repeats: int, setup=None) -> list[float]:
    """tokens / seconds of `repeats` timed calls of fn (`setup` runs untimed before each)."""
    out = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        out.append(tokens / (time.perf_counter() - t0))
    return out


def _run_record(gens: list[float], pres: list[float], peak_mb: float) -> dict:
    return {"gen_tok_s": statistics.median(gens), "prefill_tok_s": statistics.median(pres),
            "rss_gen_mb": peak_mb, "gen_all": gens, "prefill_all": pres}


def _corpus_ids(tok, n: int, offset: int):
    from qins.metrics.models import default_corpus
    ids = tok(default_corpus()[: 40 * (n + offset)], return_tensors="pt").input_ids
    return ids[:, offset: offset + n]


# ----------------------------------------------------------------------------- torch worker
def _torch_worker(variant: str, gen: int, prefill: int, threads: list[int], repeats: int = 1,
                  checks: bool = True) -> dict:
    import torch
    import qins
    import transformers
    del qins, transformers                      # imported before the base RSS is read
    base_rss = _rss_mb()
    tok, model = _load_prepared(variant)        # never a float copy in a QINS variant's process
    prompt = _corpus_ids(tok, PROMPT_TOKENS, 0)
    long = _corpus_ids(tok, prefill, 1000)
    kl_ids = _corpus_ids(tok, 512, 3000)
    info: dict = {"variant": variant}
    if variant.startswith("qins"):
        from qins.weights.quantize import quantized_modules
        mods = [m for _, m in quantized_modules(model) if getattr(m, "tied_to", None) is None]
        qbytes = sum(sum(t.numel() * t.element_size() for t in m.quantized.tensors().values()) for m in mods)
        nweights = sum(m.weight_shape[0] * m.weight_shape[1] for m in mods)
        bits, group = QINS[variant]
        info["quantized"] = (f"{len(list(quantized_modules(model)))} modules: decoder linears qins {bits}-bit "
                             f"g{group}, embedding + tied lm_head qins 6-bit g128 (one copy of the codes), activations "
                             f"{'bfloat16' if variant.endswith(BF16_ACT) else 'float32'}")
        info["quantized_bpw"] = round(8 * qbytes / nweights, 3)
    model.eval()
    params = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    info["model_bytes"] = sum(t.numel() * t.element_size() for t in params.values())
    _trim()

    def generate():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=gen,
                             min_new_tokens=gen, do_sample=False, pad_token_id=tok.eos_token_id)
        assert out.shape[1] == PROMPT_TOKENS + gen
        return out

    runs = {}
    with torch.inference_mode():
        generate()                                              # warm-up (and the kernel build)
        model(long, logits_to_keep=1)
        for t in threads:
            torch.set_num_threads(t)
            _trim()
            _reset_peak()
            gens = _rates(generate, gen, repeats)
            peak = _rss_mb("VmHWM")
            pres = _rates(lambda: model(long, logits_to_keep=1), prefill, repeats)
            runs[t] = _run_record(gens, pres, peak)
        if checks:
            # after the timed runs: the reference path's full-weight decode must not leave its
            # allocations in the RSS measured while generating (bf16 runs no such check)
            if variant.startswith("qins"):
                anchor = _prepared_dir(variant) if variant.endswith(BF16_ACT) else None
                info.update(_fast_vs_reference(model, kl_ids, anchor))
            info["profile"] = _profile_token(model, prompt, variant)
    info.update(base_rss_mb=base_rss, runs=runs)
    return info


def _logits(model, ids, backend: str, stepped: bool = False):
    """float32 logits of `ids` with QINS_KERNELS=backend: one forward over the window, or
    (stepped) generation's path: fed through the cache DECODE_KL_CHUNK tokens at a time, so every
    linear runs the gemv (the approximate one: cpu.APPROX_GEMV)."""
    import torch
    from transformers import DynamicCache
    os.environ["QINS_KERNELS"] = backend
    try:
        if not stepped:
            return model(ids).logits.float()
        cache = DynamicCache()
        return torch.cat([model(ids[:, i:i + DECODE_KL_CHUNK], past_key_values=cache, use_cache=True).logits.float()
                          for i in range(0, ids.shape[1], DECODE_KL_CHUNK)], 1)
    finally:
        os.environ["QINS_KERNELS"] = "auto"


def _kl(p_logits, q_logits) -> float:
    lp, lq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


def _fast_vs_reference(model, ids, anchor_dir=None) -> dict:
    """KL(p_reference || p_fast) over the positions of one window and on generation's path
    (its first DECODE_KL_TOKENS tokens), with the max |logit| changes.

    anchor_dir (bf16 activations): two bf16 computations of one model drift apart by bf16
    rounding alone, so each path is also measured against the same saved weights loaded in
    float32 (reference path): the fast path is right when it is no farther from that anchor
    than the reference path is."""
    from qins.kernels import cpu
    short = ids[:, :DECODE_KL_TOKENS]
    ref, fast = _logits(model, ids, "reference"), _logits(model, ids, "cpu")
    ref_d, fast_d = _logits(model, short, "reference", True), _logits(model, short, "cpu", True)
    out = {"kl_fast_vs_reference": _kl(ref, fast), "max_abs_logit_diff": (ref - fast).abs().max().item(),
           "fast_path": cpu.available(),
           "kl_decode_fast_vs_reference": _kl(ref_d, fast_d),
           "max_abs_logit_diff_decode": (ref_d - fast_d).abs().max().item(),
           "top1_agree_decode": (ref_d.argmax(-1) == fast_d.argmax(-1)).float().mean().item()}
    if anchor_dir is not None:
        import torch
        import qins
        anchor_model = qins.load(anchor_dir, dtype=torch.float32).eval()
        anchor, anchor_d = _logits(anchor_model, ids, "reference"), _logits(anchor_model, short, "reference", True)
        out.update(kl_fp32_vs_reference=_kl(anchor, ref), kl_fp32_vs_fast=_kl(anchor, fast),
                   kl_decode_fp32_vs_reference=_kl(anchor_d, ref_d), kl_decode_fp32_vs_fast=_kl(anchor_d, fast_d))
    return out


def _profile_token(model, prompt, variant: str) -> dict:
    """ms of one generated token (a forward at the end of the prompt with a cache), and how much
    of it is spent inside the linear layers (QINS linears or nn.Linear)."""
    import torch
    from transformers import DynamicCache
    from qins.weights.linear import QINSLinear
    spent = [0.0, 0]
    cls = QINSLinear if variant.startswith("qins") else torch.nn.Linear
    orig = cls.forward

    def timed(self, x):
        t0 = time.perf_counter()
        y = orig(self, x)
        spent[0] += time.perf_counter() - t0
        spent[1] += 1
        return y

    cache = DynamicCache()
    model(prompt, past_key_values=cache, use_cache=True)
    step = prompt[:, -1:]
    reps = 10
    cls.forward = timed
    try:
        t0 = time.perf_counter()
        for _ in range(reps):
            model(step, past_key_values=cache, use_cache=True)
            cache.crop(-1)                                      # back to the prompt
        total = (time.perf_counter() - t0) / reps
    finally:
        cls.forward = orig
    return {"threads": torch.get_num_threads(), "ms_per_token": 1e3 * total,
            "ms_in_linears": 1e3 * spent[0] / reps, "linear_calls": spent[1] // reps}


# ------------------------------------------------------------------------- llama.cpp worker
def _llama_worker(variant: str, gen: int, prefill: int, threads: list[int], repeats: int = 1) -> dict:
    import numpy as np
    import llama_cpp
    from qins.metrics.models import default_model_path
    import qins
    base_rss = _rss_mb()
    quant = variant.split("-")[1]
    src = default_model_path()
    path = src
    if quant != "Q4_1":
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"qins_cpu_speed_{quant}.gguf"
        if not path.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[quant]
            params.allow_requantize = True
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(path).encode(), ctypes.byref(params))
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize to {quant} failed ({rc})")
    tok, model = qins.load_default_model()   # the same token ids as the torch variants
    prompt = _corpus_ids(tok, PROMPT_TOKENS, 0)[0].tolist()
    long = _corpus_ids(tok, prefill, 1000)[0].tolist()
    del model
    _trim()
    base_rss = _rss_mb()
    llm = llama_cpp.Llama(str(path), n_ctx=1024, n_batch=512, n_threads=threads[0], verbose=False)
    info = {"variant": variant, "gguf": path.name, "model_bytes": path.stat().st_size}

    def generate():
        llm.reset()
        llm.eval(prompt)
        for _ in range(gen):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([nxt])

    runs = {}
    generate()
    for t in threads:
        llm.n_threads = llm.n_threads_batch = t
        llama_cpp.llama_set_n_threads(llm._ctx.ctx, t, t)
        _reset_peak()
        gens = _rates(generate, gen, repeats)
        peak = _rss_mb("VmHWM")
        pres = _rates(lambda: llm.eval(long), prefill, repeats, setup=llm.reset)
        runs[t] = _run_record(gens, pres, peak)
    info.update(base_rss_mb=base_rss, runs=runs)
    return info


# ------------------------------------------------------------------------------ the driver
def _run_worker(variant: str, a, checks: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--gen", str(a.gen), "--prefill", str(a.prefill),
           "--threads", *map(str, a.threads), "--repeats", str(a.repeats)] + ([] if checks else ["--no-checks"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    env.pop("QINS_KERNELS", None)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"variant": variant, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"  {variant}: {json.dumps(out['runs'])}", file=sys.stderr)
    return out


def _combine(rounds: list[list[dict]]) -> list[dict]:
    """Per variant: the first round's record (checks, profile, RSS), speeds replaced by the
    median over rounds, and each round's ratio to bf16 of the same round."""
    out = []
    for i, first in enumerate(rounds[0]):
        rec = dict(first)
        if "runs" not in first:
            out.append(rec)
            continue
        runs = {}
        for t in first["runs"]:
            per = [rd[i]["runs"][t] for rd in rounds if "runs" in rd[i]]
            x = {k: statistics.median(p[k] for p in per) for k in ("gen_tok_s", "prefill_tok_s")}
            x["rss_gen_mb"] = max(p["rss_gen_mb"] for p in per)
            x["per_round"] = [{k: p[k] for k in ("gen_tok_s", "prefill_tok_s")} for p in per]
            for k in ("gen", "prefill"):
                ratios = []
                for rd in rounds:
                    bf = next((r for r in rd if r["variant"] == "bf16" and "runs" in r), None)
                    if bf is not None and "runs" in rd[i]:
                        ratios.append(rd[i]["runs"][t][f"{k}_tok_s"] / bf["runs"][t][f"{k}_tok_s"])
                x[f"{k}_ratio_rounds"] = ratios
            runs[t] = x
        rec["runs"] = runs
        out.append(rec)
    return out


def _ratio(x: dict, k: str, b: dict | None) -> str:
    """Median of the rounds' ratios to bf16 (range when there are several)."""
    rs = x.get(f"{k}_ratio_rounds")
    if not rs:
        return f"{x[f'{k}_tok_s'] / b[f'{k}_tok_s']:.2f}" if b else "–"
    med = statistics.median(rs)
    return f"{med:.2f}" if len(rs) == 1 else f"{med:.2f} ({min(rs):.2f}–{max(rs):.2f})"


def _md(res: dict) -> str:
    rows = res["variants"]
    bf = next((r for r in rows if r["variant"] == "bf16" and "runs" in r), None)
    L = ["# CPU speed of the default model (issue 16)", "",
         f"Command: `{res['command']}`", "",
         f"- {res['machine']}; {res['date']}; load average before the run {res['load_before']}, "
         f"after {res['load_after']} (other jobs share the 2 cores: compare ratios within this run)",
         f"- torch {res['torch']}, transformers {res['transformers']}, llama-cpp-python {res['llama_cpp']}",
         f"- generation: greedy, {PROMPT_TOKENS}-token prompt + {res['gen']} new tokens; prefill: one forward "
         f"over {res['prefill']} tokens (last position's logits only); per process the median of "
         f"{res.get('repeats', 1)} timed runs after one warm-up; {res.get('rounds', 1)} round(s) over the "
         "variants in alternating order, × bf16 = the median of the rounds' ratios to bf16 of the same round "
         "(range in brackets)",
         "- RSS: peak resident set of the variant's own process while generating (VmHWM reset after "
         "loading); 'before model' is the same process before the model was loaded", "",
         "| variant | threads | generation tok/s | × bf16 | prefill tok/s | × bf16 | RSS generating MB | RSS before model MB | weights MB | bpw |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "runs" not in r:
            L.append(f"| {r['variant']} | – | not run: {r.get('error', '')} | | | | | | | |")
            continue
        for t, x in r["runs"].items():
            b = bf["runs"].get(t) if bf else None
            rg, rp = _ratio(x, "gen", b), _ratio(x, "prefill", b)
            L.append(f"| {r['variant']} | {t} | {x['gen_tok_s']:.1f} | {rg} | {x['prefill_tok_s']:.1f} | {rp} | "
                     f"{x['rss_gen_mb']:.0f} | {r['base_rss_mb']:.0f} | {r['model_bytes'] / 1e6:.1f} | "
                     f"{r.get('quantized_bpw', '')} |")
    L.append("")
    for r in rows:
        if "quantized" in r:
            L.append(f"- {r['variant']}: {r['quantized']}, {r['quantized_bpw']} bpw over the quantized weights "
                     f"(codes + scales + curvatures). Fast path vs reference path on one 512-token window: "
                     f"KL {r['kl_fast_vs_reference']:.2e}, max |logit diff| {r['max_abs_logit_diff']:.2e}; "
                     f"generation's path ({DECODE_KL_TOKENS} tokens through the cache, {DECODE_KL_CHUNK} at a time: "
                     f"the approximate gemv): KL {r['kl_decode_fast_vs_reference']:.2e}, max |logit diff| "
                     f"{r['max_abs_logit_diff_decode']:.2e}, top-1 agreement {r['top1_agree_decode']:.3f}.")
            if "kl_fp32_vs_fast" in r:
                L.append(f"  - bf16 activations drift by bf16 rounding alone, so against the same weights run in "
                         f"float32 (reference path): window KL reference {r['kl_fp32_vs_reference']:.2e}, fast "
                         f"{r['kl_fp32_vs_fast']:.2e}; generation's path KL reference "
                         f"{r['kl_decode_fp32_vs_reference']:.2e}, fast {r['kl_decode_fp32_vs_fast']:.2e}.")
    for r in rows:
        if "profile" in r:
            p = r["profile"]
            L.append(f"- one generated token, {r['variant']}, {p['threads']} threads: {p['ms_per_token']:.1f} ms, of "
                     f"which {p['ms_in_linears']:.1f} ms inside the {p['linear_calls']} linear layers "
                     f"(the rest: attention, norms, rotary, HF/Python per-module overhead)")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 generated tokens, 128-token prefill")
    ap.add_argument("--gen", type=int, default=None)
    ap.add_argument("--prefill", type=int, default=None)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_speed"),
                    help="writes OUT.json and OUT.md")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per thread count (median)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every variant this many times, alternating the order")
    ap.add_argument("--no-checks", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.gen = a.gen or (16 if a.quick else 64)
    a.prefill = a.prefill or (128 if a.quick else 512)
    if a.worker:
        if a.worker.startswith("llama"):
            out = _llama_worker(a.worker, a.gen, a.prefill, a.threads, a.repeats)
        else:
            out = _torch_worker(a.worker, a.gen, a.prefill, a.threads, a.repeats, not a.no_checks)
        print(json.dumps(out))
        return 0
    import torch  # noqa: F401  (its version and CPU capability)
    import transformers
    try:
        from importlib.metadata import version
        llama_v = version("llama-cpp-python")
    except Exception:
        llama_v = "not installed"
    res = {"command": "python benchmarks/cpu_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                      f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}",
           "torch": torch.__version__, "transformers": transformers.__version__, "llama_cpp": llama_v,
           "gen": a.gen, "prefill": a.prefill, "load_before": os.getloadavg()[0]}
    variants = [v for v in a.variants if not v.startswith("llama") or llama_v != "not installed"]
    print(f"preparing {variants} (once: quantize / save under {_prepared_dir('')}*)", file=sys.stderr)
    _prepare(variants)
    rounds = []
    for r in range(a.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        print(f"round {r + 1}/{a.rounds}: {order}", file=sys.stderr)
        done = {v: _run_worker(v, a, checks=r == 0) for v in order}
        rounds.append([done[v] for v in variants])
    res["variants"] = _combine(rounds)
    res["rounds"] = a.rounds
    res["repeats"] = a.repeats
    res["load_after"] = os.getloadavg()[0]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(_md(res))
    print(_md(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
