"""Gate verdicts against the seed's text, on measured rows and at the thresholds' edges.

The seed's gates (Phase 2, Phase 5, "Success Metrics"), written out here independently of
experiments.transport.gates.GATES:

    v-one    greedy token match > 95% and relative output error < 1%
    v-all    token match > 90%; decode ops 128 -> 64 (at most half of Pattern A's count)
    mlp      token match > 85% (down and gate-up, the partial MLP stages, are held to it too)
    all      token match > 85%; decode ops 128 -> 20 (at most 20/128 of Pattern A's count)

A check whose number is missing (an --error-only row has no token match) is unknown: the
verdict is "incomplete" unless another check already failed.
"""
from __future__ import annotations

import pytest

from experiments.transport.gates import verdict

MATCH, ERR, OPS = "token match >", "rel. error <", "decode ops <="

# Rows measured on the default model (src/qins/transport/results/gates.json and
# small_alpha.json; its Pattern A count is 210 decodes per forward, and every stage measured
# 210: each transported matmul swaps a weight decode for an activation decode). The expected
# verdicts and failed checks are read off the seed's text above, not off GATES.
PA = 210
MEASURED = [  # (what, stage, match, rel_err_max, decode_ops, verdict, failed checks)
    ("first-order alpha 0.001", "v-one", 0.99144, 0.00065, 210, "pass", set()),
    ("first-order alpha 0.01: error < 1% but match < 95%", "v-one", 0.94010, 0.00566, 210, "fail", {MATCH}),
    ("first-order alpha 1", "v-one", 0.08435, 0.59023, 210, "fail", {MATCH, ERR}),
    ("seed alpha 1", "v-one", 0.08924, 1.33171, 210, "fail", {MATCH, ERR}),
    ("first-order alpha 0.001: match passes, 210 decodes > 105", "v-all", 0.99144, 0.00176, 210, "fail", {OPS}),
    ("first-order alpha 0.01", "v-all", 0.76345, 0.01785, 210, "fail", {MATCH, OPS}),
    ("first-order alpha 0.001", "mlp", 0.10269, 0.97537, 210, "fail", {MATCH}),
    ("first-order alpha 1", "down", 0.01528, 44.5336, 210, "fail", {MATCH}),
    ("first-order alpha 0.001", "all", 0.10147, 0.97537, 210, "fail", {MATCH, OPS}),
]


def failed(v: dict) -> set[str]:
    return {name for name, c in v["checks"].items() if c["pass"] is False}


@pytest.mark.parametrize("what,stage,match,err,ops,want,fails", MEASURED, ids=[f"{m[1]}:{m[0]}" for m in MEASURED])
def test_measured_rows_get_the_seeds_verdict(what, stage, match, err, ops, want, fails):
    v = verdict(stage, {"match": match, "rel_err_max": err, "decode_ops": ops}, PA)
    assert v["verdict"] == want and failed(v) == fails, v


# (stage, row, Pattern A count, verdict): each threshold exactly at, and one step past, its edge
EDGES = [
    ("v-one", {"match": 0.95, "rel_err_max": 0.001}, PA, "fail"),      # "> 95%": 95% itself fails
    ("v-one", {"match": 0.951, "rel_err_max": 0.001}, PA, "pass"),
    ("v-one", {"match": 0.99, "rel_err_max": 0.01}, PA, "fail"),       # "< 1%": 1% itself fails
    ("v-one", {"match": 0.99, "rel_err_max": 0.0099}, PA, "pass"),
    ("v-all", {"match": 0.901, "decode_ops": 105}, PA, "pass"),       # 210 * 64/128 = 105: at most
    ("v-all", {"match": 0.901, "decode_ops": 106}, PA, "fail"),
    ("v-all", {"match": 0.90, "decode_ops": 100}, PA, "fail"),
    ("v-all", {"match": 0.95, "decode_ops": 64}, 128, "pass"),        # the seed's own count: 128 -> 64
    ("v-all", {"match": 0.95, "decode_ops": 65}, 128, "fail"),
    ("all", {"match": 0.86, "decode_ops": 32}, PA, "pass"),           # 210 * 20/128 = 32.8
    ("all", {"match": 0.86, "decode_ops": 33}, PA, "fail"),
    ("all", {"match": 0.86, "decode_ops": 20}, 128, "pass"),          # 128 -> 20
    ("all", {"match": 0.86, "decode_ops": 21}, 128, "fail"),
    ("all", {"match": 0.85, "decode_ops": 10}, PA, "fail"),
    ("mlp", {"match": 0.851}, PA, "pass"),                            # no decode-op gate on the MLP
    ("down", {"match": 0.851, "decode_ops": 210}, PA, "pass"),
    ("down", {"match": 0.85, "decode_ops": 210}, PA, "fail"),
    ("gate-up", {"match": 0.851, "decode_ops": 0}, PA, "pass"),
    ("gate-up", {"match": 0.85, "decode_ops": 0}, PA, "fail"),
]


@pytest.mark.parametrize("stage,row,pa,want", EDGES)
def test_thresholds_at_their_edges(stage, row, pa, want):
    assert verdict(stage, row, pa)["verdict"] == want


def test_a_missing_number_is_incomplete_unless_something_failed():
    # an --error-only row: no token match
    assert verdict("mlp", {"match": None, "rel_err_max": 0.97, "decode_ops": 210}, PA)["verdict"] == "incomplete"
    assert verdict("v-one", {"match": None, "rel_err_max": 0.001}, PA)["verdict"] == "incomplete"
    v = verdict("v-one", {"match": None, "rel_err_max": 0.5}, PA)
    assert v["verdict"] == "fail" and failed(v) == {ERR} and v["checks"][MATCH]["pass"] is None
    assert verdict("v-all", {"match": None, "decode_ops": 210}, PA)["verdict"] == "fail"
    assert verdict("all", {"match": 0.99}, PA)["verdict"] == "incomplete"   # decode ops not counted
