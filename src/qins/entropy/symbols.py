"""Tensors <-> uint8 symbol streams, the input of the coders (coders.py).

    transform   tensor                      symbols                       alphabet
    codes       (R, W) int32 packed b-bit   (R * N_pad,) one code a byte  2^b
                codes (codec/packing.py)    row-major; N_pad = 32 W / b
    shuffle     any float tensor, itemsize  byte planes one after the     256
                k (fp32, fp16, bf16)        other: byte 0 of every value,
                                            then byte 1, ... (little-endian)
    bytes       anything else               the tensor's bytes            256

`codes` keeps the padding codes of each row (zeros by construction), so unpack and pack are
exact inverses of every bit of the packed words without knowing the unpadded length; numpy
only, one byte of a plane of width w holds 8/w consecutive codes, low bits first (the same
bits as codec/packing.py's 32-bit words on a little-endian host).
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from ..codec.packing import planes

if sys.byteorder != "little":                      # pragma: no cover
    raise ImportError("qins.entropy reads packed words as little-endian bytes")

TRANSFORMS = ("codes", "shuffle", "bytes")


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """(nbytes,) uint8 view of a CPU tensor's data (contiguous copy if needed)."""
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return np.zeros(0, dtype=np.uint8)
    return t.reshape(-1).view(torch.uint8).numpy()


def unpack_codes(words: np.ndarray, bits: int) -> np.ndarray:
    """(R, W) int32 packed rows -> (R, 32 W / bits) uint8 codes, padding codes included."""
    widths = planes(bits)
    R, W = words.shape
    if (W * 32) % bits:
        raise ValueError(f"{W} words per row do not hold whole {bits}-bit codes")
    n_pad = W * 32 // bits
    b = np.ascontiguousarray(words).view(np.uint8).reshape(R, 4 * W)
    codes = np.zeros((R, n_pad), dtype=np.uint8)
    start, shift = 0, 0
    for w in widths:
        nb = n_pad * w // 8                             # bytes of this plane per row
        plane = b[:, start:start + nb]
        if w == 8:
            part = plane
        else:
            per = 8 // w
            lanes = (np.arange(per, dtype=np.uint8) * w)
            part = ((plane[:, :, None] >> lanes) & ((1 << w) - 1)).reshape(R, n_pad)
        codes |= (part << shift).astype(np.uint8)
        start += nb
        shift += w
    return codes


# lanes of one plane byte gathered from `per` consecutive code bytes read as one integer:
# mask each code byte to w bits, then fold the bytes together (x | x >> (8 - w) ...)
_GATHER = {2: (np.uint16, 0x0F0F, ((4, 0x00FF),)),
           4: (np.uint32, 0x03030303, ((6, 0x000F000F), (12, 0xFF))),
           8: (np.uint64, 0x0101010101010101, ((7, 0x0003000300030003), (14, 0x0000000F0000000F), (28, 0xFF)))}


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """(R, N_pad) uint8 codes (N_pad a multiple of 32) -> (R, W) int32, inverse of unpack_codes."""
    widths = planes(bits)
    R, n_pad = codes.shape
    if n_pad % 32:
        raise ValueError(f"rows of {n_pad} codes are not padded to a multiple of 32")
    codes = np.ascontiguousarray(codes)
    out = []
    shift = 0
    for w in widths:
        if w == 8:
            out.append(codes)
        elif w == 1:                                            # numpy's bit packer: 8 codes a byte
            bit = (codes >> np.uint8(shift)) & np.uint8(1) if shift else codes & np.uint8(1)
            out.append(np.packbits(bit, axis=1, bitorder="little"))
        else:
            per = 8 // w
            kind, mask, folds = _GATHER[per]
            x = codes.view(kind)                                # (R, n_pad / per)
            x = (x >> shift) & kind(mask) if shift else x & kind(mask)
            for sh, m in folds:
                x = (x | (x >> kind(sh))) & kind(m)
            out.append(x.astype(np.uint8))
        shift += w
    b = np.concatenate(out, axis=1) if len(out) > 1 else out[0]
    return np.ascontiguousarray(b).view(np.int32)


def to_symbols(t: torch.Tensor, transform: str, bits: int | None = None) -> tuple[np.ndarray, int]:
    """A tensor -> ((n,) uint8 symbols, alphabet) under `transform`."""
    if transform == "codes":
        if t.dtype != torch.int32 or t.dim() != 2:
            raise ValueError(f"codes transform needs a 2-D int32 packed tensor, got {t.dtype} {tuple(t.shape)}")
        return unpack_codes(t.detach().cpu().contiguous().numpy(), bits).reshape(-1), 1 << bits
    raw = tensor_bytes(t)
    if transform == "shuffle":
        k = t.element_size()
        return np.ascontiguousarray(raw.reshape(-1, k).T).reshape(-1), 256
    if transform == "bytes":
        return raw, 256
    raise ValueError(f"unknown transform {transform!r}; known: {TRANSFORMS}")


def from_symbols(symbols: np.ndarray, transform: str, shape: tuple[int, ...], dtype: torch.dtype,
                 bits: int | None = None) -> torch.Tensor:
    """Inverse of to_symbols: symbols -> a CPU tensor of `shape` and `dtype`."""
    numel = int(np.prod(shape, dtype=np.int64))
    if transform == "codes":
        R, W = shape
        codes = symbols.reshape(R, W * 32 // bits)
        return torch.from_numpy(pack_codes(codes, bits).reshape(R, W))
    if transform == "shuffle":
        k = torch.empty(0, dtype=dtype).element_size()
        raw = np.ascontiguousarray(symbols.reshape(k, numel).T).reshape(-1)
    elif transform == "bytes":
        raw = symbols
    else:
        raise ValueError(f"unknown transform {transform!r}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(raw.copy() if not raw.flags.writeable else raw).view(dtype).reshape(shape)


def choose_transform(name: str, t: torch.Tensor, bits_of: dict[str, int]) -> tuple[str, int | None]:
    """The transform of a saved tensor: packed codes of a planned module, shuffled floats, bytes.

    The codes' symbol stream is what the ANS coder models (alphabet 2^bits); zstd joins 2-bit
    codes four a byte and 4-bit codes two a byte (coders._per_byte), which is the packed
    layout itself, so for 2/4/8 bits the archive hands zstd the stored bytes (archive.py)."""
    module, _, leaf = name.rpartition(".")
    if leaf == "qweight" and module in bits_of and t.dtype == torch.int32 and t.dim() == 2 \
            and (t.shape[1] * 32) % bits_of[module] == 0:
        return "codes", bits_of[module]
    if t.is_floating_point() and t.element_size() > 1:
        return "shuffle", None
    return "bytes", None
