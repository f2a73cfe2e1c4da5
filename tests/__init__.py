"""Tests. A package, so its sub-packages import as tests.<name> (tests/kernels must not shadow
the `kernels` distribution that transformers >= 5.25 imports)."""
