"""The attention-error probe on a tiny model: captures every layer, error falls with bits."""
from __future__ import annotations

import torch

from experiments.kv_probe.probe import attention_error, capture_qkv, fake_quantize


def test_capture_and_error_falls_with_bits(make_model, token_ids):
    model = make_model("llama")
    qkv = capture_qkv(model, token_ids)
    assert sorted(qkv) == [0, 1]
    q, k, v = qkv[0]
    assert q.shape[:3] == (2, 4, 24) and k.shape == v.shape == (2, 2, 24, 16)
    assert model.config._attn_implementation != "qins_probe"          # restored
    for which in ("k", "v"):
        e = {b: sum(attention_error(qkv, which, b, group=8, sink=1)) for b in (8, 4, 2)}
        assert e[8] < e[4] < e[2]


def test_fake_quantize_keeps_sink_exact():
    x = torch.randn(1, 2, 32, 16, generator=torch.Generator().manual_seed(0))
    x[:, :, 0] = 50.0
    y = fake_quantize(x, "k", 4, group=16, sink=1)
    assert torch.equal(y[:, :, 0], x[:, :, 0])
    # the outlier is out of the first group's range: the others keep a 4-bit error (measured 0.18)
    assert (y[:, :, 1:] - x[:, :, 1:]).abs().max() < 0.5


def test_rotation_is_undone():
    """The Hadamard rotation is orthonormal: at 8 bits the rotated round trip stays as close as
    the plain one, and the matrix is its own inverse."""
    from experiments.kv_probe.probe import hadamard
    h = hadamard(16)
    assert torch.allclose(h @ h, torch.eye(16), atol=1e-6)
    x = torch.randn(1, 2, 64, 16, generator=torch.Generator().manual_seed(1))
    for which in ("k", "v"):
        plain = (fake_quantize(x, which, 8, group=16) - x).norm()
        rot = (fake_quantize(x, which, 8, group=16, rotate=True) - x).norm()
        assert rot < 3 * plain and rot < 0.05 * x.norm()
