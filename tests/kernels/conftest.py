"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter when there is no
GPU (TRITON_INTERPRET must be set before triton compiles anything), and on the GPU as they are."""
import importlib.util
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if importlib.util.find_spec("triton") is not None and os.environ["TRITON_INTERPRET"] not in ("", "0"):
        # Triton decides at decoration whether a @triton.jit function runs in the interpreter:
        # define every kernel now, while TRITON_INTERPRET is on, so that a test that turns it off
        # for a while (test_dispatch) cannot be the first to import them (seen under xdist:
        # every later kernel test in that worker failed with "Cannot call @triton.jit'd outside
        # of the scope of a kernel")
        import qins.kernels.triton_kmajor  # noqa: F401
        import qins.kernels.triton_kv  # noqa: F401
        import qins.kernels.triton_qlinear  # noqa: F401

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton is not installed (make test installs it)")
DEVICE = "cuda" if CUDA else "cpu"
