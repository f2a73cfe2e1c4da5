"""Peer weight quantizers (HQQ, bitsandbytes NF4) applied as fake quantization, for comparison.

Each `fake_quantize_*` function quantizes every selected nn.Linear weight with the peer's own
quantize function, dequantizes it with the peer's own dequantize function, and writes the
result back as a float weight. The model keeps the float model's modules and code path, with
the peer's rounding error in its weights: use it for quality (KL, perplexity, top-1) side by side
with qins, never for memory or speed, which the float weights do not show.

Stored bits per weight (`bpw`) are counted from the nbytes of the tensors the peer returns and
would store per layer, for the settings used:

    hqq       W_q    uint8  packed codes (4-bit: 2 per byte; 3-bit: 10 per int32 word,
                             groups padded to a multiple of 10; 5/6-bit: 1 per byte)
              scale  fp16   one per group  -- HQQLinear casts meta to its compute_dtype
              zero   fp16   one per group     (float16 by default) before storing
    bnb-nf4   codes  uint8  2 per byte
              absmax fp32   one per block  (double quant: uint8 per block, plus one fp32
                             absmax per 256 blocks and one fp32 offset per layer)

Per-layer lookup tables that are format constants (bnb's 16-entry NF4 code and 256-entry
double-quant code) and shape/dtype metadata are not counted.

The optional peers install without touching torch:

    pip install --no-deps "hqq==0.2.8.post1" "einops==0.8.2" "termcolor==3.3.0"
    pip install --no-deps "bitsandbytes==0.50.2"
"""
from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

# HQQLinear's default compute_dtype: the dtype its scale and zero are stored in
HQQ_META_DTYPE = torch.float16

def _import_hqq():
    try:
        from hqq.core.quantize import Quantizer, hqq_base_quant_config
    except Exception as exc:  # ImportError, or a broken install raising anything else
        raise ImportError(
            "the HQQ peer needs the 'hqq' package: pip install --no-deps hqq einops termcolor "
            f"(import failed: {exc})") from exc
    return Quantizer, hqq_base_quant_config


def _import_bnb():
    # bitsandbytes' CPU backend warns at import that it cannot fetch an optional gemv kernel
    # from the Hub; fake quantization uses only quantize_4bit/dequantize_4bit.
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnbf
    except Exception as exc:
        raise ImportError(
            "the bitsandbytes NF4 peer needs the 'bitsandbytes' package: "
            f"pip install --no-deps bitsandbytes (import failed: {exc})") from exc
    finally:
        log.setLevel(level)
    return bnbf


def available() -> dict[str, bool]:
    """{"hqq": bool, "bnb-nf4": bool}: whether each peer imports here."""
    out = {}
    for key, imp in (("hqq", _import_hqq), ("bnb-nf4", _import_bnb)):
        try:
            imp()
            out[key] = True
        except Exception:
            out[key] = False
    return out


def _matches(name: str, pattern: str) -> bool:
    # the same rule as qins.quantize's `skip`: exact name, fnmatch, or a bare name as a suffix
    return name == pattern or fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*.{pattern}")


def _targets(model: nn.Module, skip: Iterable[str]) -> list[tuple[str, nn.Linear]]:
    skip = [skip] if isinstance(skip, str) else list(skip or ())
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(_matches(n, p) for p in skip)]


def _apply(model: nn.Module, skip: Iterable[str], progress: bool, label: str,
           fake: Callable[[torch.Tensor], tuple[torch.Tensor, int]]) -> tuple[int, int]:
    """Replace each target weight by fake(weight) -> (dequantized, stored bytes).

    A weight shared between targets is quantized once. A weight also held by a module that is
    not a target (a tied lm_head whose skip was lifted shares the input embedding) is untied:
    the Linear gets a new Parameter, so the embedding keeps its float values (a later
    transformers `tie_weights()` would tie them again).
    Returns (quantized weights, stored bytes).
    """
    from tqdm.auto import tqdm

    targets = _targets(model, skip)
    target_ids = {id(m) for _, m in targets}
    # storages held by parameters other than the targets' weights
    others = {p.data_ptr() for mod in model.modules() for pn, p in mod.named_parameters(recurse=False)
              if not (id(mod) in target_ids and pn == "weight")}
    handled: dict[int, nn.Parameter | None] = {}  # original data_ptr -> new Parameter, None if in place
    n_weights = n_bytes = 0
    for name, mod in tqdm(targets, desc=f"fake-quantize {label}", disable=not progress, leave=False):
        w = mod.weight
        ptr = w.data_ptr()
        if ptr in handled:                      # shared with an earlier target: already done
            if handled[ptr] is not None:
                mod.weight = handled[ptr]
            continue
        with torch.no_grad():
            try:
                deq, stored = fake(w.detach())
            except Exception as exc:
                raise RuntimeError(f"{label} failed on {name} {tuple(w.shape)}: {exc}") from exc
            deq = deq.to(dtype=w.dtype, device=w.device).reshape(w.shape).contiguous()
            if ptr in others:
                handled[ptr] = nn.Parameter(deq, requires_grad=w.requires_grad)
                mod.weight = handled[ptr]
            else:
                w.data.copy_(deq)
                handled[ptr] = None
        n_weights += w.numel()
        n_bytes += stored
    return n_weights, n_bytes


