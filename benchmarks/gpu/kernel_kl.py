"""Does running a QINS model through the Triton kernels change its output? KL between the
reference path (QINS_KERNELS=reference: weights decoded, then F.linear) and the kernel path
(QINS_KERNELS=triton) on the same model and tokens (issue 11: the default model's KL through the
kernels equals the reference path's within 1e-4).

    python benchmarks/gpu/kernel_kl.py --make-ids out/kl_ids.pt            # here: tokenize the texts
    PYTHONPATH=$PWD/src python3 benchmarks/gpu/kernel_kl.py MODEL_DIR --ids out/kl_ids.pt

MODEL_DIR: a saved QINS model (e.g. `qins compress -o out/kl_model --bits 4 --group-size 64
--rounding nearest --embeddings 2:64`, 61 MiB, small enough to carry to a GPU machine that lacks the
default model's package). The ids: the last window of the default corpus (held out from every
calibration) and the last window of Python's argparse.py (another kind of text), 256 tokens each.
Three ways through the model, each on both paths: the whole window at once (prefill: the
decode-then-GEMM route), and through a DynamicCache in steps of 8 tokens (skinny kernels) and of
1 token (GEMV kernels, the first 64 tokens). For each: KL(reference || kernels) per token (mean
and max), the largest |log p| difference and top-1 agreement. Writes $OUT/kernel_kl.json and
prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

TOKENS = 256


def make_ids(path: str) -> None:
    import sysconfig
    from pathlib import Path

    import qins
    from qins.metrics.models import default_corpus
    tok, _ = qins.load_default_model()
    texts = {"corpus": default_corpus(), "code": (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()}
    ids = {k: tok(v, return_tensors="pt").input_ids[0, -TOKENS:].clone() for k, v in texts.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(ids, path)
    print({k: tuple(v.shape) for k, v in ids.items()}, "->", path)


def logprobs(model, ids: torch.Tensor, step: int | None) -> torch.Tensor:
    from transformers import DynamicCache
    with torch.inference_mode():
        if step is None:
            return model(ids[None]).logits[0].float().log_softmax(-1)
        cache, out = DynamicCache(), []
        for i in range(0, ids.shape[0], step):
            out.append(model(ids[None, i:i + step], past_key_values=cache, use_cache=True).logits[0].float())
        return torch.cat(out).log_softmax(-1)


def compare(ref: torch.Tensor, ker: torch.Tensor) -> dict:
    kl = (ref.exp() * (ref - ker)).sum(-1)
    return dict(kl_mean=float(kl.mean()), kl_max=float(kl.max()), max_abs_logp=float((ref - ker).abs().max()),
                top1=float((ref.argmax(-1) == ker.argmax(-1)).float().mean()), tokens=int(ref.shape[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--ids", default="out/kl_ids.pt")
    ap.add_argument("--make-ids", metavar="PATH", help="tokenize the texts into PATH and stop")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                    help="activations and float tensors (qins.load's dtype)")
    ap.add_argument("--fp32-baseline", action="store_true",
                    help="also the same QINS model in float32 on the reference path: KL of both paths to it "
                         "(which path rounds less)")
    ap.add_argument("--float-default", action="store_true",
                    help="MODEL_DIR is the default model compressed: also KL of both paths to the float default "
                         "model (the issue's measure; needs its package, so not on a GPU machine without it)")
    ap.add_argument("--texts", nargs="*", default=None, help="which texts of the ids file (default: all)")
    ap.add_argument("--routes", nargs="*", default=["whole", "8", "1"], help="whole, 8 (steps of 8), 1 (steps of 1)")
    ap.add_argument("--tokens", type=int, default=TOKENS)
    ap.add_argument("--step1-tokens", type=int, default=64)
    args = ap.parse_args()
    if args.make_ids:
        return make_ids(args.make_ids)
    import qins
    from qins.weights.linear import QINSLinear
    model = qins.load(args.model, device=args.device, dtype=getattr(torch, args.dtype)).eval()
    base = qins.load(args.model, device=args.device, dtype=torch.float32).eval() if args.fp32_baseline else None
    fmodel = None
    if args.float_default:
        _, fmodel = qins.load_default_model()
        fmodel = fmodel.to(args.device, getattr(torch, args.dtype)).eval()
    n_linear = sum(isinstance(m, QINSLinear) for m in model.modules())
    ids = {k: v.to(args.device) for k, v in torch.load(args.ids).items()}
    rows = []
    routes = {"whole": ("whole window", None, args.tokens), "8": ("steps of 8", 8, args.tokens),
              "1": ("steps of 1", 1, args.step1_tokens)}
    path = os.path.join(os.environ.get("OUT", "out"), "kernel_kl.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for text, x in ids.items():
        if args.texts and text not in args.texts:
            continue
        for name, step, n in (routes[r] for r in args.routes):
            out = {}
            for backend in ("reference", "triton"):
                os.environ["QINS_KERNELS"] = backend
                out[backend] = logprobs(model, x[:n], step)
            row = dict(text=text, route=name, **compare(out["reference"], out["triton"]))
            if base is not None:
                os.environ["QINS_KERNELS"] = "reference"
                b = logprobs(base, x[:n], step)
                row["fp32_vs_reference"] = compare(b, out["reference"])
                row["fp32_vs_kernels"] = compare(b, out["triton"])
            if fmodel is not None:
                f = logprobs(fmodel, x[:n], step)
                row["float_vs_reference"] = compare(f, out["reference"])
                row["float_vs_kernels"] = compare(f, out["triton"])
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
            with open(path, "w") as f:                               # after every row: a timeout keeps them
                json.dump(dict(rows=rows), f, indent=1)
    os.environ["QINS_KERNELS"] = "auto"
    meta = dict(device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(), model=args.model,
                quantized_linears=n_linear, dtype=args.dtype,
                command=" ".join([sys.executable] + sys.argv), torch=torch.__version__)
    with open(path, "w") as f:
        json.dump(dict(meta, rows=rows), f, indent=1)
    print(f"# {meta['device']} {meta['date'][:16]}: {args.model}, {n_linear} QINS linears; reference path vs Triton kernels")
    print(f"{'text':<7} {'route':<13} {'tokens':>6} {'KL mean':>9} {'KL max':>9} {'max|dlogp|':>10} {'top-1':>6}")
    for r in rows:
        extra = ""
        if "fp32_vs_reference" in r:
            extra = (f"  KL to fp32: reference {r['fp32_vs_reference']['kl_mean']:.2e}, "
                     f"kernels {r['fp32_vs_kernels']['kl_mean']:.2e}")
        if "float_vs_reference" in r:
            extra += (f"  KL to the float model: reference {r['float_vs_reference']['kl_mean']:.4e}, "
                      f"kernels {r['float_vs_kernels']['kl_mean']:.4e}")
        print(f"{r['text']:<7} {r['route']:<13} {r['tokens']:>6} {r['kl_mean']:>9.2e} {r['kl_max']:>9.2e} "
              f"{r['max_abs_logp']:>10.3g} {r['top1']:>6.3f}{extra}")


if __name__ == "__main__":
    main()
