"""KeyPlan: calibrated bit widths per key channel, spending a layer's key bits where queries look.

Why. A key error Δ moves an attention score by q·Δ = Σ_d q_d Δ_d, so with independent errors
the score error is Σ_d E[q_d²] E[Δ_d²]. Queries put very unequal weight on the channels of a
head (after RoPE, a few low-frequency channels carry most of q·k), and keys' ranges differ
per channel too, so a uniform width wastes bits on channels the scores ignore. On the default
model, 4-bit K and V at residual 0 with the cache in the loop (16 windows,
benchmarks/results/kv_quality_keyplan_w16.md): KL 0.0223 -> 0.0137 and perplexity +2.04% ->
+1.24% at the same 4.258 bits per element; 3 bits +12.8% -> +7.4%, 2 bits +105% -> +52%.

How. `calibrate_keys` runs the model over calibration windows once and, for every
full-attention layer whose keys have zero points, measures per (kv head h, channel d)

    cost_h,d(w) = E[q_d²] (summed over the query heads that read head h) x E[(k̂_w - k)²]

where k̂_w is k on the zero-point grid of w bits over the layer's key groups (the cache's
own quantizer; w = 0 keeps only the group's mid-range). It then chooses widths w in MENU per
channel minimizing Σ_d cost(w_d) under Σ_d w_d <= bits * D whose fields also fit the row of a
uniform `bits`-bit layer (bytes, first-fit decreasing: `layout.byte_fit`), so the cache's
memory is unchanged where a uniform row has no padding (head dim a multiple of 32: 4.258 bits
per element at 4 bits on the default model, as without a plan). At head dim 16 a uniform row
is padded to 32 codes and a planned row is not, so the two differ (measured on a tiny Llama,
4 bits, 48 tokens: 131,584 bytes with a plan against 127,488 without).

Widths are a property of the model, not of one input: they are fixed per layer, head and
channel, and pages never change after sealing. The plan round-trips through JSON (`save`,
`load`; atomic writes) and is checked against the model's shape when a cache uses it.
"""
from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._files import atomic_write
from .config import KVConfig
from ..codec.packing import packed_words
from .codec import dequantize_keys_mixed, quantize_keys_mixed
from .layout import bytes_needed
from .rope import model_ropes

KEY_PLAN_VERSION = 1
MENU = (0, 2, 3, 4, 5, 6, 8)
_SAMPLED_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # model -> {config JSON: KeyPlan}
SAMPLES, SAMPLE_TOKENS = 8, 512    # calibration text a "sampled" plan has the model write (8 x 512: screened, see model_samples)


