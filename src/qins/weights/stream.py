"""Streaming compression: a checkpoint on disk to a qins save, one tensor at a time.

`compress_checkpoint(src_dir, out_dir, config)` never builds the float model. It reads the
source safetensors tensor by tensor (`TensorReader`: plain file reads into a fresh tensor,
no memory map), quantizes the weights `qins.quantize` would quantize (same include/skip rules,
decided on a skeleton built on the meta device, `targets.plan_modules`), and writes what
`qins.save` writes: the same tensor names, dtypes and bytes in one `model.safetensors`, the
same config.json and qins.json. Each output tensor is written as soon as it is made, so
memory is one source tensor and its quantization (with rounding="gptq": one decoder layer,
`weights/sequential.py`), independent of the model's size.

Resumable. Work happens in a fixed temporary directory beside the output,

    .{out.name}.stream-partial/
        progress.json          {"key": what is being made, "shards": {file: {"sha256", "bytes"}}}
        shard-00001.safetensors ...   output tensors in state-dict order, cut at shard_bytes

A shard is recorded (atomically) only after its file is complete; a rerun with the same
source, config and options (and calibration windows, for gptq) verifies each recorded shard
(size, sha256) and redoes the ones that do not match. At the end the shards are concatenated
into model.safetensors (the safetensors layout: 8-byte little-endian header length, JSON
header padded with spaces to a multiple of 8, tensors sorted by dtype alignment then name) and
the directory replaces `out_dir` in one rename.

Peak memory, measured (benchmarks/results/phi35_synthetic.md, 8 full-width Phi-3.5 layers):
6.81 GB when the run mapped each 2 GB source shard (safe_open) and held up to 1 GiB of output,
4.13 GB with this layout; the rest is the largest tensor's quantization.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from .._files import atomic_open, atomic_write, replace_dir, temp_dir_beside
from .._version import __version__
from ..codec.config import FORMAT_VERSION, WeightConfig
from ..codec.tensor import QuantizedWeight
from ..metrics.models import fingerprint
from .plan import PLAN_NAME, plan_doc
from .serialization import CHECKSUM
from .targets import plan_modules
from .swap import modules_from_plan

WEIGHTS_NAME = "model.safetensors"
PROGRESS_NAME = "progress.json"
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}
# safetensors' Dtype enum order; files list tensors by it, descending, then by name
_ST_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32",
             "F32", "F64", "I64", "U64")
_COPY_CHUNK = 1 << 24                                  # bytes per read when concatenating
DEFAULT_SHARD_BYTES = 1 << 29                          # output bytes per recorded (resumable) shard


# ---------------------------------------------------------------- safetensors, written by stream

@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: name, torch dtype, shape."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n

    @property
    def st_dtype(self) -> str:
        return _ST_DTYPES[self.dtype]


def safetensors_order(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    """The order safetensors' save_file lays tensors out in: dtype descending, then name."""
    return sorted(specs, key=lambda s: (-_ST_ORDER.index(s.st_dtype), s.name))


