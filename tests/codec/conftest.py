"""Shared settings for the codec tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    # The codec tests quantize small tensors (<= 64 x 576): threads buy nothing, and on a busy
    # 2-core machine OpenMP spin-waits made one 4-bit qins fit of (64, 576) take 7.5 s with
    # 2 threads against 0.17 s with 1 (measured while another process held a core).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
