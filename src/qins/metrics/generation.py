"""Greedy generation on fixed prompts and the token match of two runs.

Greedy token match is harsh on a small model: one near-tie flips the rest of a sequence.
Report it beside KL and top-1 (quality.py), which are the steadier signals.
"""
from __future__ import annotations

import json
from importlib import resources

import torch
from tqdm.auto import tqdm

from .._compat import cache_kwarg


def load_prompts(n: int | None = None) -> list[str]:
    """The first `n` (all if None) instruction prompts shipped in qins/data/prompts.json."""
    text = resources.files("qins").joinpath("data/prompts.json").read_text(encoding="utf-8")
    prompts = json.loads(text)
    return prompts if n is None else prompts[:n]


def _render(tok, prompt: str) -> tuple[str, bool]:
    """(text, add_special_tokens): the chat-templated prompt, or the raw prompt if no template."""
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                       add_generation_prompt=True, tokenize=False)
        # the template already writes its own special tokens
        return text, False
    return prompt, True


def _eos_ids(model, tok) -> set[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (gen_eos, tok.eos_token_id):
        if e is None:
            continue
        ids.update(e if isinstance(e, (list, tuple)) else [e])
    return ids


def _cut_after_eos(ids: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i + 1]
    return ids


def greedy_generate(model, tok, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 8,
                    progress: bool = True, make_cache=None, **generate_kwargs) -> list[list[int]]:
    """New token ids of greedy decoding, one list per prompt, cut after the first EOS (kept).

    Prompts go through the tokenizer's chat template as one user turn (raw if it has none)
    and are left-padded in batches of `batch_size`. `generate_kwargs` go to every
    `model.generate` call unchanged, so an object passed there (a KV cache) is shared by all
    batches; `make_cache` (a callable returning a fresh cache) gives every batch its own.
    """
    device = next(model.parameters()).device
    eos = _eos_ids(model, tok)
    old_side, old_pad = tok.padding_side, tok.pad_token
    out: list[list[int]] = []
    try:
        # left padding: the new tokens of every row then start at the same column
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        pad_id = tok.pad_token_id
        for i in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
            rendered = [_render(tok, p) for p in prompts[i:i + batch_size]]
            # all prompts render the same way: the template exists or it does not
            add_special = rendered[0][1]
            enc = tok([t for t, _ in rendered], return_tensors="pt", padding=True,
                      add_special_tokens=add_special).to(device)
            kw = dict(generate_kwargs)
            if make_cache is not None:
                kw[cache_kwarg(model)] = make_cache()
            with torch.inference_mode():
                seqs = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                      pad_token_id=pad_id, **kw)
            new = seqs[:, enc["input_ids"].shape[1]:].tolist()      # (B, <= max_new_tokens)
            out.extend(_cut_after_eos(row, eos) for row in new)
    finally:
        tok.padding_side = old_side
        if old_pad is None:
            tok.pad_token = None
    return out


def token_match(ref: list[list[int]], test: list[list[int]]) -> dict:
    """Position-by-position agreement of `test` with `ref` generations of the same prompts.

    Returns
      match                  share of reference tokens equal to the test token at the same
                             position; positions past the end of `test` count as mismatches
      identical              number of sequences with test == ref exactly (same length too)
      sequences, tokens      number of sequences and of reference tokens (the denominator)
      first_divergence_mean  mean index of the first differing position; an identical
                             sequence counts as its length, a length-only difference as
                             the shorter length
    """
    if len(ref) != len(test):
        raise ValueError(f"ref has {len(ref)} sequences, test has {len(test)}")
    hits = tokens = identical = 0
    first_div = []
    for r, t in zip(ref, test):
        same = [a == b for a, b in zip(r, t)]
        hits += sum(same)
        tokens += len(r)
        identical += int(r == t)
        first_div.append(same.index(False) if False in same else min(len(r), len(t)))
    n = len(ref)
    return {
        "match": hits / tokens if tokens else 0.0,
        "identical": identical,
        "sequences": n,
        "tokens": tokens,
        "first_divergence_mean": sum(first_div) / n if n else 0.0,
    }
