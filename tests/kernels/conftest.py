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
