"""Building the CUDA sources in csrc/ into shared libraries with nvcc (no PyTorch headers: a few
seconds), cached per (source, flags, GPU architecture) under $QINS_CACHE or ~/.cache/qins and
written atomically; the callers load them with ctypes and launch on the current stream, so CUDA
graphs capture the kernels.

    nvcc()                 the nvcc path, or None
    build(source, arch)    the cached library's path, built on first call; raises on failure
    load(source, arch, entry, abi, args)
                           the library with its entry point typed and its argument block checked
    why_not(device, what, library)
                           None when `library(arch)` loads for `device`, else the reason (cached)
    launch(fn, args, device, what)
                           fn(&args, current stream of `device`) with `device` current; raises
                           on a CUDA error, else returns the entry's code (< 0: refused)
    arch(device)           "90" for an sm_90 device
"""
from __future__ import annotations

import ctypes
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


def load(source: Path, arch_: str, entry: str, abi: str, args: type) -> ctypes.CDLL:
    """The library of `source` with `entry(const Args*, stream) -> int` typed, after checking that
    its `abi()` (sizeof the C argument block) equals ctypes' `args` (an edit that loses a field
    on one side is caught here, not as a wrong answer)."""
    path = build(source, arch_)
    lib = ctypes.CDLL(str(path))
    fn = getattr(lib, entry)
    fn.argtypes = [ctypes.POINTER(args), ctypes.c_void_p]
    fn.restype = ctypes.c_int
    size = getattr(lib, abi)
    size.restype = ctypes.c_int
    if size() != ctypes.sizeof(args):
        raise RuntimeError(f"{path.name}: argument block of {size()} bytes, expected {ctypes.sizeof(args)}")
    return lib


_STATUS: dict[tuple, str | None] = {}


def why_not(device, what: str, library) -> str | None:
    """None when `library(arch)` (an mma.sync kernel) loads for `device`, else why not; the answer
    is kept per (library, arch), so a failed build is not retried on every call."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"{what} runs on CUDA devices, not {device}"
    a = arch(device)
    key = (library, a)
    if key not in _STATUS:
        if int(a) < 80:
            _STATUS[key] = f"sm_{a}: {what} needs mma.sync m16n8k16 (sm_80 or newer)"
        else:
            try:
                library(a)
                _STATUS[key] = None
            except (RuntimeError, OSError) as e:
                _STATUS[key] = f"{what} could not be built: {e}"
    return _STATUS[key]


def launch(fn, args: ctypes.Structure, device: torch.device, what: str) -> int:
    """Call a library entry on `device`'s current stream with `device` the current CUDA device
    (the runtime launches on the current device, which a tensor on another GPU does not set).
    The entries return 0, a negative code for a call they do not hold (the caller says why), or
    a CUDA error, raised here."""
    stream = ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)
    if device.index is None or device.index == torch.cuda.current_device():
        rc = fn(ctypes.byref(args), stream)
    else:
        with torch.cuda.device(device):
            rc = fn(ctypes.byref(args), stream)
    if rc > 0:
        raise RuntimeError(f"{what} failed to launch: CUDA error {rc}")
    return rc
