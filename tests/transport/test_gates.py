"""The seed's thresholds and verdicts."""
from __future__ import annotations

from qins.transport.gates import GATES, verdict


def test_thresholds_are_the_seeds():
    assert GATES["v-one"] == {"match": 0.95, "rel_err": 0.01}
    assert GATES["v-all"]["match"] == 0.90 and GATES["mlp"]["match"] == 0.85 and GATES["all"]["match"] == 0.85
    assert GATES["v-all"]["decode_ratio"] == 0.5 and GATES["all"]["decode_ratio"] == 20 / 128


def test_verdicts():
    assert verdict("v-one", {"match": 0.96, "rel_err_max": 0.005}, 210)["verdict"] == "pass"
    assert verdict("v-one", {"match": 0.96, "rel_err_max": 0.02}, 210)["verdict"] == "fail"
    assert verdict("mlp", {"match": None}, 210)["verdict"] == "incomplete"
    assert verdict("v-one", {"match": None, "rel_err_max": 0.5}, 210)["verdict"] == "fail"
    v = verdict("all", {"match": 0.9, "decode_ops": 33}, 210)      # limit 210 * 20/128 = 32.8
    assert v["verdict"] == "fail" and v["checks"]["decode ops <="]["threshold"] == 210 * 20 / 128
    assert verdict("v-all", {"match": 0.95, "decode_ops": 105}, 210)["verdict"] == "pass"
