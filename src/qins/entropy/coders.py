"""Entropy coders for uint8 symbol streams: raw, zstd (Huffman/FSE) and ANS (constriction).

Each coder turns a 1-D uint8 array of `n` symbols from an alphabet of `alphabet` values into
one self-contained blob (its tables included, so a blob's length is the whole cost) and
back, bit-exact. The stream is cut into chunks of CHUNK symbols, coded independently, so
memory stays bounded and a large tensor can be decoded in pieces.

Blob layouts (little-endian):

    raw    the symbols themselves (n bytes)
    zstd   u32 chunks | u32 length[chunks] | zstd frame[chunks]
           each frame holds its own Huffman/FSE tables (zstd's literal and sequence stages)
    ans    u32 count[alphabet] | u32 chunks | u32 words[chunks] | u32 word[...] per chunk
           count: the order-0 histogram; encoder and decoder build the same
           constriction Categorical (24-bit fixed point, perfect=False) from it

`zstandard` and `constriction` are imported lazily (STYLE 7). A blob that does not decode to
exactly `n` symbols raises CoderError.
"""
from __future__ import annotations

import struct

import numpy as np

from .stats import histogram

CODECS = ("raw", "zstd", "ans")
CHUNK = 1 << 22                       # symbols per independently coded chunk (4 MiB of uint8)
ZSTD_LEVEL = 1                        # codes: level 1 is within 0.5% of H0 on the default model,
                                      # higher levels' LZ matches only add cost (entropy_coders.md)
ZSTD_LEVEL_FLOAT = 19                 # shuffled float bytes: matches pay (norms -7% vs level 1)


def level_for(transform: str, nbytes: int) -> int:
    """zstd level by what the symbols are: codes 1; float/byte tensors 19 (3 above 4 MiB)."""
    if transform == "codes":
        return ZSTD_LEVEL
    return ZSTD_LEVEL_FLOAT if nbytes <= 1 << 22 else 3


class CoderError(ValueError):
    """A blob that is not a valid encoding of the stream it is said to hold."""


def _zstd():
    try:
        import zstandard
    except ImportError as e:          # pragma: no cover - a declared dependency
        raise ImportError("qins.entropy needs zstandard: pip install zstandard") from e
    return zstandard


def _constriction():
    try:
        import constriction
    except ImportError as e:          # pragma: no cover
        raise ImportError("qins.entropy's ANS coder needs constriction: pip install constriction") from e
    return constriction


def _chunks(n: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + CHUNK)) for s in range(0, n, CHUNK)] or [(0, 0)]


def encode(symbols: np.ndarray, codec: str, alphabet: int = 256, level: int = ZSTD_LEVEL,
           counts: np.ndarray | None = None) -> bytes:
    """1-D uint8 symbols (< alphabet) -> blob of `codec`. ANS with `counts`: coded with that
    shared table (e.g. one per layer and plane of a KV cache), which the blob then omits;
    decode needs the same counts."""
    if symbols.dtype != np.uint8 or symbols.ndim != 1:
        raise TypeError(f"encode expects a 1-D uint8 array, got {symbols.dtype} {symbols.shape}")
    if not 2 <= alphabet <= 256:
        raise ValueError(f"alphabet must be in 2..256, got {alphabet}")
    if codec == "raw":
        return symbols.tobytes()
    if codec == "zstd":
        cctx = _zstd().ZstdCompressor(level=level)
        per = _per_byte(alphabet)
        frames = [cctx.compress(_join(symbols[s:e], per).tobytes()) for s, e in _chunks(symbols.size)]
        head = struct.pack(f"<I{len(frames)}I", len(frames), *[len(f) for f in frames])
        return head + b"".join(frames)
    if codec == "ans":
        shared = counts is not None
        if shared:
            counts = _shared_counts(counts, alphabet)
        else:
            counts = histogram(symbols, alphabet)
        model = _ans_model(counts)
        stack = _constriction().stream.stack
        parts = []
        for s, e in _chunks(symbols.size):
            coder = stack.AnsCoder()
            coder.encode_reverse(symbols[s:e].astype(np.int32), model)
            parts.append(np.ascontiguousarray(coder.get_compressed(), dtype="<u4"))
        table = b"" if shared else counts.astype("<u4").tobytes()
        head = table + struct.pack(f"<I{len(parts)}I", len(parts), *[p.size for p in parts])
        return head + b"".join(p.tobytes() for p in parts)
    raise ValueError(f"unknown codec {codec!r}; known: {CODECS}")


