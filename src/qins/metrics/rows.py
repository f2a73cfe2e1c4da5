"""Result rows: the one dict every report, table and JSON file is built from.

    row = quality_row("qins-4b-g64", evaluate(model, ref), bpw=4.25)
    row.update(match_fields(token_match(ref_gen, gen)))

Keys (None where not measured): label, bpw, ppl, ppl_ref, ppl_increase_pct (percent), kl
(nats/token), top1 (share), windows, tokens; match, identical, sequences, first_divergence
from greedy token match; anything else a report adds (bpw_all, seconds, kv_config, ...).
"""
from __future__ import annotations


def ppl_increase_pct(ppl: float, ppl_ref: float) -> float:
    """Perplexity increase over the reference, percent."""
    return 100.0 * (ppl / ppl_ref - 1.0)


def quality_row(label: str, q: dict, **extra) -> dict:
    """A row from `metrics.quality.evaluate`'s result `q` (ppl, ppl_ref, kl, top1, windows,
    tokens[, chunk]) plus `extra` fields."""
    row = {"label": label, "ppl": q["ppl"], "ppl_ref": q["ppl_ref"],
           "ppl_increase_pct": ppl_increase_pct(q["ppl"], q["ppl_ref"]), "kl": q["kl"], "top1": q["top1"],
           "windows": q["windows"], "tokens": q["tokens"]}
    if "chunk" in q:
        row["chunk"] = q["chunk"]
    row.update(extra)
    return row


def match_fields(tm: dict | None) -> dict:
    """The greedy-token-match fields of a row from `metrics.generation.token_match` (None: not run)."""
    if tm is None:
        return {"match": None, "identical": None, "sequences": None, "first_divergence": None}
    return {"match": tm["match"], "identical": tm["identical"], "sequences": tm["sequences"],
            "first_divergence": tm["first_divergence_mean"]}
