"""Pattern B (the seed's Jacobian weight transport): EXPERIMENTAL, off by default.

Nothing in qins' compression path imports this package; see README.md here for the math,
the measured gates and the decision.

    jacobian     E, D, their derivatives, operating points, transport(W, op, variant)
    native       QINSNativeLinear, QINSNativeMLP: E -> matmul on codes -> D
    stages       the stages (v-one .. all), calibration, swapping modules in, layer errors
    counter      decode operations per forward pass (Pattern A vs B)
    gates        the seed's thresholds and verdicts
    experiment   run_gates: every stage x variant against the float model
"""
from .counter import count_decodes, decode_ops, pattern_a_sites
from .experiment import markdown_gate_table, print_gate_table, run_gates
from .gates import GATES, verdict
from .jacobian import VARIANTS, OperatingPoint, Transport, decode, encode, transport
from .native import QINSNativeLinear, QINSNativeMLP
from .stages import STAGES, applied, build_stage, find_sites, operating_points, unit_errors

__all__ = [
    "encode", "decode", "OperatingPoint", "Transport", "transport", "VARIANTS",
    "QINSNativeLinear", "QINSNativeMLP",
    "STAGES", "find_sites", "operating_points", "build_stage", "applied", "unit_errors",
    "count_decodes", "decode_ops", "pattern_a_sites",
    "GATES", "verdict",
    "run_gates", "markdown_gate_table", "print_gate_table",
]
