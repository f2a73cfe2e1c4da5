"""Building the CUDA sources in csrc/ into shared libraries with nvcc (no PyTorch headers: a few
seconds), cached per (source, flags, GPU architecture) under $QINS_CACHE or ~/.cache/qins and
written atomically; the callers load them with ctypes and launch on the current stream, so CUDA
graphs capture the kernels.

    nvcc()                 the nvcc path, or None
    build(source, arch)    the cached library's path, built on first call; raises on failure
    arch(device)           "90" for an sm_90 device
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

CSRC = Path(__file__).with_name("csrc")


def nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cache_dir() -> Path:
    return Path(os.environ.get("QINS_CACHE") or Path.home() / ".cache" / "qins") / "cuda"


def build(source: Path, arch: str) -> Path:
    """The shared library of `source` for sm_`arch`, compiled once and cached; raises RuntimeError
    when nvcc is missing or fails."""
    exe = nvcc()
    if exe is None:
        raise RuntimeError("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    flags = ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", f"-arch=sm_{arch}"]
    digest = hashlib.sha256(source.read_bytes() + " ".join(flags).encode()).hexdigest()[:12]
    path = cache_dir() / f"{source.stem}_{digest}_sm{arch}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        run = subprocess.run([exe, *flags, "-o", tmp, str(source)], capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"nvcc failed on {source.name}: {run.stderr.strip()[-2000:]}")
        os.replace(tmp, path)                  # atomic: a reader never sees half a library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def arch(device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}"
