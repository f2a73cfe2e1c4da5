"""`qins ...`: parses arguments and calls the library, nothing more."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def _protocol(a):
    from .eval.harness import Protocol
    cal = getattr(a, "calibration_windows", 0) or 0
    if getattr(a, "kv_plan", None) == "auto" and not cal:
        cal = 8                     # --kv-plan auto calibrates key widths on the corpus's first 8 windows
    return Protocol(windows=a.windows, prompts=a.prompts, new_tokens=a.new_tokens, calibration_windows=cal)


def _group(s: str):
    if s.lower() in ("none", "ch", "channel"):
        return None
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"group size {s!r} is not an integer or 'none'") from None


def _parse_configs(items, flag: str):
    """FORMAT:BITS:GROUP strings -> WeightConfigs, with the flag named in any error."""
    from .codec.config import WeightConfig
    out = []
    for c in items:
        parts = c.split(":")
        if len(parts) != 3:
            raise ValueError(f"{flag} {c!r}: expected FORMAT:BITS:GROUP, e.g. qins:4:64 or int-asym:8:none")
        f, b, g = parts
        form = "FORMAT:BITS:GROUP (BITS an integer, GROUP an integer or 'none')"
        if not b.strip().isdigit():
            raise ValueError(f"{flag} {c!r}: BITS {b!r} is not an integer; expected {form}")
        try:
            group = _group(g)
        except ValueError as e:
            raise ValueError(f"{flag} {c!r}: {e}; expected {form}") from None
        try:
            out.append(WeightConfig(f, int(b), group))
        except ValueError as e:
            raise ValueError(f"{flag} {c!r}: {e}") from None
    return out


def _parse_menu(items, flag: str = "--candidates"):
    """BITS:GROUP strings -> [(bits, group)], with the flag named in any error."""
    out = []
    for c in items:
        parts = c.split(":")
        if len(parts) != 2 or not all(x.strip().isdigit() for x in parts):
            raise ValueError(f"{flag} {c!r}: expected BITS:GROUP with integers, e.g. 4:64")
        out.append((int(parts[0]), int(parts[1])))
    return out


def _add_device(p, what="the model runs"):
    p.add_argument("--device", default="cpu", help=f"where {what}: cpu (default), cuda or cuda:N")


def _add_dtype(p, default, what):
    p.add_argument("--dtype", default=default, choices=("auto", "float32", "bfloat16", "float16"),
                   help=f"{what} (default {default}; auto: the dtype the checkpoint is stored in, "
                        f"bfloat16 for a .gguf)")


def _device(a):
    """The --device as a torch.device; a clear error (before anything loads) where it is absent."""
    from .metrics.models import resolve_device
    try:
        return resolve_device(a.device)
    except ValueError as e:
        raise ValueError(f"--device: {e}") from None


def _weight_config(a):
    from .codec.config import WeightConfig, scale_dtype_for
    return WeightConfig(format=a.format, bits=a.bits, group_size=_group(a.group_size),
                        curvature=a.curvature, clip_search=not a.no_clip_search,
                        rounding=getattr(a, "rounding", "nearest"),
                        scale_dtype=scale_dtype_for(a.scales, a.format, a.bits))


def _add_protocol(p, windows=16, prompts=32):
    p.add_argument("--windows", type=int, default=windows, help="evaluation windows of 512 tokens")
    p.add_argument("--prompts", type=int, default=prompts, help="prompts for greedy token match")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--text", nargs="*", help="text file(s) to evaluate on instead of the default corpus")


def _add_weight(p):
    p.add_argument("--format", default="qins", help="qins, qins-seed, int-sym, int-asym, nf4, fp8")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", default="64", help="a multiple of 32, or 'none' for per channel")
    p.add_argument("--curvature", default="tensor", choices=("tensor", "channel"))
    p.add_argument("--no-clip-search", action="store_true")
    p.add_argument("--scales", default=DEFAULT_SCALES, choices=("auto", "float16", "log8"),
                   help=f"how group scales are stored (default {DEFAULT_SCALES}: log8 for symmetric formats at 2-6 "
                        f"bits, else float16). log8: 8 bits on a log grid below each row's largest scale (0.125 bpw "
                        f"instead of 0.25 at group size 64); in a mixed-precision plan it applies to every candidate")


def _add_kv(p):
    p.add_argument("--kv-bits", default=None, help="QINSCache bits, K or K,V (2,3,4,5,6,8); default: no KV compression")
    p.add_argument("--kv-residual", type=int, default=None, help="most recent tokens kept full precision (default 128)")
    p.add_argument("--kv-page-kb", type=int, default=None, help="KV page size in KiB, 16..64 (default 32)")
    p.add_argument("--kv-prerope", action="store_true",
                   help="quantize keys with the model's RoPE turned back (lower error at every width; on a GPU "
                        "decode attention then runs the Triton kernel, not the CUDA one)")
    p.add_argument("--kv-rotate-values", action="store_true",
                   help="quantize values turned by a block-Hadamard matrix, turned back when read (lower error)")
    p.add_argument("--kv-plan", default=None, metavar="auto|sampled|FILE",
                   help="calibrated key widths per channel (same bits): 'auto' calibrates on the first 8 windows "
                        "of the corpus (disjoint from evaluation), 'sampled' on 8 x 512 tokens the model writes "
                        "itself (no text needed), FILE loads a saved KeyPlan (JSON)")
    p.add_argument("--kv-plan-out", default=None, metavar="FILE",
                   help="save the key plan used (JSON, written atomically) to reuse with --kv-plan FILE")


def _kv_config(a):
    from .kv.config import from_flags
    kv = from_flags(a.kv_bits, a.kv_residual, a.kv_page_kb, a.kv_prerope or None, a.kv_rotate_values or None)
    if a.kv_plan is not None:
        if kv is None:
            raise ValueError("--kv-plan needs --kv-bits")
        if a.kv_plan not in ("auto", "sampled") and not Path(a.kv_plan).is_file():
            raise ValueError(f"--kv-plan: no such file {a.kv_plan!r} (or pass 'auto' or 'sampled')")
    if a.kv_plan_out is not None:
        if a.kv_plan is None:
            raise ValueError("--kv-plan-out needs --kv-plan (auto, sampled or a file)")
        if not Path(a.kv_plan_out).resolve().parent.is_dir():
            raise ValueError(f"--kv-plan-out: no such directory for {a.kv_plan_out!r}")
    return kv


def _save_plan(a, plan) -> None:
    if a.kv_plan_out is not None and plan is not None:
        plan.save(a.kv_plan_out)
        print(f"key plan ({plan.source}) saved to {a.kv_plan_out}", file=sys.stderr)


def cmd_demo(a):
    from .eval.demo import run_demo
    res = run_demo(a.out, _protocol(a), command=a.command)
    _maybe_json(a, res)


DEFAULT_ROUNDING = "gptq"            # qins compress without --rounding: GPTQ on the corpus's first windows
DEFAULT_EMBEDDINGS = "6:128"         # embeddings / lm_head: BITS:GROUP unless --embeddings or --no-embeddings
DEFAULT_SCALES = "auto"              # --scales: log8 where allowed (quality-neutral at 4 bits:
                                     # benchmarks/results/defaults_quality.md), linears and embeddings
# GPTQ / plan calibration: 512-token windows from the start of the text. 32 against 8 on the
# default model (4-bit defaults, benchmarks/results/calibration_windows.md): KL 0.064 vs 0.068
# on the corpus's held-out end, 0.087 vs 0.097 on Python source, 0.162 vs 0.177 on the GPL;
# 64 was no better on two of the three texts; about a minute longer on 2 cores
DEFAULT_CALIBRATION_WINDOWS = 32
DEFAULT_SHARD_GB = 0.5               # --stream: output GiB per recorded (resumable) shard
# flags a mixed-precision plan (--target-bpw / --max-kl / --max-ppl-increase) decides itself
_BUDGET_IGNORES = (("bits", "--bits", 4), ("group_size", "--group-size", "64"), ("rounding", "--rounding", None),
                   ("curvature", "--curvature", "tensor"), ("no_clip_search", "--no-clip-search", False),
                   ("embeddings", "--embeddings", None))


def _embedding_config(a, config):
    """The WeightConfig of the embeddings / lm_head in a fixed-config compress, or None (float)."""
    if a.no_embeddings:
        if a.embeddings is not None:
            raise ValueError("--embeddings and --no-embeddings contradict each other")
        return None
    spec = a.embeddings or DEFAULT_EMBEDDINGS
    if spec.count(":") == 1:
        spec = f"{config.format}:{spec}"
    (cfg,) = _parse_configs([spec], "--embeddings")
    from .codec.config import scale_dtype_for
    return cfg.replace(rounding=config.rounding, curvature=config.curvature, clip_search=config.clip_search,
                       scale_dtype=scale_dtype_for(a.scales, cfg.format, cfg.bits))


def cmd_compress(a):
    if a.stream:
        return _compress_stream(a)
    if a.shard_gb != DEFAULT_SHARD_GB:
        raise ValueError("--shard-gb applies to --stream only")
    from . import load_model, quantize, save
    from .metrics.quality import token_windows
    from .metrics.models import read_corpus, resolve_dtype

    if a.include_embeddings:
        print("qins compress: note: --include-embeddings is deprecated and does nothing: embeddings and "
              "lm_head are now quantized by default (--no-embeddings keeps them in float)", file=sys.stderr)
    modes = [x for x in (a.target_bpw, a.max_kl, a.max_ppl_increase) if x is not None]
    if len(modes) > 1:
        raise ValueError("give at most one of --target-bpw, --max-kl, --max-ppl-increase")
    if modes:
        given = [flag for attr, flag, default in _BUDGET_IGNORES if getattr(a, attr) != default]
        if given:
            raise ValueError(f"{', '.join(given)} cannot be combined with a mixed-precision plan (--target-bpw, "
                             f"--max-kl, --max-ppl-increase): the plan picks bits and groups per tensor from "
                             f"--candidates, with GPTQ rounding, and covers embeddings unless --no-embeddings")
        menu = _parse_menu(a.candidates) if a.candidates else None
    elif a.candidates is not None or a.coded:
        raise ValueError(f"{'--candidates' if a.candidates is not None else '--coded'} applies to a mixed-precision "
                         f"plan only (--target-bpw, --max-kl or --max-ppl-increase)")
    if a.coded_threshold is not None and not a.coded:
        raise ValueError("--coded-threshold applies with --coded only")
    if a.coded_threshold is not None:
        _check_threshold(a.coded_threshold, "--coded-threshold")
    a.rounding = a.rounding or DEFAULT_ROUNDING
    config = _weight_config(a)                 # bad options fail before the model loads
    emb_config = None if modes else _embedding_config(a, config)
    device = _device(a)
    if a.calibration_windows is not None and a.calibration_windows < 1:
        raise ValueError(f"--calibration-windows must be at least 1, got {a.calibration_windows}")
    if a.model is not None and not Path(a.model).exists():
        raise FileNotFoundError(f"model not found: {a.model}")
    try:
        store_dtype = resolve_dtype(a.dtype, a.model)
    except ValueError as e:
        raise ValueError(f"--dtype: {e}") from None
    calibrate = bool(a.calibration_text is not None or a.calibration_windows or modes or config.rounding == "gptq")
    text = read_corpus(a.calibration_text or None) if calibrate else None
    # calibration and quantization run in float32 (exact for a bfloat16/float16 source); the
    # float tensors that stay float are stored in --dtype
    tok, model = load_model(a.model, dtype="float32", device=device)
    stats = wins = None
    where = "the default corpus" if not a.calibration_text else " ".join(a.calibration_text)
    if calibrate:
        wins = token_windows(tok, text, 512, max_windows=a.calibration_windows or DEFAULT_CALIBRATION_WINDOWS)
        print(f"calibration: first {wins.shape[0]} windows x 512 tokens of {where}; "
              f"qins eval/compare evaluate on the last windows of the corpus (disjoint)")
    if modes:
        from .weights.allocate import default_candidates
        from .weights.budget import plan_table, quantize_to_budget
        cands = default_candidates(a.format, scales=a.scales, **({"menu": menu} if menu else {}))
        size = None
        if a.coded:
            from .entropy.archive import WeightCodedSize
            from .entropy.policy import DEFAULT_THRESHOLD
            size = WeightCodedSize(DEFAULT_THRESHOLD if a.coded_threshold is None else a.coded_threshold)
        rep = quantize_to_budget(model, wins, target_bpw=a.target_bpw, max_kl=a.max_kl,
                                 max_ppl_increase=a.max_ppl_increase, candidates=cands,
                                 include_embeddings=not a.no_embeddings, skip=a.skip or (),
                                 describe=f"first windows of {where}", size=size)
        print(plan_table(rep))
    else:
        if calibrate:
            if config.rounding == "gptq":
                from .weights.calibration import input_hessians
                stats = input_hessians(model, wins)
            else:
                from .weights.calibration import input_second_moments
                stats = input_second_moments(model, wins)
        quantize(model, config, skip=a.skip, embeddings=emb_config, calibration=stats)
    model.to(store_dtype)                      # codes, scales and curvatures keep their own dtypes
    if getattr(model, "config", None) is not None:
        model.config.dtype = store_dtype       # what `--dtype auto` and from_pretrained(dtype="auto") read
    path = save(model, a.output, tokenizer=tok)
    from .metrics.memory import memory_report, format_bytes
    mem = memory_report(model)
    emb = ("float" if a.no_embeddings else "per the plan") if modes or emb_config is None else emb_config.label
    print(f"wrote {path}: {format_bytes(mem['total_bytes'])} held, quantized layers {mem['quantized_bpw']:.3f} bpw, "
          f"whole model {mem['bpw_all']:.3f} bpw (linears {config.label if not modes else 'per the plan'}, "
          f"embeddings {emb}, float tensors {str(store_dtype).replace('torch.', '')})")
    _maybe_json(a, {"path": str(path), "memory": mem})


def _compress_stream(a):
    """qins compress --stream: tensor by tensor (layer by layer with gptq) from the safetensors files, resumable."""
    from .weights.stream import compress_checkpoint
    if a.model is None:
        raise ValueError("--stream reads a local safetensors checkpoint directory: give MODEL")
    given = [flag for flag, on in (("--target-bpw", a.target_bpw is not None), ("--max-kl", a.max_kl is not None),
                                   ("--max-ppl-increase", a.max_ppl_increase is not None),
                                   ("--candidates", a.candidates is not None), ("--coded", a.coded),
                                   ("--coded-threshold", a.coded_threshold is not None)) if on]
    if given:
        raise ValueError(f"{', '.join(given)} cannot be combined with --stream: streaming compression applies one "
                         f"fixed config (mixed-precision plans need the whole model)")
    a.rounding = a.rounding or "nearest"       # streaming defaults to data-free rounding
    if a.rounding != "gptq" and (a.calibration_text is not None or a.calibration_windows is not None):
        raise ValueError("--calibration-text / --calibration-windows with --stream apply to --rounding gptq only")
    if a.calibration_windows is not None and a.calibration_windows < 1:
        raise ValueError(f"--calibration-windows must be at least 1, got {a.calibration_windows}")
    config = _weight_config(a)
    emb = _embedding_config(a, config)
    device = _device(a)
    wins = None
    if config.rounding == "gptq":
        from transformers import AutoTokenizer

        from .metrics.models import read_corpus
        from .metrics.quality import token_windows
        text = read_corpus(a.calibration_text or None)
        try:
            tok = AutoTokenizer.from_pretrained(a.model)
        except Exception as e:                     # transformers raises many types here
            raise ValueError(f"--stream --rounding gptq tokenizes its calibration text with {a.model}'s tokenizer, "
                             f"which does not load ({type(e).__name__}: {e})") from None
        wins = token_windows(tok, text, 512, max_windows=a.calibration_windows or DEFAULT_CALIBRATION_WINDOWS)
        where = "the default corpus" if not a.calibration_text else " ".join(a.calibration_text)
        print(f"calibration: first {wins.shape[0]} windows x 512 tokens of {where}, run through the already "
              f"quantized layers (sequential GPTQ, one layer in memory, on {device})")
    path = compress_checkpoint(a.model, a.output, config, skip=a.skip, embeddings=emb,
                               dtype=None if a.dtype == "auto" else a.dtype,
                               shard_bytes=int(a.shard_gb * 2**30), calibration=wins, device=device)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    print(f"wrote {path}: {size / 1e9:.3f} GB on disk")
    _maybe_json(a, {"path": str(path), "bytes_on_disk": size})


def _dtype(a, source):
    """The --dtype as a torch dtype for `source` ("auto": the dtype it is stored in)."""
    from .metrics.models import resolve_dtype
    try:
        return resolve_dtype(a.dtype, source)
    except ValueError as e:
        raise ValueError(f"--dtype: {e}") from None


def _load_any(src, device=None, dtype=None):
    """(tok, model) for a saved qins dir or a float model, on `device`, its float tensors in
    `dtype` (a torch dtype; None: float32)."""
    import torch
    from . import load, load_model
    from .weights.plan import is_saved_model
    dtype = dtype or torch.float32
    if is_saved_model(src):
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(src)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok, load(src, device=device, dtype=dtype)
    return load_model(src, dtype=dtype, device=device)


def cmd_eval(a):
    from .eval.harness import Harness
    from .metrics.models import load_model, read_corpus
    from .metrics.render import print_table

    text = read_corpus(a.text) if a.text else None      # a missing file fails before the models load
    kv = _kv_config(a)                                  # bad KV flags fail before the models load
    device = _device(a)
    if a.model is not None and not Path(a.model).exists():
        raise FileNotFoundError(f"model not found: {a.model}")
    if a.model is None and kv is None:
        raise ValueError("give the model to evaluate (a qins-saved dir, or a float model with --reference), "
                         "or --kv-bits to measure a compressed KV cache on the embedded model")
    if a.model is None and a.reference is not None:
        raise ValueError("--reference needs the model to evaluate")
    # the float model to compare against; refusals come before anything loads
    from .weights.plan import is_saved_model
    if a.model is not None and is_saved_model(a.model):
        from .weights.serialization import reference_checkpoint
        ref_source = reference_checkpoint(a.model, a.reference)
    elif a.reference is not None or kv is not None:
        ref_source = a.reference if a.reference is not None else a.model     # KV rows: the model itself
    else:
        raise ValueError(f"{a.model} is a float model: give --reference (the model to compare it against) or "
                         f"--kv-bits (to measure a compressed KV cache against its own float cache); without "
                         f"either it would be compared with itself")
    dtype = _dtype(a, a.model)
    tok, model = _load_any(a.model, device, dtype) if a.model is not None else load_model(None, dtype, device)
    _, ref_model = load_model(ref_source, dtype=_dtype(a, ref_source), device=device)
    h = Harness(tok, ref_model, _protocol(a), text=text)
    rows = [h.measure(model, a.label or str(a.model), match=a.prompts > 0)]
    if kv is not None:
        from .eval.kv import measure_dynamic, measure_kv
        from .kv.plan import resolve_key_plan
        plan = resolve_key_plan(a.kv_plan, model, kv, lambda: h.calibration_windows,
                                f"calibration {h.describe()['calibration_windows']}", h.protocol.batch_size, h.progress)
        _save_plan(a, plan)
        rows += [measure_dynamic(h, model), measure_kv(h, model, kv, match=a.prompts > 0, key_plan=plan)]
    ref_name = ref_source or "the embedded model"
    print_table(rows, title=f"{a.model or 'the embedded model'} vs float {ref_name} — {h.describe()['eval_windows']}")
    _maybe_json(a, {"meta": dict(h.describe(), reference=ref_name), "rows": rows})


def cmd_compare(a):
    from .eval.compare import grid, run_compare
    from .eval.harness import Harness
    from .metrics.render import plot_frontier, print_table, write_json, write_markdown
    from .metrics.models import load_model, read_corpus

    if a.configs:                       # bad options fail before the model loads
        configs = _parse_configs(a.configs, "--configs")
    else:
        configs = grid(a.formats, a.bits_list, [_group(g) for g in a.groups])
    text = read_corpus(a.text) if a.text else None
    tok, model = load_model(a.model)
    h = Harness(tok, model, _protocol(a), text=text)
    meta = h.describe()
    meta["model"] = a.model or "SmolLM2-135M-Instruct (embedded)"

    def flush(rows):                   # the report grows as results arrive
        write_json(f"{a.out}/results.json", {"meta": meta, "rows": rows})
        write_markdown(f"{a.out}/report.md", "qins compare: QINS vs INT / NF4 / FP8", meta, rows, a.command)

    calibrated = [c for c in configs if c.bits in a.calibrated_bits and c.format in a.calibrated_formats]
    rows = run_compare(h, configs, match_bits=tuple(a.match_bits), with_peers=not a.no_peers, on_row=flush,
                       calibrated=calibrated, methods=tuple(a.calibration), budgets=tuple(a.budgets))
    flush(rows)
    plot_frontier(rows, a.out)
    from pathlib import Path
    if a.embeddings:                    # second model with genuine float weights
        from .eval.embeddings import compare_embeddings, format_table
        emb = compare_embeddings(methods=("none", "act", "gptq"))
        Path(a.out, "embeddings.md").write_text(f"# all-MiniLM-L6-v2: mean cosine to float\n\nCommand: `{a.command}`\n\n"
                                              f"{emb['setup']}\n\n{format_table(emb['rows'])}\n")
        write_json(f"{a.out}/embeddings.json", emb)
        print(format_table(emb["rows"]))
    if a.synthetic:                     # Gaussian / Laplacian vs Lloyd-Max and the R-D bound
        from .eval.synthetic import markdown_table, synthetic_report
        fmts = tuple(dict.fromkeys(c.format for c in configs if c.format != "qins-seed")) or ("qins",)
        syn = synthetic_report(bits=tuple(sorted({c.bits for c in configs})), shape=(a.synthetic_rows, 4096),
                               group_sizes=(64, 128, None), formats=fmts)
        Path(a.out, "synthetic.md").write_text(f"# Synthetic sources\n\nCommand: `{a.command}`\n\n{markdown_table(syn)}\n")
        write_json(f"{a.out}/synthetic.json", {"rows": syn})
        print(markdown_table(syn))
    print_table(rows, title=f"qins compare — {meta['eval_windows']}; float ppl {meta['ppl_ref']:.3f}")
    print(f"report: {a.out}/report.md, plots: {a.out}/kl_vs_bpw.png {a.out}/ppl_vs_bpw.png")
    _maybe_json(a, {"meta": meta, "rows": rows})


def cmd_synthetic(a):
    from .eval.synthetic import markdown_table, synthetic_report
    rows = synthetic_report(bits=tuple(a.bits_list), shape=(a.rows, a.cols),
                            group_sizes=tuple(_group(g) for g in a.groups), formats=tuple(a.formats), seed=a.seed)
    print(markdown_table(rows))
    _maybe_json(a, {"command": a.command, "rows": rows})


def cmd_embeddings(a):
    from .eval.embeddings import DEFAULT_CONFIGS, compare_embeddings, format_table
    configs = _parse_configs(a.configs, "--configs") if a.configs else DEFAULT_CONFIGS
    res = compare_embeddings(configs, methods=tuple(a.methods), path=a.model, n_eval=a.sentences)
    print(format_table(res["rows"]))
    _maybe_json(a, dict(res, command=a.command))


def cmd_generate(a):
    import torch
    kv = _kv_config(a)                                  # bad KV flags fail before the model loads
    device = _device(a)
    if not Path(a.model).exists():
        raise FileNotFoundError(f"model not found: {a.model}")
    tok, model = _load_any(a.model, device, _dtype(a, a.model))
    msgs = [{"role": "user", "content": a.prompt}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) if tok.chat_template else a.prompt
    ids = tok(text, return_tensors="pt", add_special_tokens=False).to(device)
    kw = dict(max_new_tokens=a.max_new_tokens, pad_token_id=tok.pad_token_id)
    cache = None
    if kv is not None:
        from .kv import QINSCache
        from ._compat import cache_kwarg
        from .metrics.quality import token_windows
        from .kv.plan import resolve_key_plan
        from .metrics.models import default_corpus
        plan = resolve_key_plan(a.kv_plan, model, kv, lambda: token_windows(tok, default_corpus(), 512, max_windows=8),
                                "default corpus, windows 0..7")
        _save_plan(a, plan)
        cache = QINSCache(model, config=kv, key_plan=plan)
        kw[cache_kwarg(model)] = cache
    if a.sample:
        torch.manual_seed(a.seed)
        kw.update(do_sample=True, temperature=a.temperature, top_p=a.top_p)
    else:
        kw.update(do_sample=False)
    with torch.inference_mode():
        out = model.generate(**ids, **kw)
    new = out[0, ids["input_ids"].shape[1]:]
    answer = tok.decode(new, skip_special_tokens=True)
    print(answer)
    doc = {"prompt": a.prompt, "output": answer, "tokens": new.tolist()}
    if cache is not None:
        doc["kv"] = {"config": kv.to_dict(), "nbytes": cache.nbytes(), "bits_per_element": cache.bits_per_element(),
                     "tokens": cache.get_seq_length(),
                     "key_plan": None if plan is None else {"source": plan.source, "layers": len(plan.layers),
                                                            "histogram": plan.histogram()}}
        print(f"KV cache ({kv.label}): {cache.nbytes()} bytes for {cache.get_seq_length()} tokens, "
              f"{cache.bits_per_element():.3f} bits/element (all-in)", file=sys.stderr)
    _maybe_json(a, doc)


def _check_threshold(value: float, flag: str) -> None:
    """A policy threshold is the least saving worth coding: a fraction in [0, 1)."""
    if not (0.0 <= value < 1.0):                     # also refuses nan
        raise ValueError(f"{flag} is the least saving worth entropy-coding, a fraction in [0, 1): got {value}")


def cmd_analyze(a):
    from .entropy.report import analyze
    from .weights.plan import is_saved_model
    _check_threshold(a.threshold, "--threshold")
    if not is_saved_model(a.dir):
        raise ValueError(f"{a.dir} is not a directory written by qins compress / qins.save "
                         f"(analyze measures the stored codes: compress the model first)")
    doc = analyze(a.dir, a.output, threshold=a.threshold, cold=tuple(a.cold), kv_tokens=a.kv_tokens,
                  kv_bits=a.kv_bits, command=a.command)
    s = doc["summary"]
    print(f"{s['tensors']} tensors, {s['raw_bytes']} bytes raw; order-0 ideal "
          f"{1 - s['ideal_bytes'] / s['raw_bytes']:.2%} saving, zstd {1 - s['zstd_bytes'] / s['raw_bytes']:.2%}, "
          f"ANS {1 - s['ans_bytes'] / s['raw_bytes']:.2%}, policy (>= {a.threshold:.0%}) {s['policy_saving']:.2%}")
    if "kv" in doc:
        t = doc["kv"]["planes"]["total"]
        print(f"KV pages ({doc['kv']['tokens']} tokens, {a.kv_bits}-bit): {t['raw_bytes']} bytes raw; ideal "
              f"{1 - t['ideal_bytes'] / t['raw_bytes']:.2%}, zstd {1 - t['zstd'] / t['raw_bytes']:.2%}, "
              f"ANS {1 - t['ans'] / t['raw_bytes']:.2%} (with one table per layer and plane "
              f"{1 - t['ans_layer'] / t['raw_bytes']:.2%}), RLE {1 - t['rle'] / t['raw_bytes']:.2%} saving")
    print(f"wrote {a.output}/policy.json, analysis.json, analysis.md")
    _maybe_json(a, doc["summary"])


def cmd_pack(a):
    from .entropy.archive import pack
    from .entropy.policy import read_policy
    _check_threshold(a.threshold, "--threshold")
    policy = read_policy(a.policy) if a.policy else None
    r = pack(a.dir, a.output, policy=policy, threshold=a.threshold)
    on_disk = sum(p.stat().st_size for p in Path(a.dir).iterdir() if p.is_file())
    print(f"{a.output}: {r['archive_bytes']} bytes ({on_disk} in {a.dir}, {r['archive_bytes'] / on_disk:.4f}x); "
          f"{r['tensors']} tensors, {r['raw_bytes']} tensor bytes raw; codecs {r['codecs']} "
          f"({'policy ' + a.policy if a.policy else f'measured while packing, threshold {a.threshold:.0%}'})")
    _maybe_json(a, {**r, "dir_bytes": on_disk, "policy": a.policy, "threshold": a.threshold})


def cmd_unpack(a):
    from .entropy.archive import unpack
    out = unpack(a.archive, a.output, threads=a.threads)
    print(f"{a.archive} -> {out}")
    _maybe_json(a, {"archive": a.archive, "output": str(out)})


def _maybe_json(a, doc):
    if getattr(a, "json", None):
        from .metrics.render import write_json
        write_json(a.json, doc)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qins", description="QINS compression of LLM weights, measured against the float model")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("demo", help="compress + evaluate the default model, write a report")
    _add_protocol(p, windows=8)
    p.add_argument("--calibration-windows", type=int, default=8,
                   help="calibration windows for the calibrated row (0: none), disjoint from evaluation")
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("compress", help="quantize a model and save it")
    p.add_argument("model", nargs="?", default=None, help="local HF dir or .gguf (default: embedded model)")
    p.add_argument("-o", "--output", required=True)
    _add_weight(p)
    p.add_argument("--rounding", default=None, choices=("nearest", "gptq"),
                   help="gptq (default): error-compensating rounding calibrated on the first windows of the "
                        "corpus (or --calibration-text); nearest: no data")
    p.add_argument("--skip", nargs="*", default=None, help="module name patterns kept in float")
    p.add_argument("--embeddings", default=None, metavar="[FORMAT:]BITS:GROUP",
                   help=f"embeddings / lm_head config (default {DEFAULT_EMBEDDINGS}, format from --format; "
                        f"a tied lm_head shares the embedding's codes)")
    p.add_argument("--no-embeddings", action="store_true",
                   help="keep embeddings / lm_head in float (fixed config and mixed plan alike)")
    p.add_argument("--include-embeddings", action="store_true",
                   help="deprecated, does nothing: embeddings are quantized by default")
    p.add_argument("--calibration-text", nargs="*", default=None,
                   help="text file(s) for calibration (no files: the default corpus's first windows)")
    p.add_argument("--calibration-windows", type=int, default=None,
                   help=f"512-token calibration windows from the start of the text (default "
                        f"{DEFAULT_CALIBRATION_WINDOWS} when calibrating, fewer if the text is shorter)")
    g = p.add_argument_group("mixed precision (every tensor counted, embeddings included; --format sets the codebook)")
    g.add_argument("--target-bpw", type=float, default=None, help="best quality within this whole-model bpw")
    g.add_argument("--max-kl", type=float, default=None, help="fewest bits with KL <= this (nats/token)")
    g.add_argument("--max-ppl-increase", type=float, default=None, help="fewest bits with ppl <= +this percent")
    g.add_argument("--candidates", nargs="*", default=None, help="BITS:GROUP choices (default 3:64 4:128 4:64 5:64 6:64 8:128)")
    g.add_argument("--coded", action="store_true",
                   help="charge each candidate its entropy-coded bytes in the .qins archive (its codes, scales and "
                        "curvature coded as `qins pack` codes them), not its raw packed bytes: --target-bpw then "
                        "bounds the packed archive's tensors (float tensors still counted raw)")
    g.add_argument("--coded-threshold", type=float, default=None,
                   help="with --coded: the `qins pack --threshold` the archive will be written with (default 0.05); "
                        "a tensor whose coding saves less is charged raw")
    _add_device(p, "the model, its calibration and the quantization run (the saved files are the same)")
    _add_dtype(p, "auto", "dtype of the tensors stored in float (norms, biases, float embeddings); "
                          "calibration and quantization compute in float32")
    g = p.add_argument_group("streaming (bounded memory: one tensor, or one layer with --rounding gptq)")
    g.add_argument("--stream", action="store_true",
                   help="read MODEL's safetensors tensor by tensor, never the whole model; resumable: rerun the "
                        "same command after an interruption. Rounding defaults to nearest (no data); "
                        "--rounding gptq runs sequential GPTQ layer by layer on --device")
    g.add_argument("--shard-gb", type=float, default=DEFAULT_SHARD_GB,
                   help=f"output GiB recorded at a time: what an interruption can lose (default {DEFAULT_SHARD_GB})")
    p.set_defaults(fn=cmd_compress)

    p = sub.add_parser("eval", help="quality + memory vs the uncompressed model")
    p.add_argument("model", nargs="?", default=None,
                   help="a qins-saved dir, or a float model (with --reference, or --kv-bits); "
                        "with --kv-bits alone: the embedded model")
    p.add_argument("--reference", default=None,
                   help="the float model to compare against (default: the source recorded in DIR/qins.json, "
                        "checked by content hash)")
    p.add_argument("--label", default=None)
    _add_protocol(p)
    _add_kv(p)
    _add_device(p, "both models run")
    _add_dtype(p, "float32", "dtype both models compute in, so the comparison measures quantization alone")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("compare", help="QINS vs INT/NF4/FP8 at several bit widths, report + plots")
    p.add_argument("model", nargs="?", default=None)
    _add_protocol(p)
    p.add_argument("--formats", nargs="+", default=["qins", "int-sym", "int-asym", "nf4", "fp8", "qins-seed"])
    p.add_argument("--bits", dest="bits_list", nargs="+", type=int, default=[8, 6, 5, 4, 3])
    p.add_argument("--groups", nargs="+", default=["64", "128", "none"])
    p.add_argument("--configs", nargs="*", default=None,
                   help="FORMAT:BITS:GROUP list instead of the --formats x --bits x --groups grid")
    p.add_argument("--match-bits", nargs="*", type=int, default=[8], help="bit widths that also get greedy token match")
    p.add_argument("--no-peers", action="store_true", help="skip HQQ / bitsandbytes even if installed")
    p.add_argument("--calibrated-bits", nargs="*", type=int, default=[8, 4],
                   help="bit widths also measured with activation-weighted calibration")
    p.add_argument("--calibrated-formats", nargs="*", default=["qins", "int-asym"])
    p.add_argument("--calibration", nargs="+", default=["act", "gptq"], choices=("act", "gptq"),
                   help="calibrated rows: activation-weighted error, GPTQ rounding, or both")
    p.add_argument("--embeddings", action="store_true",
                   help="also measure all-MiniLM-L6-v2 sentence-embedding cosine (qins embeddings)")
    p.add_argument("--synthetic", action="store_true",
                   help="also measure Gaussian/Laplacian matrices vs Lloyd-Max and the R-D bound (qins synthetic)")
    p.add_argument("--synthetic-rows", type=int, default=1024, help="rows of the 4096-column synthetic matrices")
    p.add_argument("--budgets", nargs="*", type=float, default=[],
                   help="whole-model bpw targets for the mixed-precision allocator (e.g. 5.33 4.0)")
    p.add_argument("--calibration-windows", type=int, default=8,
                   help="calibration windows from the start of the corpus (disjoint from evaluation)")
    p.add_argument("--out", default="runs/compare")
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("synthetic", help="Gaussian/Laplacian matrices vs Lloyd-Max and the R-D bound")
    p.add_argument("--bits", dest="bits_list", nargs="+", type=int, default=[2, 3, 4, 5, 6, 8])
    p.add_argument("--groups", nargs="+", default=["64", "128", "none"])
    p.add_argument("--formats", nargs="+", default=["qins", "int-sym", "int-asym", "nf4", "fp8"])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_synthetic)

    p = sub.add_parser("embeddings", help="sentence-embedding cosine vs float on all-MiniLM-L6-v2")
    p.add_argument("model", nargs="?", default=None, help="a sentence-transformers dir (default: embedded MiniLM)")
    p.add_argument("--configs", nargs="*", default=None, help="FORMAT:BITS:GROUP, e.g. qins:4:64")
    p.add_argument("--methods", nargs="+", default=["none", "act", "gptq"], choices=("none", "act", "gptq"))
    p.add_argument("--sentences", type=int, default=300, help="evaluation sentences")
    p.set_defaults(fn=cmd_embeddings)

    p = sub.add_parser("generate", help="greedy or sampled generation")
    p.add_argument("model", help="a qins-saved dir or a float model")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--sample", action="store_true")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    _add_kv(p)
    _add_device(p)
    _add_dtype(p, "auto", "dtype the model's float tensors compute in")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("analyze", help="entropy statistics per tensor and the hot/cold policy pack applies")
    p.add_argument("dir", help="a directory written by qins compress / qins.save")
    p.add_argument("-o", "--output", default="runs/analyze", help="folder for policy.json, analysis.json/.md/.png")
    p.add_argument("--threshold", type=float, default=0.05,
                   help="entropy-code a tensor only where the measured saving is at least this (default 0.05)")
    p.add_argument("--cold", nargs="*", default=[], help="name patterns marked cold (embeddings always are)")
    p.add_argument("--kv-tokens", type=int, default=0,
                   help="also measure QINSCache pages after prefill + generation to this many tokens (0: skip)")
    p.add_argument("--kv-bits", type=int, default=4)
    p.set_defaults(fn=cmd_analyze)

    p = sub.add_parser("pack", help="a saved directory -> one entropy-coded .qins archive")
    p.add_argument("dir", help="a directory written by qins compress / qins.save")
    p.add_argument("-o", "--output", required=True, help="the .qins file (replaced atomically)")
    p.add_argument("--policy", default=None, help="policy JSON from qins analyze (default: measure while packing)")
    p.add_argument("--threshold", type=float, default=0.05,
                   help="entropy-code a tensor only if the measured saving is at least this (default 0.05)")
    p.set_defaults(fn=cmd_pack)

    p = sub.add_parser("unpack", help="a .qins archive -> a saved directory")
    p.add_argument("archive")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--threads", type=int, default=None, help="decode threads (default: one per CPU)")
    p.set_defaults(fn=cmd_unpack)

    for sp in sub.choices.values():
        sp.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = build_parser().parse_args(argv)
    a.command = "qins " + " ".join(shlex.quote(x) for x in argv)
    try:
        a.fn(a)
    except (ValueError, FileNotFoundError) as e:     # bad input; anything else is a bug: traceback
        print(f"qins {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