def _header(entries: list[tuple[str, str, tuple, int]], metadata: Mapping[str, str] | None) -> bytes:
    """8-byte length + compact JSON header padded with spaces to a multiple of 8 (as save_file)."""
    doc: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    off = 0
    for name, dt, shape, n in entries:
        doc[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    js = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js


def write_safetensors(path: str | os.PathLike, specs: list[TensorSpec], produce: Callable[[str], torch.Tensor],
                      metadata: Mapping[str, str] | None = None, sort: bool = True) -> Path:
    """Write a safetensors file holding one produced tensor at a time, in safetensors' order.

    `produce(name)` returns the tensor for `specs`' entry `name` (its dtype and shape are
    checked); it is called in the order the tensors are laid out: safetensors' (as save_file)
    or, with sort=False, the order of `specs` (a valid file too; readers go by the offsets).
    The file appears complete (temporary sibling + fsync + rename) or not at all.
    """
    path = Path(path)
    specs = safetensors_order(specs) if sort else list(specs)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        f.write(_header([(s.name, s.st_dtype, s.shape, s.nbytes) for s in specs], metadata))
        for s in specs:
            t = produce(s.name)
            if t.dtype != s.dtype or tuple(t.shape) != tuple(s.shape):
                raise ValueError(f"{s.name}: produced {tuple(t.shape)} {t.dtype}, expected {s.shape} {s.dtype}")
            f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(JSON header, byte offset where the data starts) of a safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", head)
        js = f.read(n)
    if len(js) != n:
        raise ValueError(f"{path}: truncated safetensors header")
    return json.loads(js), 8 + n


_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


class TensorReader:
    """Tensors of safetensors files, read one at a time with plain file reads (no mapping).

    `files` maps each tensor name to its file. A tensor's bytes are read straight into a fresh
    torch tensor, so they occupy the process's memory only while that tensor lives. safe_open
    would map the whole file instead: every page of a 2 GB shard once touched stays in the
    process's resident set (RssFile) until the file is closed (measured:
    benchmarks/results/phi35_synthetic.md).
    """

    def __init__(self, files: Mapping[str, str | os.PathLike]):
        self.files = {k: Path(v) for k, v in files.items()}
        self._headers: dict[Path, tuple[dict, int]] = {}

    def entry(self, name: str) -> tuple[dict, int]:
        """(the header entry of `name`, the byte offset of its file's data section)."""
        path = self.files[name]
        if path not in self._headers:
            self._headers[path] = read_header(path)
        head, start = self._headers[path]
        if name not in head:
            raise ValueError(f"{path}: no tensor {name!r} in the file")
        return head[name], start

    def get(self, name: str) -> torch.Tensor:
        e, start = self.entry(name)
        path = self.files[name]
        dtype = _TORCH_DTYPES.get(e["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has dtype {e['dtype']}, which qins does not read")
        b0, b1 = e["data_offsets"]
        t = torch.empty(tuple(e["shape"]), dtype=dtype)
        if b1 - b0 != t.numel() * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name} spans {b1 - b0} bytes, its shape {e['shape']} needs "
                             f"{t.numel() * dtype.itemsize}; the file is corrupt")
        if t.numel():
            buf = memoryview(t.view(-1).view(torch.uint8).numpy())
            with open(path, "rb") as f:
                f.seek(start + b0)
                if f.readinto(buf) != len(buf):
                    raise ValueError(f"{path}: truncated while reading {name}")
        return t


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- what the output holds

def _skeleton(src: Path):
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(src)
    if hasattr(config, "quantization_config"):
        raise ValueError(f"{src} is already quantized ({config.quantization_config.get('quant_method', '?')})"
                         if isinstance(config.quantization_config, dict) else f"{src} is already quantized")
    return config, _meta_model(config)


