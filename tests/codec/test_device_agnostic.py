"""The device-agnostic quantizer gives the codes main gave when from_float forced the CPU.

data/main_codes.safetensors holds the stored tensors of commit 9eaea91 for every case of
main_codes.py: two random matrices (a ragged g64 and a per-channel one) x qins, int-sym,
int-asym, nf4, fp8 at 4 and 8 bits, plain, activation-weighted and GPTQ, plus qins with a
curvature per channel. Nearest rounding must match exactly: the calibration does the same
float32 operations in the same order, only once per clip and on row chunks. GPTQ runs its
column updates through matmuls, whose summation order belongs to the BLAS build: there the
codes may move at near-ties (measured on this machine: identical).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qins.codec import QuantizedWeight, calibrate, packing
from qins.codec.config import WeightConfig

from .main_codes import build, cases

DATA = Path(__file__).parent / "data" / "main_codes.safetensors"


@pytest.fixture(scope="module")
def main():
    from safetensors.torch import load_file
    return load_file(str(DATA))


@pytest.fixture(scope="module")
def now():
    return build()


@pytest.mark.parametrize("key,cfg", [(k, c) for k, _, c, _ in cases()], ids=[k for k, *_ in cases()])
def test_same_stored_tensors_as_main(main, now, key, cfg):
    names = sorted(n for n in main if n.startswith(key + "."))
    assert names == sorted(n for n in now if n.startswith(key + "."))
    O = main[f"{key}.qweight"].shape[0]
    I = {"gauss24x352": 352, "laplace20x200": 200}[key.split("-")[0]]
    if cfg.rounding == "nearest":
        for n in names:
            assert torch.equal(now[n], main[n]), n
        return
    # GPTQ: the calibration (scales, offsets, curvature) is exact; codes agree but for ties
    for n in names:
        if not n.endswith(".qweight"):
            assert torch.equal(now[n], main[n]), n
    c_now = packing.unpack(now[f"{key}.qweight"], cfg.bits, I)
    c_main = packing.unpack(main[f"{key}.qweight"], cfg.bits, I)
    assert (c_now == c_main).float().mean() >= 0.999, (c_now != c_main).sum()
    assert c_now.shape == (O, I)


def test_chunked_rows_give_the_same_codes(monkeypatch):
    # row chunks of 3 rows (the last one ragged) against one chunk
    w = torch.randn(16, 352, generator=torch.Generator().manual_seed(3)) * 0.02
    for cfg in (WeightConfig("qins", 4, 64), WeightConfig("int-asym", 8, 64),
                WeightConfig("qins", 4, 64, curvature="channel")):
        whole = QuantizedWeight.from_float(w, cfg)
        monkeypatch.setattr(calibrate, "CHUNK_ELEMENTS", 3 * 352)
        chunked = QuantizedWeight.from_float(w, cfg)
        monkeypatch.undo()
        for k, t in whole.tensors().items():
            assert torch.equal(t, chunked.tensors()[k]), (cfg.label, k)


def test_scale_overflow_is_still_an_error():
    w = torch.zeros(4, 64)
    w[1, 5] = -7e4                        # fp16 max is 65504; the int-asym offset is the min
    for fmt in ("qins", "int-sym", "int-asym"):
        with pytest.raises(ValueError, match="float16 scale range"):
            QuantizedWeight.from_float(w, WeightConfig(fmt, 4, 32))
