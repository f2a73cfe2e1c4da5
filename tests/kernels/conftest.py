"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter when there is no
GPU (TRITON_INTERPRET must be set before triton compiles anything), and on the GPU as they are."""
import importlib.util
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton is not installed (make test installs it)")
DEVICE = "cuda" if CUDA else "cpu"


KERNEL_MODULES = ("qins.kernels.triton_qlinear", "qins.kernels.triton_kmajor", "qins.kernels.triton_kv")


@pytest.fixture(autouse=True)
def _interpreted_kernels():
    """Triton decides at decoration whether a @triton.jit function runs in the interpreter. A
    fresh-clone CI run (xdist) had every interpreter kernel test of one worker fail with "Cannot
    call @triton.jit'd outside of the scope of a kernel": a kernel module had been imported there
    while TRITON_INTERPRET was off. Before each test here, a kernel module defined that way while
    the interpreter is on is imported again (its functions then run in the interpreter)."""
    if CUDA or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        yield
        return
    import importlib
    import sys
    for name in KERNEL_MODULES:
        mod = sys.modules.get(name)
        if mod is not None and any(type(v).__name__ == "JITFunction" for v in vars(mod).values()):
            importlib.reload(mod)
    yield
