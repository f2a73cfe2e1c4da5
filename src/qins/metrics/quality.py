"""Teacher-forced quality against the float model: perplexity, KL(p_ref || p_test), top-1.

Protocol (DESIGN.md, "Measurement protocol"): the text is tokenized once and cut into
non-overlapping windows of `window` tokens; every window predicts its tokens 1..window-1
from the tokens before them, so N windows give N*(window-1) predicted tokens. The float
model runs once (`Reference.build`); each compressed model is compared to it on the same
windows (`evaluate`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._compat import cache_kwarg


def token_windows(tok, text: str, window: int = 512, max_windows: int | None = None) -> torch.Tensor:
    """(N, window) int64 token ids: non-overlapping windows of `text`, ragged tail dropped.

    The text is tokenized once without special tokens (no BOS per window), so the windows are
    consecutive slices of one token stream. `max_windows` keeps the first windows only.
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens (one context, one target), got {window}")
    ids = tok.encode(text, add_special_tokens=False)
    n = len(ids) // window
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {window}; "
                         "use a longer text or a smaller window")
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be at least 1, got {max_windows}")
        n = min(n, max_windows)
    return torch.tensor(ids[: n * window], dtype=torch.long).view(n, window)


def _model_device(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _next_token_logprobs(model, ids: torch.Tensor, make_cache=None, chunk: int = 32) -> torch.Tensor:
    """(B, T-1, V) float32 log-probs of tokens 1..T-1 given their prefixes, for ids (B, T).

    make_cache  None: one forward without a cache. Else a callable returning a fresh cache
                (QINSCache, DynamicCache, ...): the window is prefilled `chunk` tokens at a
                time through it, so every later chunk reads the earlier tokens back as the
                cache returns them.
    """
    if make_cache is None:
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]   # (B, T-1, V)
    else:
        cache, key = make_cache(), cache_kwarg(model)
        logits = torch.cat([model(input_ids=ids[:, i:i + chunk], use_cache=True, **{key: cache}).logits
                            for i in range(0, ids.shape[1], chunk)], 1)[:, :-1]
    # fp32 log-softmax: a bf16/fp16 model would otherwise round the small probabilities away
    lp = F.log_softmax(logits.float(), dim=-1)
    # floor -inf (a masked logit) at the lowest float: the KL sum would take 0 * inf = nan
    return lp.clamp_min_(torch.finfo(torch.float32).min)


@dataclass
class Reference:
    """The float model's predictions on fixed windows, computed once and compared against.

    windows    (N, T) int64                  token ids (token_windows)
    logprobs   list of (B_i, T-1, V) float32 next-token log-probs of each batch, on CPU;
                                             sum B_i = N. Size N*(T-1)*V*4 bytes: about
                                             100 MB per 512-token window at V = 49152.
    nll        mean negative log-likelihood, nats per predicted token
    ppl        exp(nll)
    """

    windows: torch.Tensor
    logprobs: list[torch.Tensor]
    nll: float
    ppl: float

    @property
    def tokens(self) -> int:
        """Number of predicted tokens, N*(T-1)."""
        return self.windows.shape[0] * (self.windows.shape[1] - 1)

    @classmethod
    def build(cls, model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> "Reference":
        """Run `model` once over `windows` (N, T) and keep its next-token log-probs."""
        if windows.dim() != 2 or windows.shape[1] < 2:
            raise ValueError(f"windows must have shape (N, T) with T >= 2, got {tuple(windows.shape)}")
        device = _model_device(model)
        logprobs, nll_sum = [], 0.0
        with torch.inference_mode():
            for i in tqdm(range(0, windows.shape[0], batch_size), desc="reference", disable=not progress):
                ids = windows[i:i + batch_size].to(device)
                lp = _next_token_logprobs(model, ids)                # (B, T-1, V)
                nll_sum += -lp.gather(-1, ids[:, 1:, None]).double().sum().item()
                logprobs.append(lp.cpu())
        tokens = windows.shape[0] * (windows.shape[1] - 1)
        nll = nll_sum / tokens
        return cls(windows=windows.cpu(), logprobs=logprobs, nll=nll, ppl=math.exp(nll))

    def logprobs_slice(self, start: int, stop: int) -> torch.Tensor:
        """(stop-start, T-1, V) reference log-probs of windows start..stop-1 (a view when possible)."""
        parts, offset = [], 0
        for lp in self.logprobs:
            b = lp.shape[0]
            lo, hi = max(start, offset), min(stop, offset + b)
            if lo < hi:
                parts.append(lp[lo - offset:hi - offset])
            offset += b
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def evaluate(model, ref: Reference, batch_size: int = 4, progress: bool = True, make_cache=None,
             chunk: int = 32) -> dict:
    """Quality of `model` on the reference windows, compared position by position.

    make_cache, chunk: put a cache in the loop (chunked prefill, `_next_token_logprobs`); the
    reference itself is always one pass without a cache.

    Returns
      ppl, nll   perplexity and mean nats per predicted token of `model`
      ppl_ref    the reference model's perplexity on the same tokens
      kl         mean over predicted tokens of KL(p_ref || p_test), nats, in float32
      top1       share of positions whose argmax equals the reference argmax
      windows    N;  tokens: N*(T-1) predicted tokens
    """
    device = _model_device(model)
    windows = ref.windows
    n = windows.shape[0]
    nll_sum = kl_sum = 0.0
    top1_hits = 0
    with torch.inference_mode():
        for i in tqdm(range(0, n, batch_size), desc="evaluate", disable=not progress):
            ids = windows[i:i + batch_size].to(device)
            lp = _next_token_logprobs(model, ids, make_cache, chunk)  # (B, T-1, V)
            lp_ref = ref.logprobs_slice(i, i + ids.shape[0]).to(device)
            nll_sum += -lp.gather(-1, ids[:, 1:, None]).double().sum().item()
            # KL(p_ref || p_test) = sum_v p_ref (log p_ref - log p_test), per position
            kl = F.kl_div(lp, lp_ref, reduction="none", log_target=True).sum(-1)   # (B, T-1)
            kl_sum += kl.double().sum().item()
            top1_hits += int((lp.argmax(-1) == lp_ref.argmax(-1)).sum())
            del lp, lp_ref, kl
    tokens = ref.tokens
    nll = nll_sum / tokens
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "ppl_ref": ref.ppl,
        "kl": kl_sum / tokens,
        "top1": top1_hits / tokens,
        "windows": n,
        "tokens": tokens,
        **({"chunk": chunk} if make_cache is not None else {}),
    }