@dataclass(frozen=True)
class KeyPlan:
    """Key channel widths per full-attention layer.

    layers   {layer_idx: (k_bits, group, widths)}, widths an (H, D) tuple of tuples of ints
             in 0..8 whose mean is at most k_bits; k_bits and group are the layer's KVConfig
             values the plan was calibrated for (a cache with other values refuses the plan)
    source   how it was calibrated (text, windows, tokens), for reports
    prerope  calibrated on pre-RoPE keys (KVConfig.k_prerope, kv/rope.py); a cache that keeps its
             keys the other way refuses the plan (plans saved before this field: False)
    """

    layers: dict
    source: str = ""
    version: int = field(default=KEY_PLAN_VERSION)
    prerope: bool = False

    def widths_for(self, layer_idx: int, k_bits: int, group: int, prerope: bool | None = None) -> torch.Tensor | None:
        """(H, D) int64 widths of a layer (None: the layer has no plan and stays uniform).
        prerope: whether the cache keeps this layer's keys pre-RoPE (checked against the plan)."""
        entry = self.layers.get(layer_idx)
        if entry is None:
            return None
        if prerope is not None and prerope != self.prerope:
            how = {True: "pre-RoPE", False: "post-RoPE"}
            raise ValueError(f"the key plan was calibrated on {how[self.prerope]} keys; this cache keeps layer "
                             f"{layer_idx}'s keys {how[prerope]} (KVConfig.k_prerope): calibrate a plan for it")
        b, g, w = entry
        if (b, g) != (k_bits, group):
            raise ValueError(f"the key plan for layer {layer_idx} was calibrated for {b}-bit keys in groups of {g}; "
                             f"this cache uses {k_bits} bits in groups of {group}")
        return torch.tensor(w, dtype=torch.int64)

    def mean_bits(self) -> float:
        ws = [torch.tensor(w, dtype=torch.float64) for _, _, w in self.layers.values()]
        return float(torch.cat([w.flatten() for w in ws]).mean()) if ws else float("nan")

    def histogram(self) -> dict[int, int]:
        """{width: channels} over every layer and head."""
        h: dict[int, int] = {}
        for _, _, w in self.layers.values():
            for row in w:
                for x in row:
                    h[x] = h.get(x, 0) + 1
        return dict(sorted(h.items()))

    # -- serialization -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"version": self.version, "source": self.source, "prerope": self.prerope,
                "layers": {str(i): {"k_bits": b, "group": g, "widths": [list(r) for r in w]}
                           for i, (b, g, w) in sorted(self.layers.items())}}

    @classmethod
    def from_dict(cls, d: dict) -> "KeyPlan":
        if not isinstance(d, dict) or "layers" not in d:
            raise ValueError("not a qins key plan (no 'layers')")
        v = int(d.get("version", 0))
        if v > KEY_PLAN_VERSION or v < 1:
            raise ValueError(f"key plan version {v} is not one this qins reads ({KEY_PLAN_VERSION}); upgrade qins")
        layers = {}
        for k, e in d["layers"].items():
            w = tuple(tuple(int(x) for x in row) for row in e["widths"])
            if not w or len({len(r) for r in w}) != 1 or any(not 0 <= x <= 8 for r in w for x in r):
                raise ValueError(f"key plan layer {k}: widths must be an (H, D) table of ints in 0..8")
            layers[int(k)] = (int(e["k_bits"]), int(e["group"]), w)
        return cls(layers, str(d.get("source", "")), v, bool(d.get("prerope", False)))

    def save(self, path) -> Path:
        """Write the plan as JSON atomically (an interrupted save keeps the previous file)."""
        path = atomic_write(path, json.dumps(self.to_dict()))
        return path

    @classmethod
    def load(cls, path) -> "KeyPlan":
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a readable key plan ({e})") from None
        return cls.from_dict(d)


# -- allocation ----------------------------------------------------------------------------------
def allocate_widths(cost: torch.Tensor, bits: int, menu=MENU) -> list[int]:
    """Widths (one per channel) minimizing Σ_d cost[d, j(d)] with Σ widths <= bits * D and the
    fields fitting the bytes of a `bits`-bit row. cost (D, len(menu)) float64, menu ascending.

    A Lagrange multiplier picks each channel's width (argmin cost + lam * width, bisection on
    lam for the largest total within the budget); when the widths do not fit the row's bytes
    the bit budget shrinks by one bit and the search reruns; a last greedy pass adds the
    widenings with the best cost drop per bit that still fit."""
    D, M = cost.shape
    widths = torch.tensor(menu, dtype=torch.float64)
    room = packed_words(D, bits) * 4
    scale = float(cost.abs().max()) or 1.0
    c = cost / scale

    def pick(lam: float) -> torch.Tensor:
        return (c + lam * widths.view(1, M)).argmin(1)

    def within(budget: float) -> torch.Tensor:
        lo, hi = 0.0, 1.0
        while float(widths[pick(hi)].sum()) > budget:              # hi: few enough bits
            hi *= 2.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if float(widths[pick(mid)].sum()) > budget:
                lo = mid
            else:
                hi = mid
        return pick(hi)

    budget = float(bits * D)
    while True:
        j = within(budget)
        if bytes_needed([int(menu[x]) for x in j]) <= room:
            break
        budget -= 1
    # widen what still fits the row (the byte fit may leave spare bits)
    spare_budget = float(bits * D)
    j2 = j.clone()
    used = float(widths[j2].sum())
    while True:
        dw = widths.view(1, M) - widths[j2].view(D, 1)
        ok = (dw > 0) & (dw <= spare_budget - used)
        gain = torch.where(ok, (cost.gather(1, j2.view(-1, 1)) - cost) / dw.clamp(min=1), torch.full_like(cost, -1.0))
        moved = False
        for best in gain.flatten().argsort(descending=True).tolist():
            d, m = divmod(best, M)
            if gain[d, m] <= 0:
                break
            trial = j2.clone()
            trial[d] = m
            if bytes_needed([int(menu[x]) for x in trial]) <= room:
                used += float(dw[d, m])
                j2, moved = trial, True
                break
        if not moved:
            break
    return [int(menu[x]) for x in j2]


