"""Attention-output error of quantized keys or values, layer by layer: a fast probe for
choosing per-width defaults (config.py) before a full perplexity run.

    OMP_NUM_THREADS=1 python -m experiments.kv_probe.probe --out benchmarks/results/kv_attention_error.md

The float model runs once over the last `windows` 512-token windows of the corpus and every
layer's (q, k, v) is captured (after RoPE, as the cache sees them). A variant quantizes the
keys (or the values) of all tokens with whole groups, the other tensor stays exact, and

    error = mean over layers of ||o_q - o||^2 / ||o||^2,   o = causal SDPA(q, k, v)

It ignores what chunked prefill adds (provisional staging scales) and how errors propagate
through later layers; perplexity with the cache in the loop (report.py) is the measure.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from qins.kv.codec import Codec, dequantize_keys, dequantize_values, quantize_keys, quantize_values

# (tensor, bits, fields): fields of fake_quantize below
VARIANTS: list[tuple[str, int, dict]] = (
    [("k", 4, dict(group=64, zero=False, sink=0)), ("k", 4, dict(group=128, zero=True, sink=0)),
     ("k", 4, dict(group=128, zero=True, sink=1)), ("k", 4, dict(group=64, zero=True, sink=1)),
     ("k", 4, dict(group=32, zero=True, sink=1)), ("k", 4, dict(group=128, zero=True, sink=1, a=0.5)),
     ("k", 4, dict(group=128, zero=True, sink=1, a=1.0)), ("k", 2, dict(group=64, zero=True, sink=1)),
     ("k", 2, dict(group=64, zero=True, sink=1, a=1.0))]
    + [("v", b, dict(a=a, sink=1)) for b in (6, 4, 3, 2) for a in (0.0, 1.0, 2.0)]
    + [("v", 4, dict(a=0.0, sink=0)), ("v", 4, dict(a=1.0, zero=True, sink=1)), ("v", 4, dict(fmt="int-sym", sink=1))]
)


def capture_qkv(model, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{layer: (q (B, Hq, T, D), k (B, H, T, D), v)} of one forward pass over ids (B, T)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from qins.kv._compat import attention_hook
    rec = {}

    def hook(module, q, k, v, mask, **kw):
        rec[module.layer_idx] = (q.detach().clone(), k.detach().clone(), v.detach().clone())
        return sdpa_attention_forward(module, q, k, v, mask, **kw)

    with attention_hook(model, "qins_probe", hook), torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    return rec


ROTATION_VARIANTS: list[tuple[str, int, dict]] = [
    ("k", 4, dict(group=64, zero=True, sink=1)), ("k", 4, dict(group=64, zero=True, sink=1, rotate=True)),
    ("v", 4, dict(a=0.5, sink=1)), ("v", 4, dict(a=0.5, sink=1, rotate=True)),
    ("v", 4, dict(a=0.0, sink=1, rotate=True)), ("v", 4, dict(a=1.0, sink=1, rotate=True))]


def hadamard(d: int) -> torch.Tensor:
    """(d, d) orthonormal Sylvester-Hadamard matrix (d a power of two): symmetric, its own inverse."""
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / d ** 0.5


def fake_quantize(x: torch.Tensor, which: str, bits: int, fmt: str = "qins", a: float = 0.0, group: int = 128,
                  zero: bool | None = None, sink: int = 0, rotate: bool = False) -> torch.Tensor:
    """Keys per (group, channel) or values per token, all T tokens in whole groups; the first
    `sink` tokens exact and left out of the ranges (as QINSLayer does). rotate: quantize x H
    (a per-head Hadamard rotation of the channels) and return the result rotated back."""
    if rotate:
        h = hadamard(x.shape[-1]).to(x.dtype)
        return fake_quantize(x @ h, which, bits, fmt, a, group, zero, sink) @ h
    zero = (which == "k") if zero is None else zero
    codec = Codec.build(fmt, bits, a, zero)
    y = x.clone()
    if sink:
        y[:, :, :sink] = y[:, :, sink:sink + 1]
    if which == "k":
        m = 0 if zero else (y.amax(2, keepdim=True) + y.amin(2, keepdim=True)) / 2   # offset without zero points
        c, s, z = quantize_keys(y - m, codec, group)
        out = dequantize_keys(c, s, z, codec, group, torch.float32) + m
    else:
        c, s, z = quantize_values(y, codec)
        out = dequantize_values(c, s, z, codec, torch.float32)
    if sink:
        out[:, :, :sink] = x[:, :, :sink]
    return out


def attention_error(qkv, which: str, bits: int, **fields) -> list[float]:
    """Per-layer ||o_q - o||^2 / ||o||^2 with `which` ("k" or "v") fake-quantized."""
    errs = []
    for q, k, v in qkv.values():
        rep = q.shape[1] // k.shape[1]
        o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
        kq = fake_quantize(k, "k", bits, **fields) if which == "k" else k
        vq = fake_quantize(v, "v", bits, **fields) if which == "v" else v
        oq = F.scaled_dot_product_attention(q, kq.repeat_interleave(rep, 1), vq.repeat_interleave(rep, 1),
                                            is_causal=True)
        errs.append(float((oq - o).pow(2).sum() / o.pow(2).sum()))
    return errs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.kv_probe.probe")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/kv_attention_error.md")
    ap.add_argument("--rotation", action="store_true",
                    help="the Hadamard-rotation variants, on the corpus's first (calibration) windows")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    import qins
    from qins.metrics.quality import token_windows
    from qins.metrics.models import default_corpus
    tok, model = qins.load_default_model()
    windows = token_windows(tok, default_corpus(), 512)
    ids = windows[:a.windows] if a.rotation else windows[-a.windows:]
    qkv = capture_qkv(model, ids)
    command = "OMP_NUM_THREADS=1 python -m experiments.kv_probe.probe " + " ".join(argv if argv is not None else sys.argv[1:])
    md = [f"# Attention-output error of quantized K or V ({datetime.date.today().isoformat()})", "",
          f"Command: `{command}`", "",
          f"Default model, {'first' if a.rotation else 'last'} {a.windows} windows of 512 tokens of the default "
          "corpus, float32; see "
          "src/qins/kv/probe.py for the definition (mean over the 30 layers of ||o_q - o||^2 / ||o||^2, the "
          "other tensor exact). A screening signal, not a quality result.", "",
          "| tensor | bits | format | curvature a | key group | zero point | sink | Hadamard | error |",
          "|---|---|---|---|---|---|---|---|---|"]
    for which, bits, fields in (ROTATION_VARIANTS if a.rotation else VARIANTS):
        e = attention_error(qkv, which, bits, **fields)
        f = dict(fmt="qins", a=0.0, group=128, zero=which == "k", sink=0, rotate=False) | fields
        row = (f"| {which.upper()} | {bits} | {f['fmt']} | {f['a']} | {f['group'] if which == 'k' else '-'} | "
               f"{f['zero']} | {f['sink']} | {f['rotate']} | {sum(e) / len(e):.3e} |")
        md.append(row)
        print(row, flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(md) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