def _meta_model(config) -> nn.Module:
    """The model of a HF config on the meta device, ties made: shapes only, nothing allocated."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def predicted_bytes(hf_config, config: WeightConfig, embeddings: WeightConfig | None = None,
                    dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """(bytes of the tensors `compress_checkpoint` writes to model.safetensors, parameters) for
    a model of `hf_config` with float tensors in `dtype`: exact, from the plan and the output
    specs on the meta skeleton, without quantizing anything (the file's JSON header, ~0.1 MB,
    is not counted). log8 scales count as stored."""
    model = _meta_model(hf_config)
    params = sum(p.numel() for p in model.parameters())
    outs, _ = _outputs(model, plan_modules(model, config, embeddings=embeddings), dtype)
    return sum(o.spec.nbytes for o in outs), params


def _source_dtype(config) -> torch.dtype:
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dt) if isinstance(dt, str) else dt


@dataclass(frozen=True)
class _Output:
    """One tensor of the saved state dict and where it comes from."""
    spec: TensorSpec
    source: str            # source checkpoint tensor name
    module: str | None     # quantized module whose field this is, or None for a float tensor
    field: str | None      # qweight / scales (or scale_codes, scale_refs) / offsets / curvature, or None
    transpose: bool = False  # transformers Conv1D: the source weight is stored (in, out)


def _outputs(model: nn.Module, modules: dict, dtype: torch.dtype) -> tuple[list[_Output], dict[str, str]]:
    """The saved tensors (state-dict order, each storage once) and {dropped: kept} float ties."""
    conv1d = {n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    with torch.device("meta"):                         # shapes only: no buffer is allocated
        modules_from_plan(model, modules)
    qnames = {n for n, e in modules.items() if e["kind"] != "tied_linear"}
    outs, tied, seen = [], {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            tied[name] = seen[id(t)]
            continue
        seen[id(t)] = name
        mod, _, field = name.rpartition(".")
        if mod in qnames and field in ("qweight", "scales", "scale_codes", "scale_refs", "offsets", "curvature"):
            outs.append(_Output(TensorSpec(name, t.dtype, tuple(t.shape)), f"{mod}.weight", mod, field,
                                mod in conv1d))
        else:
            out_dtype = dtype if t.is_floating_point() else t.dtype
            outs.append(_Output(TensorSpec(name, out_dtype, tuple(t.shape)), name, None, None))
    return outs, tied


def _shards(outs: list[_Output], shard_bytes: int) -> list[list[_Output]]:
    """Consecutive groups of outputs; a quantized module's fields stay in one shard."""
    groups: list[list[_Output]] = []
    for o in outs:
        if groups and o.module is not None and groups[-1][-1].module == o.module:
            groups[-1].append(o)
        else:
            groups.append([o])
    shards, cur, size = [], [], 0
    for g in groups:
        n = sum(o.spec.nbytes for o in g)
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur += g
        size += n
    if cur:
        shards.append(cur)
    return shards


# ---------------------------------------------------------------- the verb

