"""Logits of the default model with a QINSCache in the loop (residual 0, 32-token chunked
prefill over the first 512 tokens of the default corpus), saved so that two checkouts can be
compared bit for bit (a storage change must not change what the cache decodes).

    PYTHONPATH=$PWD/src python benchmarks/kv_chunked_logits.py --out /tmp/a.pt      # checkout A
    PYTHONPATH=$PWD/src python benchmarks/kv_chunked_logits.py --out /tmp/b.pt --compare /tmp/a.pt

Prints the perplexity of each width beside the uncompressed model's over the same tokens.
"""
from __future__ import annotations

import argparse

import torch

import qins
from qins._compat import cache_kwarg
from qins.kv.cache import QINSCache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", default=None)
    ap.add_argument("--bits", type=int, nargs="*", default=[4, 8])
    args = ap.parse_args()
    import pydoc_data.topics as t
    tok, model = qins.load_default_model()
    text = "\n".join(t.topics[k] for k in sorted(t.topics))
    ids = tok(text[:20000], return_tensors="pt").input_ids[:, :512]
    with torch.inference_mode():
        ref = model(ids).logits
    ppl = lambda lg: float((-torch.log_softmax(lg.float(), -1)[0, :-1].gather(1, ids[0, 1:, None]).mean()).exp())
    out = {}
    for bits in args.bits:
        cache = QINSCache(model, bits=bits, residual=0)
        with torch.inference_mode():
            out[bits] = torch.cat([model(ids[:, i:i + 32], **{cache_kwarg(model): cache}).logits
                                   for i in range(0, ids.shape[1], 32)], 1)
        print(f"{bits} bits: ppl {ppl(out[bits]):.4f} (uncompressed {ppl(ref):.4f})")
    torch.save(out, args.out)
    if args.compare:
        other = torch.load(args.compare)
        for bits, lg in out.items():
            print(f"{bits} bits: identical to {args.compare}: {torch.equal(lg, other[bits])}, "
                  f"max |diff| {float((lg - other[bits]).abs().max()):.3g}")


if __name__ == "__main__":
    main()
