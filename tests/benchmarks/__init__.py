"""Smoke runs of the scripts under benchmarks/ on the CPU."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

GPU_SCRIPTS = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"


def load_script(path: Path, name: str) -> ModuleType:
    """Import a benchmark script by its path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