def compress_checkpoint(src_dir: str | os.PathLike, out_dir: str | os.PathLike, config: WeightConfig | None = None,
                        skip: list[str] | tuple[str, ...] | None = None,
                        overrides: Mapping[str, WeightConfig | dict] | None = None,
                        include_embeddings: bool = False, dtype: torch.dtype | str | None = None,
                        embeddings: WeightConfig | None = None,
                        shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True,
                        calibration: torch.Tensor | None = None, device: str | torch.device | None = None,
                        batch_size: int = 4, _after_shard: Callable[[int], None] | None = None) -> Path:
    """Quantize the safetensors checkpoint `src_dir` into a qins save at `out_dir`, streaming.

    With nearest rounding the result is what `qins.save(qins.quantize(model, config, skip,
    overrides, include_embeddings), out_dir)` writes for `model` loaded from `src_dir` in
    `dtype` (default: the checkpoint's dtype), without the model ever in memory; `qins.load`
    reads it. skip, overrides, include_embeddings, embeddings: as `qins.quantize`.

    rounding="gptq" (in `config`, `embeddings` or an override) runs sequential GPTQ
    (`weights/sequential.py`): `calibration` (N, T) token ids go through the already-quantized
    layers, one layer in memory at a time, on `device` (default: the CPU), in batches of
    `batch_size` windows. The input embedding is rounded to nearest.

    shard_bytes: output bytes per recorded shard: the unit of resuming (output tensors are
    written as they are made, so it costs no memory). An interrupted run resumes after the
    last recorded shard when called again with the same arguments.
    """
    from tqdm.auto import tqdm

    config = config or WeightConfig()
    src, out = Path(src_dir), Path(out_dir)
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (src / WEIGHTS_NAME).is_file():
        weight_map = {k: WEIGHTS_NAME for k in read_header(src / WEIGHTS_NAME)[0] if k != "__metadata__"}
    else:
        raise FileNotFoundError(f"{src}: no model.safetensors or model.safetensors.index.json "
                                f"(streaming reads safetensors checkpoints only)")
    hf_config, model = _skeleton(src)
    dtype = _source_dtype(hf_config) if dtype is None else (getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    modules = plan_modules(model, config, tuple(skip or ()), overrides, include_embeddings, embeddings)
    gptq = any(e.get("config", {}).get("rounding") == "gptq" for e in modules.values())
    if gptq and calibration is None:
        raise ValueError("rounding='gptq' needs calibration=(N, T) token ids: each layer's Hessian comes from "
                         "them, run through the already-quantized layers below it")
    outs, tied = _outputs(model, modules, dtype)
    missing = sorted({o.source for o in outs} - set(weight_map))
    if missing:
        raise ValueError(f"{src}: the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]} "
                         f"(its names must match the transformers model's state dict)")
    shards = _shards(outs, shard_bytes)
    source = {"path": str(src.resolve()), "sha256": fingerprint(src, progress=progress)}
    what = {"source": source["sha256"], "modules": modules, "dtype": str(dtype), "qins": __version__,
            "shards": [[o.spec.name for o in s] for s in shards]}
    if gptq:
        what["calibration"] = {"sha256": hashlib.sha256(calibration.to(torch.int64).numpy().tobytes()).hexdigest(),
                               "shape": list(calibration.shape), "batch_size": batch_size}
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()

    work = out.parent / f".{out.name}.stream-partial"
    work.mkdir(parents=True, exist_ok=True)
    prog_file = work / PROGRESS_NAME
    done: dict = {}
    if prog_file.is_file():
        try:
            prog = json.loads(prog_file.read_text())
        except json.JSONDecodeError:
            prog = {}
        if prog.get("key") == key:
            done = prog.get("shards", {})
    for fname, rec in list(done.items()):                   # verify what a previous run finished
        f = work / fname
        if not f.is_file() or f.stat().st_size != rec["bytes"] or _sha256(f) != rec["sha256"]:
            del done[fname]
    if not done:                                            # stale files of another plan
        for f in work.glob("shard-*.safetensors"):
            f.unlink()

    source_reader = TensorReader({name: src / f for name, f in weight_map.items()})
    names = [f"shard-{i + 1:05d}.safetensors" for i in range(len(shards))]
    written = TensorReader({o.spec.name: work / fname for fname, shard in zip(names, shards) if fname in done
                            for o in shard})
    by_module = {o.module: o for o in outs if o.module is not None}
    device = torch.device(device) if device is not None else None

    def read_weight(module: str) -> torch.Tensor:
        """(O, I) weight of a quantized module in `dtype`, as the model loaded in `dtype` holds it."""
        o = by_module[module]
        w = source_reader.get(o.source).to(device=device, dtype=dtype)
        return w.t().contiguous() if o.transpose else w          # Conv1D stores (I, O)

    def stored(module: str) -> QuantizedWeight | None:
        """A module's codes from a finished shard (resuming), else None."""
        fields = [o for o in outs if o.module == module]
        if not all(o.spec.name in written.files for o in fields):
            return None
        got = {o.field: written.get(o.spec.name) for o in fields}
        return QuantizedWeight.from_stored(got, WeightConfig.from_dict(modules[module]["config"]),
                                           model.get_submodule(module).weight_shape,   # the skeleton holds QINS modules
                                           name=module)

    if gptq:
        from .sequential import SequentialGPTQ
        driver = SequentialGPTQ(hf_config, modules, source_reader.get, calibration, dtype=dtype, device=device,
                                batch_size=batch_size, stored=stored,
                                progress=progress)
        make = driver.quantized
    else:
        def make(module: str) -> QuantizedWeight:
            cfg = WeightConfig.from_dict(modules[module]["config"])
            return QuantizedWeight.from_float(read_weight(module), cfg, name=module)

    total = sum(o.spec.nbytes for o in outs)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"stream {config.label}", disable=not progress)
    try:
        for i, (fname, shard) in enumerate(zip(names, shards)):
            if fname in done:
                bar.update(sum(o.spec.nbytes for o in shard))
                continue
            by_name = {o.spec.name: o for o in shard}
            pending: dict[str, torch.Tensor] = {}           # the other fields of the module being written

            def produce(name: str) -> torch.Tensor:
                o = by_name[name]
                if o.module is None:
                    t = source_reader.get(o.source).to(o.spec.dtype)
                else:
                    if name not in pending:
                        pending.update({f"{o.module}.{k}": v
                                        for k, v in make(o.module).stored_tensors(o.module).items()})
                    t = pending.pop(name)
                bar.update(o.spec.nbytes)
                return t
            # written in plan order, each tensor as soon as it is made: one module's output in memory
            write_safetensors(work / fname, [o.spec for o in shard], produce, sort=False)
            done[fname] = {"bytes": (work / fname).stat().st_size, "sha256": _sha256(work / fname)}
            atomic_write(prog_file, json.dumps({"key": key, "shards": done}, indent=1, sort_keys=True))
            if _after_shard is not None:
                _after_shard(i)
    finally:
        bar.close()

    tmp = temp_dir_beside(out)
    try:
        sums = _concatenate(work, names, tmp / WEIGHTS_NAME,
                            {"format": "pt", "qins_format_version": str(FORMAT_VERSION)})
        _write_configs(src, tmp, hf_config, getattr(model, "generation_config", None), modules, dtype)
        doc = {"format_version": FORMAT_VERSION, "qins_version": __version__, "modules": modules,
               "tied": tied, "source": source, "checksums": {"algorithm": CHECKSUM, "tensors": sums}}
        atomic_write(tmp / PLAN_NAME, json.dumps(doc, indent=1, sort_keys=True))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return out


