"""Evaluation against the uncompressed model: perplexity, KL, top-1, greedy token match, memory.

    ref = Reference.build(float_model, token_windows(tok, text, 512, max_windows=8))
    evaluate(model, ref)                       # ppl, nll, ppl_ref, kl, top1, windows, tokens
    token_match(greedy_generate(float_model, tok, load_prompts(16)),
                greedy_generate(model, tok, load_prompts(16)))
    memory_report(model)                       # bytes by class, bits per weight
"""
from __future__ import annotations

from ..metrics.generation import greedy_generate, load_prompts, token_match
from ..metrics.memory import format_bytes, memory_report
from ..metrics.quality import Reference, evaluate, token_windows

__all__ = [
    "token_windows", "Reference", "evaluate",
    "load_prompts", "greedy_generate", "token_match",
    "memory_report", "format_bytes",
]
