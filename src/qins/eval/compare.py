"""`qins compare`: QINS against INT/NF4/FP8 (and HQQ, bitsandbytes NF4) at several widths."""
from __future__ import annotations

import copy
import itertools

from tqdm.auto import tqdm

from ..codec.config import WeightConfig
from . import peers
from .harness import Harness

DEFAULT_FORMATS = ("qins", "int-sym", "int-asym", "nf4", "fp8", "qins-seed")
DEFAULT_BITS = (8, 6, 5, 4, 3)
DEFAULT_GROUPS = (64, 128, None)


def grid(formats=DEFAULT_FORMATS, bits=DEFAULT_BITS, groups=DEFAULT_GROUPS) -> list[WeightConfig]:
    """Every valid (format, bits, group) combination; qins-seed once (it has no groups)."""
    from ..codec.formats import get_format

    out, seen = [], set()
    for f, b, g in itertools.product(formats, bits, groups):
        fmt = get_format(f)
        if b not in fmt.bits:
            continue
        if not fmt.scaled:
            g = None
        cfg = WeightConfig(format=f, bits=b, group_size=g)
        if cfg.label not in seen:
            seen.add(cfg.label)
            out.append(cfg)
    return out


def run_compare(h: Harness, configs: list[WeightConfig], match_bits=(8,), with_peers: bool = True,
                peer_settings=((4, 64), (8, 128), (3, 64)), progress: bool = True, on_row=None,
                calibrated: list[WeightConfig] = (), methods=("act",), budgets=()) -> list[dict]:
    """Measure every config (and the installed peers) against the same reference.

    `calibrated` configs are measured again with calibration on the harness's calibration
    windows (disjoint from the evaluation windows), by each of `methods`: "act"
    (activation-weighted error) and "gptq" (GPTQ rounding). `budgets`: whole-model bpw targets
    for the mixed-precision allocator (every tensor, embeddings included).
    """
    rows = []
    jobs: list = [("qins", c) for c in configs]
    if "act" in methods:
        jobs += [("qins+act", c) for c in calibrated]
    if "gptq" in methods:
        jobs += [("qins", c.replace(rounding="gptq")) for c in calibrated]
    if with_peers:
        wanted = {c.bits for c in configs}
        peer_settings = [s for s in peer_settings if s[0] in wanted]
        avail = peers.available()
        if avail.get("hqq"):
            jobs += [("hqq", s) for s in peer_settings]
        if avail.get("bnb-nf4") and 4 in wanted:
            jobs += [("bnb-nf4", (4, 64))]
    # 8 and 4 bits first: a long run that is stopped early has the headline rows
    order = {8: 0, 4: 1, 3: 2, 6: 3, 5: 4}
    jobs.sort(key=lambda j: order.get(j[1].bits if isinstance(j[1], WeightConfig) else j[1][0], 9))
    jobs += [("budget", b) for b in budgets]
    for kind, job in tqdm(jobs, desc="compare", disable=not progress):
        if kind == "budget":
            row, _ = h.measure_budget(job)
        elif kind in ("qins", "qins+act"):
            row = h.measure_config(job, match=job.bits in match_bits, calibrated=kind == "qins+act")
        else:
            bits, g = job
            variant = copy.deepcopy(h.model)
            if kind == "hqq":
                info = peers.fake_quantize_hqq(variant, bits, g, progress=progress)
            else:
                info = peers.fake_quantize_bnb_nf4(variant, g, progress=progress)
            row = h.measure(variant, f"{kind}-{bits}b-g{g} (peer)", bpw=info["bpw"], match=bits in match_bits,
                            extra={"format": kind, "bits": bits, "group_size": g, "peer": True,
                                   "bpw_all": None})      # fake-quantized: its float storage is not what it stores
            del variant
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    return rows
