"""KV page store: one preallocated tensor per plane per layer, pages as token ranges.

Layout. A layer's pages live in one `PageStore`: one contiguous tensor per plane with a
capacity of C tokens (a whole number of pages of P tokens, P a multiple of G), batch rows
and KV heads outermost. Page i is the token range [i P, (i + 1) P) of every plane (its key
groups: [i P / G, (i + 1) P / G)). Codes are packed per token row (layout.py):

    k_codes  (B, H, C, Wk) int32    Wk = packing.packed_words(D, k_bits)
    k_scale  (B, H, C // G, D) fp16 one scale per (group, channel)
    k_zero   (B, H, C // G, D) fp16 one zero point per (group, channel), or None
    v_codes  (B, H, C, Wv) int32    Wv = packing.packed_words(D, v_bits)
    v_scale  (B, H, C) fp16         one scale per token
    v_zero   (B, H, C) fp16         one zero point per token, or None

    element offsets of page i, row (b, h), in each plane (all tensors contiguous):
    k_codes[b, h, iP:(i+1)P]    ((b H + h) C + i P) Wk      P Wk consecutive int32 words
    k_scale[b, h, iP/G:...]     ((b H + h) C/G + i P/G) D   (P/G) D consecutive fp16
    v_scale[b, h, iP:(i+1)P]    (b H + h) C + i P           P consecutive fp16
    (k_zero like k_scale, v_codes like k_codes, v_zero like v_scale)

So a GPU kernel reads page i of (b, h) as one run of P*W words (plus its scale runs) given
the store's base pointers and C, e.g. through a block table of page indices. Tokens
0 .. n_tokens - 1 are written, whole groups at a time (`PageStore.write_groups`); a page is
sealed once its P // G groups are written and its ranges are never written again (only
`QINSLayer.crop` may give back groups, reopening the last page, and beam search permutes
whole batch rows). When a write needs more than C tokens the store is reallocated with
max(needed, C + C / 8) tokens rounded up to whole pages and the written prefix copied (so
appends cost amortized O(new tokens) and the slack is at most about 1/8 of the capacity
while decoding; a prefill is allocated exactly). `nbytes` counts the whole capacity, slack
included. The decode reads the written prefix of each plane, a strided view
[:, :, :n_tokens], in one op per plane (no concatenation over pages).
"""
from __future__ import annotations

import torch

from ..codec.packing import packed_words


