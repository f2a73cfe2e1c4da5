"""KV page pool: one preallocated pool per plane per layer, addressed by per-sequence block tables.

Layout (the FlashInfer / vLLM paged shape). A layer's quantized tokens live in one `PagePool`
of N pages; a page holds P tokens (P a multiple of the key group G) of ONE sequence (batch
row), all H KV heads. Scales and zero points live in side pools indexed by the same page id:

    k_codes  (N, H, P, Wk) int32     Wk = packing.packed_words(D, k_bits) (or a key plan's words)
    k_scale  (N, H, P // G, D) fp16  one scale per (group, channel)
    k_zero   (N, H, P // G, D) fp16  one zero point per (group, channel), or None
    v_codes  (N, H, P, Wv) int32     Wv = packing.packed_words(D, v_bits)
    v_scale  (N, H, P) fp16          one scale per token
    v_zero   (N, H, P) fp16          one zero point per token, or None

    element offset of token slot s of head h in page n (every plane contiguous):
    k_codes  ((n H + h) P + s) Wk    a token row is Wk consecutive int32 words; a page's rows of
                                     one head are P Wk consecutive words
    k_scale  ((n H + h) P/G + s/G) D
    v_scale  (n H + h) P + s

A sequence's token t sits in page `table[b, t // P]`, slot t % P (`BlockTable`: a device
(B, columns) int32 tensor, the kernel's input, and the host-side counts that need no sync).
Pages are handed out from a free list, then from never-used ids (a bump pointer): allocating a
page copies nothing. When both are empty the pool collects the pages no table references (one
host sync, only then); if none is free, a pool built with a fixed size raises `PoolExhausted`,
and a growable one (the CPU default, `pages=None`) reallocates with 1/8 more pages (ids kept,
so tables stay valid; `nbytes` counts the whole capacity).

Pages shared by several rows (after `reorder` / `repeat` for beam search) are copy-on-write:
sealed pages are never written, and before a write into a shared column the table's pages of
that column are copied into fresh pages (one device gather, no host sync).
"""
from __future__ import annotations

import torch

from ..codec.packing import packed_words


class PoolExhausted(RuntimeError):
    """The page pool has no free page (build the cache with a larger max_tokens)."""


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


