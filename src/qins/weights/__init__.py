"""Quantized modules, the quantize verb, calibration statistics and save/load."""
from .linear import QINSEmbedding, QINSLinear
from .quantize import decoded_weights, quantize

__all__ = ["QINSLinear", "QINSEmbedding", "quantize", "decoded_weights"]
