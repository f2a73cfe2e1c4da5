"""The nvcc-built CUDA kernel libraries (kernels/_nvcc.py), checked where there is only a
compiler: each compiles for Hopper, lands atomically in the cache, and reads the same argument
block as its ctypes structure (an edit that loses a field on one side fails here)."""
import ctypes

import pytest

from qins.kernels import _nvcc, cuda_kv, cuda_qlinear


@pytest.mark.skipif(_nvcc.nvcc() is None, reason="needs nvcc")
@pytest.mark.parametrize("module,abi", [(cuda_kv, "qins_kv_abi"), (cuda_qlinear, "qins_qlinear_abi")],
                         ids=["kv_decode", "qlinear_mma"])
def test_library_builds_and_its_argument_block_matches(module, abi, tmp_path, monkeypatch):
    monkeypatch.setenv("QINS_CACHE", str(tmp_path))
    module._library.cache_clear()
    try:
        lib = module._library("90")                           # raises when the ABI check fails
        assert getattr(lib, abi)() == ctypes.sizeof(module._Args)
        assert [p.name for p in (tmp_path / "cuda").iterdir()] == [p.name for p in (tmp_path / "cuda").glob("*.so")]
    finally:
        module._library.cache_clear()
