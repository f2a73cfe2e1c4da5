"""Does the CPU fast path's approximate gemv cost quality? KL to the float model on
generation's path (issue 16: equal to the reference path's within 1e-4).

    python benchmarks/cpu_kl_vs_float.py DIR [--tokens 512] [--chunk 8]

DIR: a saved QINS model of the default model (e.g. /tmp/qins_cpu_speed_qins4-g64, prepared by
benchmarks/cpu_speed.py). One window of the default corpus is fed through the cache CHUNK
tokens at a time (so every linear takes the gemv, as in generation) by the float model, the
QINS model on the reference path (QINS_KERNELS=reference), on the fast path (the approximate
gemv: int16 activations and levels) and on the exact fp32 gemv (cpu.APPROX_GEMV = False).
Prints KL(float || each), KL(reference || each), top-1 agreement and max |log p| difference.
"""
from __future__ import annotations

import argparse
import os

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=8)
    args = ap.parse_args()
    import qins
    from transformers import DynamicCache
    from qins.kernels import cpu
    from qins.metrics.models import default_corpus
    from qins.weights.linear import QINSLinear
    tok, fmodel = qins.load_default_model()
    ids = tok(default_corpus()[:20000], return_tensors="pt").input_ids[:, :args.tokens]
    qmodel = qins.load(args.model)

    def stepped(model):
        cache, out = DynamicCache(), []
        for i in range(0, ids.shape[1], args.chunk):
            out.append(model(ids[:, i:i + args.chunk], past_key_values=cache, use_cache=True).logits.float())
        return torch.cat(out, 1).log_softmax(-1)

    def kl(p, q):
        return (p.exp() * (p - q)).sum(-1).mean().item()

    runs = {}
    with torch.inference_mode():
        runs["float"] = stepped(fmodel)
        for name, backend, approx in (("reference path", "reference", True),
                                      ("fast path (approximate gemv)", "cpu", True),
                                      ("fast path, exact fp32 gemv", "cpu", False)):
            os.environ["QINS_KERNELS"] = backend
            cpu.APPROX_GEMV = approx
            for m in qmodel.modules():
                if isinstance(m, QINSLinear):
                    m.__dict__.pop("_plan", None)               # plans carry the gemv mode
            runs[name] = stepped(qmodel)
    os.environ["QINS_KERNELS"] = "auto"
    cpu.APPROX_GEMV = True
    lf, lr = runs.pop("float"), runs["reference path"]
    print(f"{args.model}: {ids.shape[1]} tokens in chunks of {args.chunk} through the cache")
    print("| path | KL(float || path) | KL(reference || path) | top-1 vs reference | max |d log p| vs reference |")
    print("|---|---|---|---|---|")
    for name, lp in runs.items():
        print(f"| {name} | {kl(lf, lp):.6f} | {kl(lr, lp):.2e} | {(lr.argmax(-1) == lp.argmax(-1)).float().mean():.4f} "
              f"| {(lr - lp).abs().max():.3e} |")


if __name__ == "__main__":
    main()