def _report(label: str, bits, group_size, n_weights: int, n_bytes: int) -> dict:
    return {
        "label": label,
        "bits": bits,
        "group_size": group_size,
        "bpw": 8.0 * n_bytes / n_weights if n_weights else float("nan"),
        "quantized_weights": n_weights,
        "stored_bytes": n_bytes,
    }


def fake_quantize_hqq(model: nn.Module, bits: int = 4, group_size: int | None = 64,
                      skip: Iterable[str] = ("lm_head",), progress: bool = True) -> dict:
    """Fake-quantize `model`'s nn.Linear weights in place with HQQ; for quality measurement only.

    Settings are HQQ's own defaults for models (`hqq_base_quant_config`): asymmetric
    `bits`-bit codes, scale and zero per group of `group_size` consecutive input weights
    (axis=1; None = one group per output row), zero initialised rounded at 4 bits, then HQQ's
    proximal zero-point optimisation (20 iterations, early stop). Scale and zero are rounded
    to fp16 as HQQLinear stores them, and dequantized with `Quantizer.dequantize` in fp32.
    Weights are not replaced by quantized modules: see the module docstring.

    skip   module-name patterns left in float (exact name, fnmatch, or a bare name as a
           suffix); the default keeps lm_head (and so a tied input embedding) in float.
    Returns {"label", "bits", "group_size", "bpw", "quantized_weights", "stored_bytes"}.
    """
    Quantizer, base_config = _import_hqq()

    def fake(w: torch.Tensor) -> tuple[torch.Tensor, int]:
        g = w.shape[1] if group_size is None else group_size
        params = base_config(nbits=bits, group_size=g, axis=1)["weight_quant_params"]
        w_q, meta = Quantizer.quantize(w, device=str(w.device), **params)
        meta["scale"] = meta["scale"].to(HQQ_META_DTYPE)        # (O*I/g, 1)
        meta["zero"] = meta["zero"].to(HQQ_META_DTYPE)          # (O*I/g, 1)
        # bytes stored: codes + scale + zero
        stored = w_q.nbytes + meta["scale"].nbytes + meta["zero"].nbytes
        meta["compute_dtype"] = torch.float32                   # unpack and (q - z) * s in fp32
        return Quantizer.dequantize(w_q, meta), stored

    g = "ch" if group_size is None else f"g{group_size}"
    label = f"hqq-{bits}b-{g}"
    n_weights, n_bytes = _apply(model, skip, progress, label, fake)
    return _report(label, bits, group_size, n_weights, n_bytes)


def fake_quantize_bnb_nf4(model: nn.Module, group_size: int = 64, skip: Iterable[str] = ("lm_head",),
                          progress: bool = True, double_quant: bool = False) -> dict:
    """Fake-quantize `model`'s nn.Linear weights in place with bitsandbytes NF4; quality only.

    `bitsandbytes.functional.quantize_4bit(quant_type="nf4", blocksize=group_size)`: one fp32
    absmax per block of `group_size` consecutive weights of the flattened (O, I) weight (the
    last block may be short; blocksize 32, 64, ..., 4096), 4-bit NF4 codes; `double_quant` is bnb's compress_statistics
    (transformers' bnb_4bit_use_double_quant), off by default as in transformers. Dequantized
    with `dequantize_4bit` into the weight's dtype. Weights are not replaced by quantized
    modules: see the module docstring.

    skip   module-name patterns left in float (exact name, fnmatch, or a bare name as a
           suffix); the default keeps lm_head (and so a tied input embedding) in float.
    Returns {"label", "bits", "group_size", "bpw", "quantized_weights", "stored_bytes"}.
    """
    bnbf = _import_bnb()

    def fake(w: torch.Tensor) -> tuple[torch.Tensor, int]:
        # Blocks run over the flattened weight, so quantizing w.reshape(-1) stores the same codes
        # and absmax. Flat, dequantize_4bit is also right on CPU: in bitsandbytes 0.50.2 the
        # AVX-512 kernel is wrong for (O, I) shapes whose blocks straddle rows (I % blocksize
        # != 0 or I < blocksize; e.g. (128, 192) at 128: 13.6 dB SQNR instead of 20.4 dB).
        codes, state = bnbf.quantize_4bit(w.reshape(-1), blocksize=group_size, quant_type="nf4",
                                          compress_statistics=double_quant)
        # bytes stored: codes + absmax (+ nested absmax and offset under double quant)
        stored = codes.nbytes + state.absmax.nbytes
        if state.nested:
            stored += state.state2.absmax.nbytes + torch.as_tensor(state.offset).nbytes
        return bnbf.dequantize_4bit(codes, state), stored

    label = f"bnb-nf4{'-dq' if double_quant else ''}-g{group_size}"
    n_weights, n_bytes = _apply(model, skip, progress, label, fake)
    return _report(label, 4, group_size, n_weights, n_bytes)
