"""The clip search keeps the full range where it is best and never raises a group's error."""
from __future__ import annotations

import torch

from experiments.kv_clip import screen
from qins.kv.codec import Codec


def test_clipped_params_never_raise_the_group_error(monkeypatch):
    monkeypatch.setitem(screen.WHICH, "k", True)
    monkeypatch.setitem(screen.WHICH, "v", True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 16, 8, generator=g)
    x[:, :, :, 0] *= 12                                             # an outlier token per group
    for codec in (Codec.build("qins", 4, 0.0, True), Codec.build("qins", 4, 0.5, False)):
        s0, m0 = screen._orig_params(codec, x, 3)
        s1, m1 = screen.clipped_params(codec, x, 3)
        err = lambda s, m: (codec.decode(codec.encode(x, s, m), s, m, torch.float32) - x).pow(2).sum(3)
        assert (err(s1, m1) <= err(s0, m0) + 1e-6).all()
        assert (s1.float().abs() <= s0.float().abs()).all() and (s1 != s0).any()
