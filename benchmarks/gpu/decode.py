"""End-to-end greedy decode speed: bf16 vs QINS 8-bit vs QINS 4-bit in one harness (issue 11).

Every variant decodes the same prompts with the same loop (qins.metrics.decode): a
transformers StaticCache, an eager prefill, then one decode step (batch B, greedy argmax
inside) captured in a CUDA graph and replayed per token. tok/s = B * steps / seconds of the
replay loop, device synchronized around it. Beside the speed: each variant's greedy tokens
against bf16's, the max |logit difference| at the first new token, that the graph reproduces
the eager steps, and (bf16) that the loop reproduces HF `generate`.

Models
  --model default   the embedded SmolLM2-135M (qins.metrics.models.load_model), in bf16
  --model llama8b   Llama-3-8B shape (hidden 4096, MLP 14336, 32 layers, 32 heads, 8 KV heads,
                    vocab 128256), random weights (normal, std 0.02) built on the GPU in bf16
  --tiny            a 2-layer hidden-256 Llama on the CPU: a smoke run of the whole script

Variants: bf16; qins-8b = qins.quantize(WeightConfig("qins", 8, 128)); qins-4b =
WeightConfig("qins", 4, 64); data-free, each from a deep copy of the bf16 model. By default
the 8B model's layers are copies of `--unique-layers 1` random layer(s): each layer still
holds its own tensors (the same bytes are read per token), and the codes of a copy are
exactly those of its source (the codec is deterministic). `--unique-layers 32` fits all
(seconds on a GPU: benchmarks/gpu/quantize_8b.py).

A step that cannot be captured (a host sync in its forward) is timed eagerly instead, for
at most `--max-seconds`, and the row says why. With random weights the logits are nearly
flat, so greedy tokens of any two variants part within a few steps: the token match says
little there; the prefill KL between the kernels and the torch reference checks the path.

    PYTHONPATH=$PWD/src:$PWD python benchmarks/gpu/decode.py --model llama8b            # GPU
    PYTHONPATH=$PWD/src:$PWD python benchmarks/gpu/decode.py --model default --batch 1 16
    PYTHONPATH=$PWD/src:$PWD python benchmarks/gpu/decode.py --tiny --new-tokens 16    # CPU

Writes $OUT/decode_<model>.json (and .md) when OUT is set, and --json PATH (.md beside it);
prints the table last.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import torch

VARIANTS = {"bf16": None, "qins-8b": ("qins", 8, 128), "qins-4b": ("qins", 4, 64)}
LLAMA8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
               tie_word_embeddings=False, initializer_range=0.02)
# initializer_range 0.2: at 0.02 a 2-layer random model mostly predicts from its input token
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, initializer_range=0.2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("default", "llama8b"), default="llama8b")
    p.add_argument("--tiny", action="store_true", help="a 2-layer hidden-256 Llama (CPU unless --device)")
    p.add_argument("--layers", type=int, help="llama8b: keep only this many decoder layers")
    p.add_argument("--unique-layers", type=int, default=1,
                   help="llama8b/tiny: distinct random layers, the others are copies (0 = all distinct)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256, help="timed decode steps per run")
    p.add_argument("--mode", choices=("graph", "compile", "eager"), default="graph")
    p.add_argument("--compile", action="store_true", help='= --mode compile (torch.compile "reduce-overhead")')
    p.add_argument("--check-steps", type=int, default=4, help="eager steps the graph run must reproduce")
    p.add_argument("--max-seconds", type=float, default=60.0, help="cap on one timed loop (eager fallback)")
    p.add_argument("--no-hf-check", action="store_true", help="skip bf16 vs HF generate")
    p.add_argument("--device", help="default: cuda if available (cpu with --tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here (and a .md beside it)")
    args = p.parse_args(argv)
    if args.compile:
        args.mode = "compile"
    if args.device is None:
        args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    return args


# ---- models and prompts ----------------------------------------------------------------------

def random_llama(shape: dict, device: str, layers: int | None, unique: int, seed: int):
    """A LlamaForCausalLM with random bf16 weights built on `device`; layer i copies layer i % unique."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(shape)
    if layers is not None:
        kw["num_hidden_layers"] = layers
    cfg = LlamaConfig(**kw)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)        # HF init: normal(0, initializer_range), on the device
    finally:
        torch.set_default_dtype(old)
    n = cfg.num_hidden_layers
    if 0 < unique < n:
        with torch.no_grad():
            for i in range(unique, n):
                src = model.model.layers[i % unique]
                for p_dst, p_src in zip(model.model.layers[i].parameters(), src.parameters()):
                    p_dst.copy_(p_src)
    return model.eval()