class PagePool:
    """N pages of P tokens (fields and layout: the module docstring). `pages=None`: growable
    (starts empty, grows by whole pages); an int: exactly that many pages, `PoolExhausted`
    when a table asks for more than are free."""

    PLANES = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
    GROWTH = 8                       # a growable pool grows by 1/GROWTH of its pages (at least what is asked)

    def __init__(self, H, D, P, group, k_bits, v_bits, device, k_zero=False, v_zero=False,
                 pages: int | None = None, k_words: int | None = None):
        if P % group:
            raise ValueError(f"page tokens ({P}) must be a multiple of the group ({group})")
        self.group, self.page_tokens = group, P
        self.shape = (H, D, packed_words(D, k_bits) if k_words is None else k_words, packed_words(D, v_bits))
        self.has_zero = (k_zero, v_zero)
        self.device = device
        self.fixed = pages is not None
        self.k_codes = self.k_scale = self.k_zero = self.v_codes = self.v_scale = self.v_zero = None
        self.free: list[int] = []
        self.next_id = 0
        self.n_parked = 0                # pages the pool had when parked
        self._alloc(pages or 0)

    def _alloc(self, n: int) -> None:
        """Reallocate every plane with n pages, keeping the pages there are (ids unchanged)."""
        H, D, Wk, Wv = self.shape
        P, Gp = self.page_tokens, self.page_tokens // self.group
        i32, f16 = dict(dtype=torch.int32, device=self.device), dict(dtype=torch.float16, device=self.device)
        new = dict(k_codes=torch.zeros(n, H, P, Wk, **i32), k_scale=torch.zeros(n, H, Gp, D, **f16),
                   k_zero=torch.zeros(n, H, Gp, D, **f16) if self.has_zero[0] else None,
                   v_codes=torch.zeros(n, H, P, Wv, **i32), v_scale=torch.zeros(n, H, P, **f16),
                   v_zero=torch.zeros(n, H, P, **f16) if self.has_zero[1] else None)
        for name, x in new.items():
            old = getattr(self, name)
            if old is not None and x is not None and old.shape[0]:
                x[:old.shape[0]] = old
            setattr(self, name, x)

    @property
    def n_pages(self) -> int:
        return self.k_codes.shape[0]

    def allocate(self, n: int, live) -> list[int]:
        """n fresh page ids. `live()` returns the ids some table still references (called only
        when neither the free list nor never-used ids can serve, to collect the rest)."""
        out = []
        while len(out) < n:
            if self.free:
                out.append(self.free.pop())
            elif self.next_id < self.n_pages:
                out.append(self.next_id)
                self.next_id += 1
            else:
                used = set(live()) | set(out)
                self.free = sorted(set(range(self.next_id)) - used, reverse=True)
                if self.free:
                    continue
                if self.fixed:
                    raise PoolExhausted(
                        f"the KV page pool is exhausted: all {self.n_pages} pages of {self.page_tokens} tokens "
                        f"are in use; build the cache with a larger max_tokens")
                need = n - len(out)
                self._alloc(self.n_pages + max(need, self.n_pages // self.GROWTH, 1))
        return out

    def release_all(self) -> None:
        self.free, self.next_id = [], 0

    def copy_pages(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy pages src -> dst (device int64 ids of one length), every plane."""
        for name in self.PLANES:
            x = getattr(self, name)
            if x is not None:
                x.index_copy_(0, dst, x.index_select(0, src))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, n) for n in self.PLANES if getattr(self, n) is not None)

    def page_nbytes(self) -> int:
        return sum(t[:1].numel() * t.element_size() for t in self.tensors())

    def nbytes(self) -> int:
        """Bytes allocated: every page of the pool, free or not."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def parked(self) -> bool:
        """True while the planes are away (`park`): the pool holds no memory and takes no reads
        or writes until `unpark`."""
        return self.k_codes is None

    def park(self) -> dict[str, torch.Tensor]:
        """Hand the planes out and let the pool go: {plane: its pages [0, next_id)} (the pages
        ever handed out; the rest were never written and are zeros), on the pool's device. The
        page ids, free list and tables stay valid for `unpark`."""
        if self.parked:
            raise RuntimeError("the page pool is already parked")
        out = {n: getattr(self, n)[:self.next_id] for n in self.PLANES if getattr(self, n) is not None}
        self.n_parked = self.n_pages
        for n in self.PLANES:
            setattr(self, n, None)
        return out

    def unpark(self, planes: dict[str, torch.Tensor]) -> None:
        """Inverse of `park`: the pool again on its device, with these pages [0, next_id)."""
        if not self.parked:
            raise RuntimeError("the page pool is not parked")
        want = [n for n in self.PLANES if n not in ("k_zero", "v_zero") or self.has_zero[n == "v_zero"]]
        if sorted(planes) != sorted(want):
            raise ValueError(f"unpark needs the planes {want}, got {sorted(planes)}")
        self._alloc(self.n_parked)
        for n, t in planes.items():
            dst = getattr(self, n)
            if tuple(t.shape) != (self.next_id, *dst.shape[1:]) or t.dtype != dst.dtype:
                raise ValueError(f"plane {n}: expected {(self.next_id, *dst.shape[1:])} {dst.dtype}, "
                                 f"got {tuple(t.shape)} {t.dtype}")
            dst[:self.next_id] = t.to(dst.device)

    def to(self, device) -> None:
        if self.parked:
            raise RuntimeError("the page pool is parked (its pages are offloaded): unpark it first")
        for name in self.PLANES:
            x = getattr(self, name)
            if x is not None:
                setattr(self, name, x.to(device, non_blocking=True))
        self.device = self.k_codes.device


class BlockTable:
    """Which pages hold each sequence's tokens: `ids` (B, columns) int32 on the pool's device,
    column j of row b = the page of tokens [j P, (j + 1) P). Host-side counts: `n_tokens`
    written per row (the same for every row, as transformers' caches are), `n_cols` columns
    with a page, `shared` columns whose pages rows may share (copy-on-write before a write)."""

    def __init__(self, B: int, device, columns: int = 0):
        self.ids = torch.zeros(B, columns, dtype=torch.int32, device=device)
        self.n_tokens = 0
        self.n_cols = 0
        self.shared: set[int] = set()

    @property
    def batch(self) -> int:
        return self.ids.shape[0]

    def live(self) -> list[int]:
        """Every page id a row references (a host sync: only the pool's collector calls it)."""
        return torch.unique(self.ids[:, :self.n_cols]).tolist() if self.n_cols else []

    def ensure(self, pool: PagePool, n_tokens: int, max_cols: int | None = None) -> None:
        """Give every row pages for tokens [0, n_tokens) (new columns get fresh pages)."""
        P = pool.page_tokens
        need = -(-n_tokens // P)
        if max_cols is not None and need > max_cols:
            raise PoolExhausted(f"{n_tokens} tokens need {need} pages per sequence; this cache was built for "
                                f"{max_cols * P} tokens (max_tokens)")
        if need <= self.n_cols:
            return
        if need > self.ids.shape[1]:
            grow = max(need, self.ids.shape[1] + self.ids.shape[1] // 4 + 1)
            ids = torch.zeros(self.batch, grow, dtype=torch.int32, device=self.ids.device)
            ids[:, :self.n_cols] = self.ids[:, :self.n_cols]
            self.ids = ids
        B = self.batch
        new = pool.allocate(B * (need - self.n_cols), self.live)
        self.ids[:, self.n_cols:need] = torch.tensor(new, dtype=torch.int32).view(need - self.n_cols, B).T.to(
            self.ids.device)
        self.n_cols = need

    def own(self, pool: PagePool, col: int) -> None:
        """Copy-on-write: before writing into column `col`, give every row its own copy of that
        column's page if rows may share it (after reorder / repeat). No host sync."""
        if col not in self.shared:
            return
        B = self.batch
        new = torch.tensor(pool.allocate(B, self.live), dtype=torch.int32).to(self.ids.device)
        pool.copy_pages(self.ids[:, col].long(), new.long())
        self.ids[:, col] = new
        self.shared.discard(col)

    def map_rows(self, fn) -> None:
        """A batch op (index_select, repeat_interleave) on the rows: pages become shared."""
        self.ids = fn(self.ids)
        self.shared = set(range(self.n_cols))

    def gather(self, plane: torch.Tensor, n: int) -> torch.Tensor:
        """(B, H, n, ...) entries [0, n) of a pool plane (N, H, S, ...) read through the table
        (S = P tokens, or P / G key groups); one gather, a copy."""
        cols = -(-n // plane.shape[2])
        x = plane.index_select(0, self.ids[:, :cols].reshape(-1).long())         # (B*cols, H, S, ...)
        B, S = self.batch, plane.shape[2]
        x = x.view(B, cols, *plane.shape[1:]).transpose(1, 2)                      # (B, H, cols, S, ...)
        return x.reshape(B, plane.shape[1], cols * S, *plane.shape[3:])[:, :, :n]


class PageView:
    """Page `index` (a table column) of batch row `row` of a layer (read-only views; for
    inspection and tests)."""

    __slots__ = ("pool", "table", "index", "row")

    def __init__(self, pool: PagePool, table: BlockTable, index: int, row: int = 0):
        self.pool, self.table, self.index, self.row = pool, table, index, row

    @property
    def page_id(self) -> int:
        return int(self.table.ids[self.row, self.index])

    @property
    def capacity(self) -> int:
        return self.pool.page_tokens

    @property
    def n_tokens(self) -> int:
        return min(max(self.table.n_tokens - self.index * self.capacity, 0), self.capacity)

    @property
    def n_groups(self) -> int:
        return -(-self.n_tokens // self.pool.group)

    @property
    def sealed(self) -> bool:
        return self.n_tokens == self.capacity

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t[self.page_id] for t in self.pool.tensors())

    def nbytes(self) -> int:
        return self.pool.page_nbytes()

    def __getattr__(self, name):
        if name in PagePool.PLANES:
            x = getattr(self.pool, name)
            return None if x is None else x[self.page_id]
        raise AttributeError(name)
