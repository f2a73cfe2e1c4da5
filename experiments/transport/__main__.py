"""`python -m experiments.transport`: the seed's Pattern B (Jacobian transport) stages and their
gate verdicts, on the embedded model or any local causal LM. See README.md for what was measured.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from qins.eval.harness import Protocol
from qins.metrics.models import load_model, read_corpus
from qins.metrics.render import write_json

from . import print_gate_table, run_gates


def cmd_transport(a):
    text = read_corpus(a.text) if a.text else None
    tok, model = load_model(a.model)
    protocol = Protocol(windows=a.windows, prompts=a.prompts, new_tokens=a.new_tokens,
                        calibration_windows=a.calibration_windows)
    flush = (lambda rows: write_json(a.json, {"meta": {"command": a.command}, "rows": rows})) if a.json else None
    doc = run_gates(tok, model, protocol, stages=a.stage, variants=a.variant, alphas=a.alpha, signs=a.signs,
                    layer=a.layer, text=text, error_only=a.error_only, on_row=flush)
    doc["meta"].update(command=a.command, model=a.model or "SmolLM2-135M-Instruct (embedded)")
    print_gate_table(doc["rows"], title=f"qins transport (Pattern B, experimental) — alpha {a.alpha}, "
                                        f"Pattern A decode ops {doc['meta']['pattern_a']['decode_ops']}")
    if a.json:
        write_json(a.json, doc)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.transport",
                                description="Pattern B (Jacobian transport) experiments and their gate verdicts")
    p.add_argument("model", nargs="?", default=None, help="local HF dir or .gguf (default: embedded model)")
    p.add_argument("--stage", nargs="+", default=["v-one", "v-all", "down", "gate-up", "mlp", "all"],
                   choices=["v-one", "v-all", "down", "gate-up", "mlp", "all"])
    p.add_argument("--variant", nargs="+", default=["seed", "first-order"], choices=["seed", "first-order"])
    p.add_argument("--signs", default="carry", choices=["carry", "ignore"], help="first-order: sign handling")
    p.add_argument("--alpha", nargs="+", type=float, default=[1.0], help="QINS alpha (the seed's: 1)")
    p.add_argument("--layer", type=int, default=None, help="v-one's layer (default: the middle one)")
    p.add_argument("--calibration-windows", type=int, default=3,
                   help="first windows: all but the last set operating points, the last is held out")
    p.add_argument("--error-only", action="store_true", help="layer errors and decode ops only (fast)")
    p.add_argument("--windows", type=int, default=4, help="evaluation windows of 512 tokens")
    p.add_argument("--prompts", type=int, default=32, help="prompts for greedy token match")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--text", nargs="*", help="text file(s) to evaluate on instead of the default corpus")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = build_parser().parse_args(argv)
    a.command = "python -m experiments.transport " + " ".join(shlex.quote(x) for x in argv)
    try:
        cmd_transport(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"experiments.transport: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
