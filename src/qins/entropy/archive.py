"""The .qins archive: a saved directory in one file, each tensor entropy-coded per the policy.

Layout (little-endian; payloads start on 64-byte boundaries):

    offset 0        header   8s magic b"QINSARCH" | u32 version | u32 flags (0)
    offset 16 ...   payload of record 0 | pad | payload of record 1 | ... (coders.py blobs)
    index_offset    index    UTF-8 JSON (below)
    end - 32        footer   u64 index_offset | u64 index_length | u64 xxh3_64(index) | 8s b"QINSEND\\0"

    index = {"format": "qins-archive", "version": 1, "qins_version": str,
             "tensors": [{"name", "dtype", "shape", "transform", "bits", "codec", "alphabet",
                          "n", "offset", "length", "raw_bytes", "xxh3": payload hash,
                          "raw_xxh3": hash of the decoded tensor bytes}, ...],
             "files":   [{"name", "offset", "length", "raw_bytes", "xxh3", "raw_xxh3"}, ...]}

`files` are the directory's other files (config.json, qins.json, tokenizer files), zstd-coded.
The writer streams: one tensor is read, coded and written at a time (memory: one tensor and
its blob), the index goes last, and the file replaces its destination atomically. The reader
reads the footer, then the index, then any one record (random access). Every payload's hash
is checked before it is decoded, so a corrupt byte is reported by tensor name and never
reaches a decoder; the decoded bytes are checked against raw_xxh3 as well.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .._files import atomic_open
from .._version import __version__
from . import coders
from .policy import DEFAULT_THRESHOLD, bits_of_plan, choose
from .symbols import TRANSFORMS, choose_transform, from_symbols, tensor_bytes, to_symbols

MAGIC = b"QINSARCH"
END = b"QINSEND\0"
VERSION = 1
HEADER = struct.Struct("<8sII")
FOOTER = struct.Struct("<QQQ8s")
ALIGN = 64
DTYPES = {str(d).replace("torch.", ""): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8,
    torch.int16, torch.int32, torch.int64, torch.bool)}


class ArchiveError(ValueError):
    """A .qins file that is truncated, corrupt, of another version, or not an archive."""


def _xxh3(data) -> str:
    import xxhash
    return xxhash.xxh3_64_hexdigest(data)


# -- writing ---------------------------------------------------------------------------------
def pack(src: str | os.PathLike, out: str | os.PathLike, policy: dict | None = None,
         threshold: float = DEFAULT_THRESHOLD, progress=None) -> dict:
    """Write the saved directory `src` (qins.save) as the archive `out`, atomically.

    policy   {"tensors": {name: codec}} (policy.decide / `qins analyze`); None measures each
             tensor with every coder while packing and applies the same rule (threshold).
    Returns {"tensors": n, "raw_bytes", "archive_bytes", "codecs": {codec: count}}.
    """
    from safetensors import safe_open

    from ..weights.plan import read_plan
    from ..weights.serialization import WEIGHTS_NAME

    src, out = Path(src), Path(out)
    if not (src / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{src / WEIGHTS_NAME} is missing: not a directory written by qins.save")
    bits_of = bits_of_plan(read_plan(src)["modules"])
    chosen = (policy or {}).get("tensors", {})
    records, files, counts, raw_total = [], [], {}, 0
    with atomic_open(out) as f, safe_open(str(src / WEIGHTS_NAME), framework="pt") as st:
        f.write(HEADER.pack(MAGIC, VERSION, 0))
        names = list(st.keys())
        for name in (progress(names) if progress else names):
            t = st.get_tensor(name)
            rec, blob = _code_tensor(name, t, bits_of, chosen.get(name), threshold)
            rec.update(_write(f, blob))
            records.append(rec)
            counts[rec["codec"]] = counts.get(rec["codec"], 0) + 1
            raw_total += rec["raw_bytes"]
        for p in sorted(src.iterdir()):
            if p.is_file() and p.name != WEIGHTS_NAME and not p.name.startswith("."):
                data = p.read_bytes()
                blob = coders.encode(np.frombuffer(data, dtype=np.uint8), "zstd", level=19)
                rec = {"name": p.name, "raw_bytes": len(data), "raw_xxh3": _xxh3(data)}
                rec.update(_write(f, blob))
                files.append(rec)
        index = json.dumps({"format": "qins-archive", "version": VERSION, "qins_version": __version__,
                            "tensors": records, "files": files}, separators=(",", ":")).encode()
        at = f.tell()
        f.write(index)
        f.write(FOOTER.pack(at, len(index), int(_xxh3(index), 16), END))
    return {"tensors": len(records), "raw_bytes": raw_total, "archive_bytes": out.stat().st_size,
            "codecs": counts}


def _code_tensor(name, t, bits_of, codec, threshold):
    transform, bits = choose_transform(name, t, bits_of)
    rec, blob = code_tensor(t, transform, bits, codec, threshold)
    return {"name": name, **rec}, blob


def code_tensor(t: torch.Tensor, transform: str, bits: int | None, codec: str | None,
                threshold: float = DEFAULT_THRESHOLD) -> tuple[dict, bytes]:
    """(record, blob) of one tensor under `transform` ("codes" with `bits`, "shuffle", "bytes"):
    `codec` zstd / ans / raw, or None for the policy rule (the smaller coder where it saves at
    least `threshold`, else raw). Codes whose padding bits are not zero are kept as bytes, so
    `decode_tensor` always gives back every bit."""
    sym, alphabet = to_symbols(t, transform, bits)
    raw = tensor_bytes(t)
    if transform == "codes" and not torch.equal(
            from_symbols(sym, transform, tuple(t.shape), t.dtype, bits), t.contiguous()):
        transform, bits = "bytes", None             # nonzero padding bits: keep every bit as is
        sym, alphabet = to_symbols(t, transform)
    level = coders.level_for(transform, sym.size)
    # zstd joins 2/4/8-bit codes into bytes exactly as they are packed (coders._per_byte): give it
    # the stored bytes, and decoding needs no repacking
    direct = transform == "codes" and bits in (2, 4, 8)

    def encode(c):
        if direct and c == "zstd":
            return coders.encode(raw, c, 256, level=level)
        return coders.encode(sym, c, alphabet, level=level)
    if codec is None:                               # measure every coder, apply the policy rule
        blobs = {c: encode(c) for c in ("zstd", "ans")}
        codec = choose({c: len(b) for c, b in blobs.items()}, raw.size, threshold)
        blob = raw.tobytes() if codec == "raw" else blobs[codec]
    else:
        blob = raw.tobytes() if codec == "raw" else encode(codec)
    if codec == "raw" or (direct and codec == "zstd"):   # the stored bytes, no transform
        transform, bits, alphabet, n = "bytes", None, 256, raw.size
    else:
        n = sym.size
    rec = {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
           "transform": transform, "bits": bits, "codec": codec, "alphabet": alphabet, "n": int(n),
           "raw_bytes": int(raw.size), "raw_xxh3": _xxh3(raw)}
    return rec, blob


def coded_nbytes(tensors: dict[str, torch.Tensor], bits_of: dict[str, int],
                 threshold: float = DEFAULT_THRESHOLD) -> int:
    """Payload bytes `pack` (no policy, `threshold`) writes for these saved tensors, by name
    as in model.safetensors: each one coded by `code_tensor`, the blobs' lengths summed (the
    index entries and the 64-byte alignment are the archive's, not the tensors')."""
    return sum(len(_code_tensor(n, t, bits_of, None, threshold)[1]) for n, t in tensors.items())


class WeightCodedSize:
    """Bytes of one quantized weight in a .qins archive, as a bit allocator's cost:
    `WeightCodedSize(threshold)(qw, name)` codes `qw.stored_tensors(name)` (packed codes,
    log8 scale codes and row references, curvature) as `pack` would; weights/allocate.py's
    `sensitivities(size=...)` takes it."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD):
        self.threshold = threshold

    def __call__(self, qw, name: str) -> int:
        stored = {f"{name}.{k}": v for k, v in qw.stored_tensors(name).items()}
        return coded_nbytes(stored, {name: qw.config.bits}, self.threshold)

    def __repr__(self) -> str:
        return f"archive-coded (threshold {self.threshold:g})"