def _concatenate(work: Path, shard_files: list[str], dest: Path, metadata: Mapping[str, str]) -> dict[str, str]:
    """One safetensors file from the shards, copying bytes in chunks (safetensors' order).
    Returns each tensor's xxh3_64 over the bytes copied (what qins.save records and load checks)."""
    import xxhash

    where = {}
    for fname in shard_files:
        head, start = read_header(work / fname)
        for name, e in head.items():
            if name != "__metadata__":
                where[name] = (fname, start + e["data_offsets"][0], e)
    names = sorted(where, key=lambda n: (-_ST_ORDER.index(where[n][2]["dtype"]), n))
    entries = [(n, where[n][2]["dtype"], tuple(where[n][2]["shape"]),
                where[n][2]["data_offsets"][1] - where[n][2]["data_offsets"][0]) for n in names]
    handles = {}
    sums = {}
    try:
        with atomic_open(dest) as f:
            f.write(_header(entries, metadata))
            for n, _, _, size in entries:
                fname, off, _ = where[n]
                if fname not in handles:
                    handles[fname] = open(work / fname, "rb")
                src = handles[fname]
                src.seek(off)
                h = xxhash.xxh3_64()
                while size:
                    chunk = src.read(min(size, _COPY_CHUNK))
                    if not chunk:
                        raise ValueError(f"{work / fname}: truncated while copying {n}")
                    f.write(chunk)
                    h.update(chunk)
                    size -= len(chunk)
                sums[n] = h.hexdigest()
    finally:
        for h in handles.values():
            h.close()
    return sums


def _write_configs(src: Path, dest: Path, hf_config, generation_config, modules: dict, dtype: torch.dtype) -> None:
    """config.json (quantization_config = the plan), generation config and tokenizer files, as qins.save."""
    from transformers import GenerationConfig

    from .hf import QINSQuantizationConfig, register
    register()
    hf_config.quantization_config = QINSQuantizationConfig.from_plan(plan_doc(modules))
    hf_config.dtype = dtype
    hf_config.save_pretrained(dest)
    # as from_pretrained: the checkpoint's generation_config.json, else the model's default
    gen = GenerationConfig.from_pretrained(src) if (src / "generation_config.json").is_file() else generation_config
    if gen is not None:
        gen.save_pretrained(dest)
    for f in src.iterdir():                               # the tokenizer travels with the weights
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens_map", "vocab", "merges",
                                                "added_tokens", "chat_template")) or f.suffix == ".model"):
            shutil.copy2(f, dest / f.name)
