"""The KV page store (kv/store.py): page sizes, bytes, growth by whole pages."""
from __future__ import annotations

import torch

from qins.kv.store import PageStore, page_tokens



def test_page_size_and_bytes():
    # SmolLM2-135M: 3 KV heads of 64; 8 bits -> 390 B/token + a 384 B key-scale row per group
    assert page_tokens(32, 3, 64, 8, 8, 64) == 64
    assert page_tokens(32, 3, 64, 4, 4, 64) == 128
    assert page_tokens(32, 3, 64, 2, 2, 64) == 256
    assert page_tokens(16, 3, 64, 8, 8, 64) == 64          # at least one group
    # 4 bits, group 128 with key zero points: 24576 B of codes + 768 v scales + 768 k scales/zeros
    assert page_tokens(32, 3, 64, 4, 4, 128, k_zero=True) == 128
    p = PageStore(1, 3, 64, 128, 128, 4, 4, "cpu", k_zero=True, pages=1)
    assert p.nbytes() == 3 * (128 * 8 * 4 * 2 + 64 * 2 * 2 + 128 * 2) <= 32 * 1024
    p = PageStore(2, 3, 64, 128, 64, 4, 4, "cpu", pages=1)
    assert p.nbytes() == 2 * 3 * (128 * 8 * 4 * 2 + 2 * 64 * 2 + 128 * 2)
    assert p.nbytes() <= 2 * 32 * 1024                      # page_kb per batch row
    assert PageStore(2, 3, 64, 128, 64, 4, 4, "cpu", pages=5).nbytes() == 5 * p.nbytes()


def test_page_store_grows_by_whole_pages_and_keeps_pages():
    # one contiguous tensor per plane; pages are token ranges; growth keeps written pages
    g = torch.Generator().manual_seed(0)
    st = PageStore(2, 3, 64, 32, 16, 4, 4, "cpu", k_zero=True)
    assert st.capacity == 0 and st.nbytes() == 0 and st.n_pages == 0
    written = []
    for n in (16, 48, 32, 16, 160):
        kc = torch.randint(-2**31, 2**31 - 1, (2, 3, n, 8), generator=g, dtype=torch.int32)
        ks, kz = torch.randn(2, 3, n // 16, 64, generator=g).half(), torch.randn(2, 3, n // 16, 64, generator=g).half()
        vc = torch.randint(-2**31, 2**31 - 1, (2, 3, n, 8), generator=g, dtype=torch.int32)
        vs = torch.randn(2, 3, n, generator=g).half()
        st.write_groups(kc, ks, kz, vc, vs, None)
        written.append((kc, ks, kz, vc, vs))
        assert st.capacity % 32 == 0 and st.capacity >= st.n_tokens
        kw, kss, kzz, vw, vss, vz = st.planes()
        assert vz is None and st.v_zero is None
        cat = lambda i: torch.cat([w[i] for w in written], 2)
        for got, i in ((kw, 0), (kss, 1), (kzz, 2), (vw, 3), (vss, 4)):
            assert torch.equal(got, cat(i))
    assert st.n_tokens == 272 and st.n_pages == 9 and not st.page_sealed(8) and st.page_sealed(7)
    k_codes, k_scale, k_zero, v_codes, v_scale = st.page_tensors(2)
    assert torch.equal(k_codes, st.k_codes[:, :, 64:96]) and torch.equal(k_scale, st.k_scale[:, :, 4:6])
    assert k_codes.stride(-1) == 1 and k_codes[0, 0].is_contiguous()   # one (b, h): P*W consecutive words
    assert st.nbytes() == sum(t.numel() * t.element_size() for t in st.tensors())
    st.truncate(3)
    assert st.n_tokens == 48 and st.n_pages == 2