def _grid_error(k: torch.Tensor, w: int, group: int) -> torch.Tensor:
    """(B, H, T, D) keys (T a multiple of group) -> (H, D) sum over B, T of (k̂_w - k)², k̂_w the
    cache's own quantizer at w bits per channel (codec.quantize_keys_mixed)."""
    B, H, T, D = k.shape
    widths = torch.full((H, D), w, dtype=torch.int64, device=k.device)
    x = dequantize_keys_mixed(*quantize_keys_mixed(k, widths, group), widths, group, torch.float32)
    return (x - k.float()).pow(2).sum((0, 2)).double()


def calibrate_keys(model, windows: torch.Tensor, config: KVConfig | None = None, *, menu=MENU,
                   batch_size: int = 4, source: str = "", progress: bool = True) -> KeyPlan:
    """A KeyPlan for `model` from calibration token windows (N, T) (see the module docstring).

    Layers calibrated: full-attention layers whose keys have zero points under `config`
    (default KVConfig(); below 8 bits); the others get no entry and stay uniform, as does a
    layer whose planned widths would not lower the calibration cost (at 3, 5 and 6 bits the
    byte fit leaves odd widths little room, and the uniform layout usually wins there). The first
    `config.sink` tokens of each window are left out, as the cache keeps them in full precision.
    """
    from tqdm.auto import tqdm

    from . import _compat
    cfg = config or KVConfig()
    if windows.dim() != 2:
        raise ValueError(f"windows must be (N, T) token ids, got shape {tuple(windows.shape)}")
    n_layers, heads, head_dim = _compat.kv_shape(model.config)
    types, _ = _compat.layer_types(model.config)
    want = {}
    for i, t in enumerate(types):
        kb, _ = cfg.bits_for(i)
        if t == "full_attention" and cfg.zero_for(kb, "k") and cfg.curvature_for(kb, "k") == 0.0:
            want[i] = (kb, cfg.group_for(kb))
    if not want:
        raise ValueError("no layer to calibrate: key plans need full-attention layers with key zero points "
                         "(k_bits below 8, k_zero not False, key curvature 0)")
    G_max = max(g for _, g in want.values())
    S = cfg.sink
    if windows.shape[1] < S + G_max:
        raise ValueError(f"calibration windows of {windows.shape[1]} tokens are shorter than one key group "
                         f"({G_max}) after the {S} sink token(s)")
    ropes = model_ropes(model, types, head_dim, cfg)          # pre-RoPE layers: keys turned back
    seen: set[int] = set()
    q2 = {i: torch.zeros(heads, head_dim, dtype=torch.float64) for i in want}
    err = {i: torch.zeros(heads, head_dim, len(menu), dtype=torch.float64) for i in want}

    def hook(module, q, k, v, mask, **kw):
        i = getattr(module, "layer_idx", None)
        if i in want:
            kb, G = want[i]
            seen.add(i)
            B, H, T, D = k.shape
            if (H, D) != (heads, head_dim):
                raise ValueError(f"layer {i}: keys of shape {tuple(k.shape)}, expected {heads} heads of dim {head_dim}")
            rep = q.shape[1] // H
            qq = q[:, :, S:].float()
            if i in ropes:
                # a pre-RoPE key error meets q turned back by the key's angle; weighed here by q turned
                # back by its own (query-key distances are short next to the slow pairs' periods).
                # Corpus windows 8..23, plan on 0..7: KL 0.0096, +0.73% against 0.0105, +1.17% for
                # the RoPE-pair mean of q^2 (experiments/kv_prerope)
                qq = ropes[i].rotate(qq, S, inverse=True)
            q2[i] += qq.pow(2).sum((0, 2)).double().view(H, rep, D).sum(1)
            n = (T - S) // G * G
            kk = k[:, :, S:S + n] if i not in ropes else ropes[i].rotate(k[:, :, S:S + n], S, inverse=True)
            for j, w in enumerate(menu):
                err[i][:, :, j] += _grid_error(kk, w, G)
        return attend(module, q, k, v, mask, **kw)

    attend = _compat.original_attention(model)
    device = next(model.parameters()).device
    with _compat.attention_hook(model, "qins_key_plan", hook), torch.inference_mode():
        for s in tqdm(range(0, windows.shape[0], batch_size), desc="key plan", disable=not progress):
            model(input_ids=windows[s:s + batch_size].to(device), use_cache=False)
    if seen != set(want):
        raise ValueError(f"layers {sorted(set(want) - seen)} never called transformers' attention interface, "
                         f"so their queries could not be read; key plans need a model that dispatches attention "
                         f"through it (transformers' own Llama, Mistral, Qwen2, Gemma, ... do)")
    layers = {}
    for i, (kb, G) in want.items():
        cost = q2[i].unsqueeze(2) * err[i]                       # (H, D, M)
        widths = [allocate_widths(cost[h], kb, menu) for h in range(heads)]
        planned = sum(float(cost[h, d, menu.index(w)]) for h in range(heads) for d, w in enumerate(widths[h]))
        uniform = float(cost[:, :, menu.index(kb)].sum()) if kb in menu else float("inf")
        if planned < uniform:        # else (odd widths pack bytes poorly at 3, 5, 6 bits) the layer stays uniform
            layers[i] = (kb, G, tuple(tuple(w) for w in widths))
    src = source or f"{windows.shape[0]} windows of {windows.shape[1]} tokens"
    return KeyPlan(layers, src, prerope=all(i in ropes for i in want))


