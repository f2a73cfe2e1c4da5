"""Kernel dispatch: one entry point per operation; a torch reference behind every kernel.

The reference path (pure PyTorch, any device) is the only one so far; fused Triton kernels
register here later. `QINS_KERNELS=reference` forces the reference path.
"""
from .reference import dequantize, qlinear

__all__ = ["dequantize", "qlinear"]