def decode_tensor(rec: dict, blob) -> torch.Tensor:
    """Inverse of `code_tensor`: a CPU tensor; raises coders.CoderError where the blob does not
    decode and ValueError where it decodes to other bytes than were coded."""
    dtype = DTYPES[rec["dtype"]]
    if rec["codec"] == "raw":
        t = from_symbols(np.frombuffer(blob, dtype=np.uint8).copy(), "bytes", tuple(rec["shape"]), dtype)
    else:
        sym = coders.decode(blob, rec["codec"], rec["n"], rec["alphabet"])
        t = from_symbols(sym, rec["transform"], tuple(rec["shape"]), dtype, rec.get("bits"))
    if _xxh3(tensor_bytes(t)) != rec["raw_xxh3"]:
        raise ValueError("decodes to other bytes than were stored (checksum mismatch)")
    return t


def _write(f, blob: bytes) -> dict:
    pad = -f.tell() % ALIGN
    f.write(b"\0" * pad)
    at = f.tell()
    f.write(blob)
    return {"offset": at, "length": len(blob), "xxh3": _xxh3(blob)}


# -- reading ---------------------------------------------------------------------------------
class Archive:
    """Random access to a .qins file: `names()`, `tensor(name)`, `tensors(threads)`, `file(name)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self._read_index()
        except BaseException:
            os.close(self._fd)
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _err(self, what: str) -> ArchiveError:
        return ArchiveError(f"{self.path}: {what}")

    def _pread(self, n: int, at: int) -> bytes:
        data = os.pread(self._fd, n, at)
        if len(data) != n:
            raise self._err(f"truncated: wanted {n} bytes at offset {at}, file has {self.size}")
        return data

    def _read_index(self) -> None:
        self.size = os.fstat(self._fd).st_size
        if self.size < HEADER.size + FOOTER.size:
            raise self._err(f"truncated or not a qins archive ({self.size} bytes)")
        magic, version, flags = HEADER.unpack(self._pread(HEADER.size, 0))
        if magic != MAGIC:
            raise self._err("not a qins archive (bad magic in the header)")
        if version != VERSION:
            raise self._err(f"archive format version {version}; this qins reads version {VERSION}"
                            + (": upgrade qins" if version > VERSION else ""))
        if flags != 0:
            raise self._err(f"header field 'flags' is {flags}, expected 0")
        at, length, digest, end = FOOTER.unpack(self._pread(FOOTER.size, self.size - FOOTER.size))
        if end != END:
            raise self._err("truncated or corrupt: no end marker in the footer")
        if not HEADER.size <= at <= self.size - FOOTER.size or at + length != self.size - FOOTER.size:
            raise self._err(f"footer field 'index_offset'/'index_length' ({at}, {length}) do not fit the file")
        raw = self._pread(length, at)
        if int(_xxh3(raw), 16) != digest:
            raise self._err("the index is corrupt (checksum mismatch)")
        try:
            index = json.loads(raw)
        except ValueError as e:
            raise self._err(f"the index is not valid JSON ({e})") from None
        if not isinstance(index, dict) or index.get("format") != "qins-archive":
            raise self._err("index field 'format' is not 'qins-archive'")
        if index.get("version") != VERSION:
            raise self._err(f"index field 'version' is {index.get('version')!r}, expected {VERSION}")
        self.index_offset = at
        self.records = {}
        for r in _list(index, "tensors", self._err):
            self._check_tensor(r)
            self.records[r["name"]] = r
        self.file_records = {}
        for r in _list(index, "files", self._err):
            self._check_span(r, "file")
            self.file_records[r["name"]] = r

    def _check_span(self, r, kind: str) -> None:
        if not isinstance(r, dict) or not isinstance(r.get("name"), str):
            raise self._err(f"a {kind} record has no name")
        for k in ("offset", "length", "raw_bytes"):
            v = r.get(k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise self._err(f"{kind} {r['name']!r}: field {k!r} is {v!r}, expected an integer >= 0")
        for k in ("xxh3", "raw_xxh3"):
            if not isinstance(r.get(k), str):
                raise self._err(f"{kind} {r['name']!r}: field {k!r} is missing")
        if r["offset"] < HEADER.size or r["offset"] + r["length"] > self.index_offset:
            raise self._err(f"{kind} {r['name']!r}: fields 'offset'/'length' point outside the payload area")

    def _check_tensor(self, r) -> None:
        self._check_span(r, "tensor")
        name = r["name"]

        def bad(field, want):
            return self._err(f"tensor {name!r}: field {field!r} is {r.get(field)!r}, expected {want}")
        if r.get("dtype") not in DTYPES:
            raise bad("dtype", f"one of {sorted(DTYPES)}")
        shape = r.get("shape")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise bad("shape", "a list of integers >= 0")
        itemsize = torch.empty(0, dtype=DTYPES[r["dtype"]]).element_size()
        if int(np.prod(shape, dtype=np.int64)) * itemsize != r["raw_bytes"]:
            raise bad("raw_bytes", "shape x itemsize")
        if r.get("codec") not in coders.CODECS:
            raise bad("codec", f"one of {coders.CODECS}")
        if r.get("transform") not in TRANSFORMS:
            raise bad("transform", f"one of {TRANSFORMS}")
        if r["transform"] == "codes":
            bits = r.get("bits")
            if bits not in (2, 3, 4, 5, 6, 8) or r["dtype"] != "int32" or len(shape) != 2 \
                    or (shape[1] * 32) % bits or r.get("alphabet") != 1 << bits:
                raise bad("bits", "a packed width matching the shape, dtype int32 and alphabet")
            n = shape[0] * shape[1] * 32 // bits
        else:
            if r["transform"] == "shuffle" and not DTYPES[r["dtype"]].is_floating_point:
                raise bad("transform", "'bytes' for a non-float dtype")
            if r.get("alphabet") != 256:
                raise bad("alphabet", 256)
            n = r["raw_bytes"]
        if r.get("n") != n:
            raise bad("n", n)

    # -- access ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.records)

    def _payload(self, r, kind: str) -> bytes:
        blob = self._pread(r["length"], r["offset"])
        if _xxh3(blob) != r["xxh3"]:
            raise self._err(f"{kind} {r['name']!r} is corrupt (payload checksum mismatch)")
        return blob

    def tensor(self, name: str) -> torch.Tensor:
        """Decode one tensor (reads only its record)."""
        if self._fd is None:
            raise self._err("archive is closed")
        r = self.records.get(name)
        if r is None:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        dtype = DTYPES[r["dtype"]]
        if r["codec"] == "raw":                     # read straight into the tensor's memory
            if r["length"] != r["n"]:
                raise self._err(f"tensor {name!r}: field 'length' is {r['length']}, expected {r['n']} for raw")
            buf = np.empty(r["length"], dtype=np.uint8)
            if r["length"] and os.preadv(self._fd, [buf], r["offset"]) != r["length"]:
                raise self._err(f"truncated: tensor {name!r} runs past the end of the file")
            if _xxh3(buf) != r["xxh3"]:
                raise self._err(f"tensor {name!r} is corrupt (payload checksum mismatch)")
            return from_symbols(buf, "bytes", tuple(r["shape"]), dtype)
        blob = self._payload(r, "tensor")
        try:
            return decode_tensor(r, blob)
        except coders.CoderError as e:
            raise self._err(f"tensor {name!r} does not decode ({e})") from None
        except ValueError as e:
            raise self._err(f"tensor {name!r} {e}") from None

    def tensors(self, threads: int | None = None) -> dict[str, torch.Tensor]:
        """Every tensor, decoded by `threads` threads (default: one per CPU)."""
        threads = threads or os.cpu_count() or 1
        names = sorted(self.records, key=lambda n: -self.records[n]["raw_bytes"])   # largest first
        if threads == 1:
            return {n: self.tensor(n) for n in self.names()}
        with ThreadPoolExecutor(threads) as pool:
            out = dict(zip(names, pool.map(self.tensor, names)))
        return {n: out[n] for n in self.names()}

    def file(self, name: str) -> bytes:
        r = self.file_records.get(name)
        if r is None:
            raise KeyError(f"{self.path}: no file {name!r}")
        blob = self._payload(r, "file")
        try:
            data = coders.decode(blob, "zstd", r["raw_bytes"]).tobytes()
        except coders.CoderError as e:
            raise self._err(f"file {name!r} does not decode ({e})") from None
        if _xxh3(data) != r["raw_xxh3"]:
            raise self._err(f"file {name!r} decodes to other bytes than were stored")
        return data

    def extract_files(self, dest: Path) -> None:
        for name in self.file_records:
            if "/" in name or "\\" in name or name in ("", ".", ".."):
                raise self._err(f"file record name {name!r} is not a plain file name")
            (dest / name).write_bytes(self.file(name))


def _list(index: dict, key: str, err) -> list:
    v = index.get(key)
    if not isinstance(v, list):
        raise err(f"index field {key!r} is missing or not a list")
    return v


def unpack(archive: str | os.PathLike, out: str | os.PathLike, threads: int | None = None) -> Path:
    """Write the archive back as a saved directory (qins.save's layout), atomically."""
    from safetensors.torch import save_file

    from .._files import replace_dir, temp_dir_beside
    from ..codec.config import FORMAT_VERSION
    from ..weights.serialization import WEIGHTS_NAME

    out = Path(out)
    with Archive(archive) as a:
        tensors = a.tensors(threads)
        tmp = temp_dir_beside(out)
        try:
            a.extract_files(tmp)
            save_file(tensors, str(tmp / WEIGHTS_NAME),
                      metadata={"format": "pt", "qins_format_version": str(FORMAT_VERSION)})
            replace_dir(tmp, out)
        except BaseException:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def load(archive: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32,
         threads: int | None = None, **placement):
    """qins.load of a .qins file: tensors decoded by a thread pool, then the model built as
    weights.serialization.load builds it (no temporary model.safetensors). `placement`:
    device_map / max_memory, as serialization.load takes them."""
    import shutil

    from ..weights.serialization import load as load_dir

    with Archive(archive) as a:
        tensors = a.tensors(threads)
        tmp = Path(tempfile.mkdtemp(prefix=".qins-archive-"))
        try:
            a.extract_files(tmp)
            return load_dir(tmp, device=device, dtype=dtype, state=tensors, **placement)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