def model_samples(model, n: int = SAMPLES, length: int = SAMPLE_TOKENS, *, seed: int = 0,
                  temperature: float = 1.0, batch_size: int = 8, progress: bool = True) -> torch.Tensor:
    """(n, length) token ids the model writes itself: sampled at `temperature` (no top-k, no top-p)
    from its BOS token (EOS where it has none), end-of-sequence suppressed so every row is full.

    Calibration text for a key plan without any text (`resolve_key_plan(..., "sampled")`): widths
    depend on which channels queries weigh and how far keys range, a property of the model more than
    of the text. On the default model, pre-RoPE keys, rotated values, 4 bits, residual 0, corpus windows
    8..23: plan from 8 samples KL 0.0086 against 0.0084 for 8 corpus windows and 0.0156 without a plan
    (experiments/kv_sampleplan). Deterministic for a seed on a given device; the caller's random state
    is left as it was."""
    from tqdm.auto import tqdm
    if n < 1 or length < 2:
        raise ValueError(f"model_samples needs n >= 1 and length >= 2, got n={n}, length={length}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    gc, cfg = getattr(model, "generation_config", None), model.config
    limit = _max_positions(cfg)
    if limit is not None and length > limit:
        raise ValueError(f"samples of {length} tokens are longer than the model's {limit} positions")

    def first(*vals):
        for v in vals:
            if isinstance(v, (list, tuple)):
                v = v[0] if v else None
            if v is not None:
                return int(v)
        return None
    start = first(getattr(gc, "bos_token_id", None), getattr(cfg, "bos_token_id", None),
                  getattr(gc, "eos_token_id", None), getattr(cfg, "eos_token_id", None))
    if start is None:
        raise ValueError("the model names no BOS or EOS token to start sampling from: calibrate the key plan "
                         "on text instead (--kv-plan auto or calibrate_keys with token windows)")
    pad = first(getattr(gc, "pad_token_id", None), getattr(cfg, "pad_token_id", None),
                getattr(gc, "eos_token_id", None), getattr(cfg, "eos_token_id", None), start)
    device = next(model.parameters()).device
    rows = []
    from transformers.generation.streamers import BaseStreamer

    class _Ticks(BaseStreamer):                  # generate calls put() with the prompt, then once per token
        def __init__(self, bar):
            self.bar, self.first = bar, True

        def put(self, value):
            if not self.first:
                self.bar.update(1)
            self.first = False

        def end(self):
            pass

    devices = [device] if device.type == "cuda" else []
    batches = range(0, n, batch_size)
    with torch.random.fork_rng(devices=devices), torch.inference_mode(), \
            tqdm(total=len(batches) * (length - 1), desc="sampling calibration text", unit="step",
                 disable=not progress) as bar:
        torch.manual_seed(seed)
        for s in batches:
            b = min(batch_size, n - s)
            ids = torch.full((b, 1), start, dtype=torch.long, device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                                 top_k=0, top_p=1.0, max_new_tokens=length - 1, min_new_tokens=length - 1,
                                 pad_token_id=pad, streamer=_Ticks(bar) if progress else None)
            rows.append(out[:, :length].cpu())
    return torch.cat(rows)


def samples_source(w: torch.Tensor) -> str:
    """A plan's `source` for samples from model_samples (its defaults)."""
    return f"{w.shape[0]} samples of {w.shape[1]} tokens the model wrote (temperature 1, seed 0)"


def _max_positions(cfg) -> int | None:
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for name in ("max_position_embeddings", "n_positions"):
        v = getattr(text, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def resolve_key_plan(key_plan, model, config: KVConfig, windows=None, source: str = "", batch_size: int = 4,
                     progress: bool = True) -> KeyPlan | None:
    """None, a KeyPlan, a path to a saved one, "auto": calibrate `model` on `windows` (a callable
    returning (N, T) token ids, called only for "auto"), or "sampled": calibrate on text the model
    writes itself (`model_samples`; no text needed), once per model and config (memoized)."""
    if key_plan is None or isinstance(key_plan, KeyPlan):
        return key_plan
    if key_plan == "sampled":                  # once per model and config: a cache per batch does not sample again
        if getattr(model, "parameters", None) is None:
            raise ValueError("key_plan='sampled' needs the model (not its config): the model writes the text")
        memo = _SAMPLED_PLANS.setdefault(model, {})
        key = json.dumps(config.to_dict(), sort_keys=True)
        if key not in memo:
            w = model_samples(model, SAMPLES, min(SAMPLE_TOKENS, _max_positions(model.config) or SAMPLE_TOKENS),
                              progress=progress)
            memo[key] = calibrate_keys(model, w, config, batch_size=batch_size, progress=progress,
                                       source=samples_source(w))
        return memo[key]
    if key_plan == "auto":
        w = windows() if windows is not None else None
        if w is None or len(w) == 0:
            raise ValueError("--kv-plan auto needs calibration windows (there are none)")
        return calibrate_keys(model, w, config, batch_size=batch_size, source=source, progress=progress)
    if not Path(key_plan).is_file():
        raise ValueError(f"key_plan: no such file {str(key_plan)!r} (a KeyPlan, its path, 'auto' or 'sampled')")
    return KeyPlan.load(key_plan)