def build(args):
    """(model, name, prompt ids (max batch, P) int64 on the CPU)."""
    g = torch.Generator().manual_seed(args.seed)
    B, P = max(args.batch), args.prompt_len
    if args.tiny or args.model == "llama8b":
        name = "tiny" if args.tiny else "llama8b"
        model = random_llama(TINY if args.tiny else LLAMA8B, args.device, args.layers,
                             args.unique_layers, args.seed)
        prompt = torch.randint(0, model.config.vocab_size, (B, P), generator=g)
        return model, name, prompt
    from qins.metrics.models import default_corpus, load_model

    tok, model = load_model(None, dtype="bfloat16")
    model = model.to(args.device).eval()
    ids = tok(default_corpus()[:200_000], return_tensors="pt").input_ids[0]
    if ids.numel() < B * P:
        raise ValueError("the default corpus is too short for this batch and prompt length")
    starts = torch.randperm(ids.numel() // P, generator=g)[:B] * P   # B distinct windows of the docs
    return model, "default", torch.stack([ids[s:s + P] for s in starts.tolist()])


def quantize(model, spec: tuple, unique: int):
    """qins.quantize on `model` in place; layers that copy a unique layer reuse its codes."""
    import qins
    from qins.codec.tensor import QuantizedWeight
    from qins.weights.linear import is_linear_like

    cfg = qins.WeightConfig(*spec)
    n = model.config.num_hidden_layers
    pre = {}
    if 0 < unique < n:
        layer = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")
        names = [(nm, m) for nm, m in model.named_modules() if is_linear_like(m) and layer.match(nm)]
        for nm, m in names:
            a, i, b = layer.match(nm).groups()
            if int(i) < unique:
                pre[nm] = QuantizedWeight.from_float(m.weight.detach(), cfg, name=nm)
        for nm, _ in names:
            a, i, b = layer.match(nm).groups()
            if int(i) >= unique:
                pre[nm] = pre[f"{a}{int(i) % unique}{b}"]
    return qins.quantize(model, cfg, prequantized=pre or None, progress=False)


# ---- measurements ----------------------------------------------------------------------------

def hf_generate_match(model, prompt: torch.Tensor, tokens: torch.Tensor) -> float:
    """Share of `tokens` (B, n) that HF generate (greedy, its default cache) reproduces."""
    gc = copy.deepcopy(model.generation_config)
    gc.do_sample, gc.eos_token_id, gc.pad_token_id = False, None, 0
    gc.max_new_tokens = tokens.shape[1]
    dev = next(model.parameters()).device
    ids = prompt.to(dev)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    new = out[:, ids.shape[1]:].cpu()
    n = min(new.shape[1], tokens.shape[1])
    return float((new[:, :n] == tokens[:, :n]).float().mean())


def compare(ref, run) -> dict:
    """Greedy tokens and first logits of `run` against `ref` (DecodeRuns of the same prompts)."""
    from qins.metrics.generation import token_match

    n = min(ref.tokens.shape[1], run.tokens.shape[1])
    tm = token_match(ref.tokens[:, :n].tolist(), run.tokens[:, :n].tolist())
    return {"match": tm["match"], "match_before_divergence": tm["first_divergence_mean"] / n,
            "first_divergence": tm["first_divergence_mean"], "identical": tm["identical"],
            "sequences": tm["sequences"], "compared_tokens": n,
            "first_logit_max_abs_diff": float((run.first_logits - ref.first_logits).abs().max())}


def model_bytes(model) -> dict:
    from qins.metrics.memory import memory_report

    from qins.kernels.cuda_qlinear import is_tiled
    from qins.weights.linear import QINSLinear

    rep = memory_report(model)
    linears = [m for m in model.modules() if isinstance(m, QINSLinear) and m.tied_to is None]
    return {"weight_bytes": rep["total_bytes"], "quantized_bpw": rep["quantized_bpw"] or None,
            "bpw_all": rep["bpw_all"],
            # QINSLinear layers whose codes are tiled (kernels.tiles_take), of all with codes
            "tiled_layers": f"{sum(is_tiled(m.qweight) for m in linears)}/{len(linears)}" if linears else None}


def kernels_vs_reference(model, prompt) -> dict:
    """Logits through the kernels (QINS_KERNELS=auto) and through the torch reference
    (QINS_KERNELS=reference) of the prompt's first token and of its first 16: KL(reference ||
    kernels) per position, mean and max over the 17. 1 and 16 rows, so the layers take the
    batch 1-16 kernels that decoding runs; a longer prefill decodes each weight once and
    multiplies as the reference does, and reads 0 exactly (what runs before 2026-12-04 21:30 UTC
    measured, over the whole 32-token prompt)."""
    before = os.environ.get("QINS_KERNELS")
    kls, top1 = [], []
    try:
        with torch.inference_mode():
            for n in (1, 16):
                ids = prompt[:, :n].to(next(model.parameters()).device)
                out = {}
                for backend in ("auto", "reference"):
                    os.environ["QINS_KERNELS"] = backend
                    out[backend] = model(ids).logits.float().log_softmax(-1)
                p_ref, p_k = out["reference"], out["auto"]
                kls.append((p_ref.exp() * (p_ref - p_k)).sum(-1).flatten())           # nats per position
                top1.append((p_ref.argmax(-1) == p_k.argmax(-1)).float().flatten())
    finally:
        if before is None:
            os.environ.pop("QINS_KERNELS", None)
        else:
            os.environ["QINS_KERNELS"] = before
    kl, top = torch.cat(kls), torch.cat(top1)
    return {"kernel_vs_reference_kl_mean": float(kl.mean()), "kernel_vs_reference_kl_max": float(kl.max()),
            "kernel_vs_reference_top1": float(top.mean())}


def run_variant(label, model, prompt, args, refs: dict, quant_s, log) -> list[dict]:
    from qins.metrics.decode import greedy_decode

    rows = []
    mem = model_bytes(model)
    check = {}
    if label != "bf16":
        try:
            check = kernels_vs_reference(model, prompt)
            log(f"{label}: kernels vs reference, prefill KL mean {check['kernel_vs_reference_kl_mean']:.2e}"
                f" max {check['kernel_vs_reference_kl_max']:.2e}, top-1 {check['kernel_vs_reference_top1']:.4f}")
        except Exception as e:                                        # noqa: BLE001 - reported
            check = {"kernel_vs_reference_error": f"{type(e).__name__}: {str(e)[:200]}"}
    mem.update(check)
    for B in args.batch:
        row = {"variant": label, "batch": B, "quant_seconds": quant_s, **mem}
        try:
            run = greedy_decode(model, prompt[:B], args.new_tokens, mode=args.mode,
                                check_steps=args.check_steps, max_seconds=args.max_seconds)
        except Exception as e:                                        # noqa: BLE001 - reported
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            log(f"{label} b{B}: FAILED {row['error']}")
            rows.append(row)
            continue
        row.update(mode=run.mode, tokens_per_second=run.tokens_per_second, steps=run.steps,
                   seconds=run.seconds, ms_per_step=1e3 * run.seconds / max(run.steps, 1),
                   prefill_seconds=run.prefill_seconds, setup_seconds=run.setup_seconds,
                   graph_matches_eager=run.graph_matches_eager, error=run.error,
                   tokens_head=run.tokens[0, :16].tolist())
        if label == "bf16":
            refs[B] = run
            if not args.no_hf_check:
                try:
                    row["hf_generate_match"] = hf_generate_match(model, prompt[:B], run.tokens)
                except Exception as e:                                # noqa: BLE001 - reported
                    row["hf_generate_error"] = f"{type(e).__name__}: {str(e).strip()[:200]}"
        if B in refs:
            row.update(compare(refs[B], run))
        log(f"{label} b{B}: {run.mode} {run.tokens_per_second:.1f} tok/s over {run.steps} steps"
            + (f", HF generate reproduced {100 * row['hf_generate_match']:.1f}% of the tokens"
               if "hf_generate_match" in row else "")
            + (f" ({run.error})" if run.error else ""))
        rows.append(row)
    return rows


def environment(args) -> dict:
    import transformers

    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    dev = torch.device(args.device)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    return {"card": card, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": triton_v, "transformers": transformers.__version__,
            "python": platform.python_version()}


# ---- output ----------------------------------------------------------------------------------

def table(rows: list[dict]) -> str:
    from qins.metrics.render import Column, markdown_table

    bf16 = {r["batch"]: r.get("tokens_per_second") for r in rows if r["variant"] == "bf16"}

    def ratio(r):
        ref, v = bf16.get(r["batch"]), r.get("tokens_per_second")
        return f"{v / ref:.2f}x" if ref and v else "–"

    def pct(key):
        return lambda r: "–" if r.get(key) is None else f"{100 * r[key]:.1f}"

    def mode(r):
        m = r.get("mode") or "failed"
        return m + (" (fallback)" if r.get("error") and m == "eager" else "")

    cols = (Column("variant", "variant", left=True), Column("batch", "B"), Column("mode", "mode", mode),
            Column("tokens_per_second", "tok/s", "{:.1f}"), Column("ratio", "vs bf16", ratio),
            Column("ms_per_step", "ms/step", "{:.2f}"), Column("quant_seconds", "quant s", "{:.1f}"),
            Column("weight_bytes", "weights GiB", lambda r: f"{r['weight_bytes'] / 2**30:.3f}"),
            Column("match", "token match %", pct("match")),
            Column("match_before_divergence", "before 1st div. %", pct("match_before_divergence")),
            Column("first_logit_max_abs_diff", "max Δlogit, 1st token", "{:.3g}"),
            Column("graph_matches_eager", "graph = eager %", pct("graph_matches_eager")),
            Column("kernel_vs_reference_kl_mean", "KL kernels vs reference",
                   lambda r: "–" if r.get("kernel_vs_reference_kl_mean") is None
                   else f"{r['kernel_vs_reference_kl_mean']:.1e}"))
    return markdown_table(rows, cols)


def write(doc: dict, paths: list[Path]) -> None:
    from qins.metrics.render import write_json
    from qins._files import atomic_write

    errors = [f"- {r['variant']} b{r['batch']}: {r['error']}" for r in doc["rows"] if r.get("error")]
    md = "\n".join([f"# End-to-end greedy decode, {doc['model']['name']}", "",
                    f"Command: `{doc['command']}`", "",
                    f"- card: {doc['env']['card']}; date: {doc['env']['date']}",
                    f"- torch {doc['env']['torch']}, triton {doc['env']['triton']}, "
                    f"transformers {doc['env']['transformers']}",
                    f"- model: {doc['model']['description']}",
                    f"- prompt {doc['prompt_len']} tokens, {doc['new_tokens']} timed decode steps, "
                    f"StaticCache, step mode {doc['mode']}", "",
                    table(doc["rows"]), "", *(["Errors / fallbacks:", *errors, ""] if errors else [])])
    for p in paths:
        write_json(p, doc)
        atomic_write(p.with_suffix(".md"), md)


def main(argv=None) -> dict:
    args = parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    command = "python benchmarks/gpu/decode.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    t_start = t0 = time.perf_counter()
    base, name, prompt = build(args)
    build_s = time.perf_counter() - t0
    cfg = base.config
    unique = args.unique_layers if name != "default" and 0 < args.unique_layers < cfg.num_hidden_layers else None
    desc = (f"{type(base).__name__}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
            f"MLP {cfg.intermediate_size}, heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}, "
            f"vocab {cfg.vocab_size}, bf16, {sum(p.numel() for p in base.parameters()) / 1e9:.3f}B params"
            + ("" if name == "default" else ", random weights")
            + (f", layer i copies layer i mod {unique}" if unique else ""))
    log(f"{name}: {desc} (built in {build_s:.1f} s)")
    doc = {"model": {"name": name, "description": desc, "build_seconds": build_s, "unique_layers": unique},
           "env": environment(args), "command": command, "device": args.device, "mode": args.mode,
           "batches": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
           "check_steps": args.check_steps, "max_seconds": args.max_seconds, "seed": args.seed, "rows": []}
    refs: dict = {}
    for label in args.variants:
        spec = VARIANTS[label]
        quant_s = None
        try:
            if spec is None:
                model = base
            else:
                model = copy.deepcopy(base)
                t0 = time.perf_counter()
                quantize(model, spec, unique or 0)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                quant_s = time.perf_counter() - t0
                log(f"{label}: quantized in {quant_s:.1f} s")
            doc["rows"] += run_variant(label, model, prompt, args, refs, quant_s, log)
        except Exception as e:                                        # noqa: BLE001 - reported
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            log(f"{label}: FAILED {msg}")
            doc["rows"] += [{"variant": label, "batch": B, "quant_seconds": quant_s, "error": msg,
                             "weight_bytes": 0} for B in args.batch]
        finally:
            if spec is not None:
                model = None
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
    doc["total_seconds"] = time.perf_counter() - t_start
    paths = [Path(args.json)] if args.json else []
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / f"decode_{name}.json")
    write(doc, paths)
    print(table(doc["rows"]))
    return doc


if __name__ == "__main__":
    main()
