"""The seed's gates for Pattern B, as thresholds on measured numbers, and their verdicts.

From the seed (Phase 2, Phase 5, "Success Metrics"):

    v-one    greedy token match > 95% and relative output error < 1%   (single layer)
    v-all    token match > 90%; decode ops 128 -> 64                   (all V paths)
    mlp      token match > 85%                                          (all MLPs)
    all      token match > 85%; decode ops 128 -> 20                    (V paths + MLPs)

The partial MLP stages (down, gate-up) are held to the MLP's 85% (our choice: the seed
gates only whole MLPs). The seed's decode targets are ratios of its own Pattern A count
(128), so they are scaled to the model's measured Pattern A count: at most 64/128 and
20/128 of it. On failure the seed's decision is "ship Phase 1 only" (Phase 2) and "ship
attention-only QINS" (Phase 5).
"""
from __future__ import annotations

SEED_PATTERN_A_DECODES = 128

GATES: dict[str, dict[str, float]] = {
    "v-one": {"match": 0.95, "rel_err": 0.01},
    "v-all": {"match": 0.90, "decode_ratio": 64 / SEED_PATTERN_A_DECODES},
    "down": {"match": 0.85},
    "gate-up": {"match": 0.85},
    "mlp": {"match": 0.85},
    "all": {"match": 0.85, "decode_ratio": 20 / SEED_PATTERN_A_DECODES},
}


def verdict(stage: str, row: dict, pattern_a_decodes: int) -> dict:
    """{"checks": {name: {threshold, value, pass}}, "verdict": "pass" | "fail" | "incomplete"}.

    row needs "match" (share of greedy tokens), "rel_err" (worst transported unit) and
    "decode_ops"; a missing number makes its check None, and the verdict "incomplete"
    unless another check already failed.
    """
    checks = {}
    for name, thr in GATES[stage].items():
        if name == "match":
            v = row.get("match")
            ok = None if v is None else v > thr
            checks["token match >"] = {"threshold": thr, "value": v, "pass": ok}
        elif name == "rel_err":
            v = row.get("rel_err_max")
            ok = None if v is None else v < thr
            checks["rel. error <"] = {"threshold": thr, "value": v, "pass": ok}
        elif name == "decode_ratio":
            limit = thr * pattern_a_decodes
            v = row.get("decode_ops")
            ok = None if v is None else v <= limit
            checks["decode ops <="] = {"threshold": limit, "value": v, "pass": ok}
    results = [c["pass"] for c in checks.values()]
    if any(r is False for r in results):
        v = "fail"
    elif any(r is None for r in results):
        v = "incomplete"
    else:
        v = "pass"
    return {"checks": checks, "verdict": v}