def page_tokens(page_kb: int, heads: int, head_dim: int, k_bits: int, v_bits: int, group: int,
                k_zero: bool = False, v_zero: bool = False, k_words: int | None = None) -> int:
    """Tokens per page: the largest multiple of `group` whose codes, scales and zero points of
    K and V for one batch row fit in page_kb KiB (at least one group). `k_words` overrides the
    words per key row (mixed channel widths: RowLayout.mixed)."""
    wk = packed_words(head_dim, k_bits) if k_words is None else k_words
    per_token = heads * (wk + packed_words(head_dim, v_bits)) * 4 \
        + heads * 2 * (1 + v_zero)                                    # v scale (+ zero point)
    per_group = per_token * group + heads * head_dim * 2 * (1 + k_zero)   # + k scale (+ zero) row
    return max(1, (page_kb * 1024) // per_group) * group

class PageStore:
    """The sealed (and open) pages of one layer: one contiguous tensor per plane, grown in
    whole pages; page i is the token range [i P, (i + 1) P) of every plane (fields and
    layout: see the module docstring; k_zero / v_zero are None for codecs without a zero
    point). Tokens 0 .. n_tokens - 1 are written; the capacity beyond them is slack, counted
    by `nbytes`."""

    PLANES = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
    GROWTH = 8                       # a full store grows by 1/GROWTH of its capacity (at least what is asked)

    def __init__(self, B, H, D, P, group, k_bits, v_bits, device, k_zero=False, v_zero=False, pages: int = 0,
                 k_words: int | None = None):
        if P % group:
            raise ValueError(f"page tokens ({P}) must be a multiple of the group ({group})")
        self.group, self.page_tokens, self.n_groups = group, P, 0
        self.shape = (B, H, D, packed_words(D, k_bits) if k_words is None else k_words, packed_words(D, v_bits))
        self.has_zero = (k_zero, v_zero)
        self.device = device
        self.k_codes = self.k_scale = self.k_zero = self.v_codes = self.v_scale = self.v_zero = None
        self._alloc(pages * P)

    def _empty(self, C: int) -> dict:
        B, H, D, Wk, Wv = self.shape
        i32, f16 = dict(dtype=torch.int32, device=self.device), dict(dtype=torch.float16, device=self.device)
        G = C // self.group
        return dict(k_codes=torch.zeros(B, H, C, Wk, **i32), k_scale=torch.zeros(B, H, G, D, **f16),
                    k_zero=torch.zeros(B, H, G, D, **f16) if self.has_zero[0] else None,
                    v_codes=torch.zeros(B, H, C, Wv, **i32), v_scale=torch.zeros(B, H, C, **f16),
                    v_zero=torch.zeros(B, H, C, **f16) if self.has_zero[1] else None)

    def _alloc(self, C: int) -> None:
        """Reallocate every plane with capacity C tokens (a multiple of P), keeping what is written."""
        new = self._empty(C)
        t, g = self.n_tokens, self.n_groups
        for name, x in new.items():
            old = getattr(self, name)
            if old is not None and x is not None:
                n = g if name in ("k_scale", "k_zero") else t
                x[:, :, :n] = old[:, :, :n]
            setattr(self, name, x)

    @property
    def capacity(self) -> int:
        return self.k_codes.shape[2]

    @property
    def n_tokens(self) -> int:
        return self.n_groups * self.group

    @property
    def n_pages(self) -> int:
        """Pages holding at least one written group (the last may be open)."""
        return -(-self.n_tokens // self.page_tokens)

    def page_range(self, i: int) -> tuple[int, int]:
        """Token range [t0, t1) of page i (its groups: [t0 / G, t1 / G))."""
        return i * self.page_tokens, (i + 1) * self.page_tokens

    def page_sealed(self, i: int) -> bool:
        return self.page_range(i)[1] <= self.n_tokens

    def page_tensors(self, i: int) -> tuple[torch.Tensor, ...]:
        """Views of page i's planes (codes, scales, zero points of K then V; None planes left out)."""
        t0, t1 = self.page_range(i)
        G = self.group
        out = []
        for name in self.PLANES:
            x = getattr(self, name)
            if x is not None:
                out.append(x[:, :, t0 // G:t1 // G] if name in ("k_scale", "k_zero") else x[:, :, t0:t1])
        return tuple(out)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, n) for n in self.PLANES if getattr(self, n) is not None)

    def nbytes(self) -> int:
        """Bytes allocated: every page of the capacity, slack (unwritten tokens) included."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def planes(self) -> tuple[torch.Tensor | None, ...]:
        """Written prefix of every plane (views, no copy): k_codes, k_scale, k_zero, v_codes,
        v_scale, v_zero; (B, H, n_tokens, ...) or (B, H, n_groups, ...)."""
        t, g = self.n_tokens, self.n_groups
        return tuple(None if (x := getattr(self, n)) is None else
                     x[:, :, :g] if n in ("k_scale", "k_zero") else x[:, :, :t] for n in self.PLANES)

    def write_groups(self, kc, ks, kz, vc, vs, vz) -> None:
        """Append whole groups after the written tokens (growing the store by whole pages):
        kc/vc (B, H, g*G, W) int32, ks/kz (B, H, g, D), vs/vz (B, H, g*G). Written tokens
        are never written again (only `truncate` may give groups back)."""
        t0, g0 = self.n_tokens, self.n_groups
        n = kc.shape[2]
        g = n // self.group
        need = t0 + n
        if need > self.capacity:
            P = self.page_tokens
            grow = max(need, self.capacity + self.capacity // self.GROWTH)
            self._alloc(-(-grow // P) * P)
        self.k_codes[:, :, t0:t0 + n] = kc
        self.k_scale[:, :, g0:g0 + g] = ks
        self.v_codes[:, :, t0:t0 + n] = vc
        self.v_scale[:, :, t0:t0 + n] = vs
        if self.k_zero is not None:
            self.k_zero[:, :, g0:g0 + g] = kz
        if self.v_zero is not None:
            self.v_zero[:, :, t0:t0 + n] = vz
        self.n_groups += g

    def truncate(self, n_groups: int) -> None:
        """Keep the first n_groups groups (the capacity is kept: later writes reuse it)."""
        self.n_groups = min(self.n_groups, max(n_groups, 0))

    def map_batch(self, fn) -> None:
        """Apply a batch-dimension op (index_select, repeat_interleave, .to) to every plane."""
        for name in self.PLANES:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        self.shape = (self.k_codes.shape[0],) + self.shape[1:]
        self.device = self.k_codes.device

class PageView:
    """Page i of a PageStore (read-only views; for inspection and tests)."""

    __slots__ = ("store", "index")

    def __init__(self, store: PageStore, index: int):
        self.store, self.index = store, index

    @property
    def capacity(self) -> int:
        return self.store.page_tokens

    @property
    def n_tokens(self) -> int:
        return min(max(self.store.n_tokens - self.index * self.capacity, 0), self.capacity)

    @property
    def n_groups(self) -> int:
        return self.n_tokens // self.store.group

    @property
    def sealed(self) -> bool:
        return self.store.page_sealed(self.index)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.store.page_tensors(self.index)

    def nbytes(self) -> int:
        """Bytes of the page's ranges (written or not)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def __getattr__(self, name):
        if name in PageStore.PLANES:
            i = PageStore.PLANES.index(name)
            if getattr(self.store, name) is None:
                return None
            j = sum(getattr(self.store, n) is not None for n in PageStore.PLANES[:i])
            return self.tensors()[j]
        raise AttributeError(name)