def decode(blob: bytes | memoryview, codec: str, n: int, alphabet: int = 256,
           counts: np.ndarray | None = None) -> np.ndarray:
    """Blob of `codec` -> (n,) uint8 symbols; CoderError when it does not hold exactly n.
    `counts`: the shared ANS table the blob was encoded with (see encode)."""
    blob = memoryview(blob)
    if codec == "raw":
        if len(blob) != n:
            raise CoderError(f"raw blob has {len(blob)} bytes, expected {n}")
        return np.frombuffer(blob, dtype=np.uint8).copy()
    chunks = _chunks(n)
    if codec == "zstd":
        lengths, pos = _lengths(blob, len(chunks), 0)
        per = _per_byte(alphabet)
        zstd = _zstd()
        dctx = zstd.ZstdDecompressor()
        out = np.empty(n, dtype=np.uint8)
        for (s, e), ln in zip(chunks, lengths):
            nb = -(-(e - s) // per)                      # bytes of this chunk's stream
            try:
                part = dctx.decompress(blob[pos:pos + ln], max_output_size=nb)
            except zstd.ZstdError as err:
                raise CoderError(f"zstd chunk at symbol {s}: {err}") from err
            if len(part) != nb:
                raise CoderError(f"zstd chunk at symbol {s} holds {len(part)} bytes, expected {nb}")
            sym = _split(np.frombuffer(part, dtype=np.uint8), per)
            if sym[e - s:].any():
                raise CoderError(f"zstd chunk at symbol {s} has nonzero padding")
            out[s:e] = sym[:e - s]
            pos += ln
        if pos != len(blob):
            raise CoderError(f"zstd blob has {len(blob) - pos} trailing bytes")
        return out
    if codec == "ans":
        if counts is not None:
            head = 0
            counts = _shared_counts(counts, alphabet)
        else:
            head = 4 * alphabet
            if len(blob) < head:
                raise CoderError(f"ans blob of {len(blob)} bytes is shorter than its table ({head})")
            counts = np.frombuffer(blob[:head], dtype="<u4").astype(np.int64)
            if int(counts.sum()) != n:
                raise CoderError(f"ans table counts {int(counts.sum())} symbols, expected {n}")
        lengths, pos = _lengths(blob, len(chunks), head)
        model = _ans_model(counts) if n else None
        stack = _constriction().stream.stack
        out = np.empty(n, dtype=np.uint8)
        for (s, e), words in zip(chunks, lengths):
            end = pos + 4 * words
            if end > len(blob):
                raise CoderError(f"ans chunk at symbol {s} runs past the blob")
            if e > s:
                coder = stack.AnsCoder(np.frombuffer(blob[pos:end], dtype="<u4").astype(np.uint32))
                try:
                    sym = coder.decode(model, e - s)
                except BaseException as err:      # a Rust panic is a BaseException
                    raise CoderError(f"ans chunk at symbol {s}: {err}") from None
                if not coder.is_empty():
                    raise CoderError(f"ans chunk at symbol {s} has unread words")
                out[s:e] = sym
            pos = end
        if pos != len(blob):
            raise CoderError(f"ans blob has {len(blob) - pos} trailing bytes")
        return out
    raise ValueError(f"unknown codec {codec!r}; known: {CODECS}")


def _per_byte(alphabet: int) -> int:
    """Symbols joined into one byte before zstd: 4 of <= 4 values, 2 of <= 16, else 1.
    zstd's Huffman stage codes bytes, and Huffman loses up to a bit per coded symbol: on
    4-bit codes one code a byte cost 2.7% over the entropy, pairs 1.1% (Gaussian test data,
    benchmarks/results/entropy_coders.md)."""
    return 4 if alphabet <= 4 else 2 if alphabet <= 16 else 1


def _join(sym: np.ndarray, per: int) -> np.ndarray:
    if per == 1:
        return sym
    pad = -sym.size % per
    if pad:
        sym = np.concatenate([sym, np.zeros(pad, dtype=np.uint8)])
    sym = sym.reshape(-1, per)
    w = 8 // per
    out = sym[:, 0].copy()
    for i in range(1, per):
        out |= sym[:, i] << (i * w)
    return out


def _split(b: np.ndarray, per: int) -> np.ndarray:
    if per == 1:
        return b
    w = 8 // per
    lanes = np.arange(per, dtype=np.uint8) * w
    return ((b[:, None] >> lanes) & ((1 << w) - 1)).reshape(-1)


def _lengths(blob: memoryview, expected: int, pos: int) -> tuple[list[int], int]:
    if len(blob) < pos + 4:
        raise CoderError("blob too short for its chunk count")
    (k,) = struct.unpack_from("<I", blob, pos)
    if k != expected:
        raise CoderError(f"blob has {k} chunks, expected {expected}")
    if len(blob) < pos + 4 + 4 * k:
        raise CoderError("blob too short for its chunk table")
    return list(struct.unpack_from(f"<{k}I", blob, pos + 4)), pos + 4 + 4 * k


def _shared_counts(counts, alphabet: int) -> np.ndarray:
    c = np.asarray(counts, dtype=np.int64).reshape(-1)
    if c.size != alphabet or (c < 0).any():
        raise ValueError(f"a shared ANS table needs {alphabet} non-negative counts, got {c.size}")
    return c


def _ans_model(counts: np.ndarray):
    model = _constriction().stream.model
    total = counts.sum()
    probs = counts / total if total else np.full(counts.shape, 1.0 / counts.size)
    # every symbol keeps a nonzero probability (constriction guarantees it), so a table
    # computed from the counts stays valid whatever the symbols
    return model.Categorical(probs.astype(np.float64), perfect=False)


def table_bytes(codec: str, alphabet: int, n: int) -> int:
    """Bytes of a blob that are not payload: the stored table and the chunk index."""
    k = len(_chunks(n))
    if codec == "raw":
        return 0
    if codec == "zstd":
        return 4 + 4 * k                    # zstd's own Huffman tables sit inside its frames
    if codec == "ans":
        return 4 * alphabet + 4 + 4 * k
    raise ValueError(f"unknown codec {codec!r}")
