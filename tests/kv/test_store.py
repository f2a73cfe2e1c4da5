"""The KV page pool and block tables (kv/store.py): page sizes, bytes, allocation without
copying, a clear error when a fixed pool is exhausted, copy-on-write of shared pages."""
from __future__ import annotations

import pytest
import torch

from qins.kv.layer import QINSLayer
from qins.kv.store import BlockTable, PagePool, PoolExhausted, page_tokens


def test_page_size_and_bytes():
    # SmolLM2-135M: 3 KV heads of 64; 8 bits -> 390 B/token + a 384 B key-scale row per group
    assert page_tokens(32, 3, 64, 8, 8, 64) == 64
    assert page_tokens(32, 3, 64, 4, 4, 64) == 128
    assert page_tokens(32, 3, 64, 2, 2, 64) == 256
    assert page_tokens(16, 3, 64, 8, 8, 64) == 64          # at least one group
    # 4 bits, group 128 with key zero points: 24576 B of codes + 768 v scales + 768 k scales/zeros
    assert page_tokens(32, 3, 64, 4, 4, 128, k_zero=True) == 128
    p = PagePool(3, 64, 128, 128, 4, 4, "cpu", k_zero=True, pages=1)
    assert p.nbytes() == p.page_nbytes() == 3 * (128 * 8 * 4 * 2 + 64 * 2 * 2 + 128 * 2) <= 32 * 1024
    assert p.k_codes.shape == (1, 3, 128, 8) and p.k_scale.shape == (1, 3, 1, 64) and p.v_scale.shape == (1, 3, 128)
    assert PagePool(3, 64, 128, 64, 4, 4, "cpu", pages=5).nbytes() == 5 * PagePool(3, 64, 128, 64, 4, 4, "cpu",
                                                                                   pages=1).nbytes()


def test_allocation_reuses_free_pages_and_fixed_pool_refuses():
    pool = PagePool(2, 32, 16, 16, 4, 4, "cpu", pages=4)
    t = BlockTable(2, "cpu")
    t.ensure(pool, 20)                                     # 2 columns x 2 rows = 4 pages
    assert t.n_cols == 2 and sorted(t.ids.flatten().tolist()) == [0, 1, 2, 3]
    base = pool.k_codes.data_ptr()
    with pytest.raises(PoolExhausted, match="exhausted"):
        t.ensure(pool, 40)
    assert pool.k_codes.data_ptr() == base                 # never reallocated
    # a growable pool grows by whole pages, keeping ids and contents
    grow = PagePool(2, 32, 16, 16, 4, 4, "cpu")
    t = BlockTable(2, "cpu")
    t.ensure(grow, 16)
    grow.k_codes[t.ids[:, 0].long()] = 7
    t.ensure(grow, 16 * 9)
    assert grow.n_pages >= 18 and bool((grow.k_codes[t.ids[:, 0].long()] == 7).all())
    # rows dropped (batch_select) leave pages no table references: collected, not grown
    t2 = BlockTable(1, "cpu")
    t2.ensure(pool := PagePool(2, 32, 16, 16, 4, 4, "cpu", pages=2), 32)
    t2.map_rows(lambda x: x[:, :1])
    t2.n_cols = 1
    t2.ensure(pool, 32)
    assert t2.n_cols == 2 and t2.ids[0, 1] != t2.ids[0, 0]


def test_layer_max_tokens_preallocates_and_refuses_more():
    layer = QINSLayer(4, 4, residual=0, group=16, page_kb=16, expect_heads=2, expect_head_dim=32, max_tokens=100)
    x = torch.randn(3, 2, 60, 32)
    layer.update(x, x)
    P = layer.page_tokens
    assert layer.pool.n_pages == 3 * (-(-100 // P) + 1)
    ptr = layer.pool.k_codes.data_ptr()
    layer.update(x[:, :, :40], x[:, :, :40])
    assert layer.pool.k_codes.data_ptr() == ptr and layer.get_seq_length() == 100
    with pytest.raises(PoolExhausted, match="max_tokens=100"):
        layer.update(x[:, :, :1], x[:, :, :1])
    assert layer.get_seq_length() == 100                   # unchanged, still usable
    layer.crop(-10)
    layer.update(x[:, :, :10], x[:, :, :10])


def test_beam_reorder_shares_pages_copy_on_write():
    # beams: the block table's rows are permuted, no page is copied; the next write into a
    # shared page copies it first, and every row decodes as the row it came from
    g = torch.Generator().manual_seed(3)
    layer = QINSLayer(4, 4, residual=0, group=16, page_kb=16, expect_heads=2, expect_head_dim=32)
    x = torch.randn(3, 2, 40, 32, generator=g)              # 2 sealed groups + 8 staging tokens
    k0, v0 = layer.update(x, x)
    pages_before = layer.pool.n_pages
    codes_before = layer.pool.k_codes.clone()
    layer.reorder_cache(torch.tensor([2, 2, 0]))
    assert layer.pool.n_pages == pages_before and torch.equal(layer.pool.k_codes, codes_before)
    assert layer.table.ids[0, 0] == layer.table.ids[1, 0]   # shared, not copied
    k1, v1 = layer.update(x[:, :, :0], x[:, :, :0])
    assert torch.equal(k1, k0[[2, 2, 0]]) and torch.equal(v1, v0[[2, 2, 0]])
    y = torch.randn(3, 2, 8, 32, generator=g)               # seals the open group: writes the shared page
    k2, _ = layer.update(y, y)
    assert layer.table.ids[0, 0] != layer.table.ids[1, 0]   # copied on write
    assert torch.equal(k2[:, :, :32], k0[[2, 2, 0], :, :32])
    ref = QINSLayer(4, 4, residual=0, group=16, page_kb=16, expect_heads=2, expect_head_dim=32)
    ref.update(x[[2, 2, 0]], x[[2, 2, 0]])
    kr, _ = ref.update(y, y)
    assert torch.equal(k2, kr)
