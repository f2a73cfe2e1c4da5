"""Atomic writes: a file or a directory appears complete or not at all.

A leaf utility below every layer (imports nothing of qins). Every file qins writes (saved
models, key plans, reports, JSON) goes through here.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    """The process's umask (read by setting it and putting it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike):
    """A binary file to stream into; on a clean exit it is fsynced and renamed to `path`, on
    an exception removed, so `path` holds the previous file (or none). Parents are created.
    The file gets the mode a plain open would give it (the replaced file's, else 0o666 less the
    umask), not the temporary file's 0o600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary sibling and os.replace; an interrupted
    write leaves the previous file (or none) in place. Parent folders are created."""
    with atomic_open(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def temp_dir_beside(path: str | os.PathLike) -> Path:
    """A fresh temporary directory next to `path` (same file system, so a rename is atomic); its
    mode becomes a plain mkdir's when replace_dir moves it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))


def replace_dir(new: Path, dest: Path) -> None:
    """Move a complete directory `new` to `dest`; an existing `dest` is removed only after the
    swap, and put back if the swap fails. Everything in `new` first gets the modes a plain open
    and mkdir give (0o666 / 0o777 less the umask): safetensors and mkstemp write 0o600."""
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is not a directory")
    mask = _umask()
    for root, dirs, files in os.walk(new):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)
    os.chmod(new, 0o777 & ~mask)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    try:
        os.replace(new, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)                      # put the previous save back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
