"""QINSLinear and QINSEmbedding: modules that hold packed codes instead of a float weight."""
from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..kernels import cuda_qlinear
from ..codec import grid
from ..codec import scales as log8
from ..codec.formats import get_format
from ..codec.packing import packed_words
from ..codec.tensor import QuantizedWeight, build_table
from ..codec.config import WeightConfig


class _QuantizedWeightMixin:
    """Registers the stored tensors of a QuantizedWeight as persistent buffers.

    qweight    (O, packed_words(I, bits)) int32
    scales     (O, G) float16            absent for qins-seed; config.scale_dtype "log8": in
                                         state dicts (so on disk) as scale_codes (O, G) uint8 +
                                         scale_refs (O,) float16 (codec/scales.py)
    offsets    (O, G) float16            int-asym only
    curvature  (A,) float32              qins only (A = 1 per tensor, O per channel)

    Derived, not a buffer (not saved, not counted as stored bytes): `_table`, the (1, 2^bits)
    float32 decode table of a per-tensor curvature or a fixed format (at most 1 KB). It moves
    with `.to()`, so a forward makes no host round trip, and it is rebuilt when the curvature
    changes (a copy, a load, an assignment). Per-channel curvatures build theirs per decode,
    on their device, or the kernels decode them in closed form.
    """

    def _init_buffers(self, rows: int, cols: int, config: WeightConfig) -> None:
        fmt = get_format(config.format)
        self.config = config
        self.weight_shape = (rows, cols)
        self.register_buffer("qweight", torch.zeros(rows, packed_words(cols, config.bits), dtype=torch.int32))
        G = grid.n_groups(cols, cols if config.group_size is None else config.group_size)
        self.register_buffer("scales", torch.ones(rows, G, dtype=torch.float16) if fmt.scaled else None)
        self.register_buffer("offsets", torch.zeros(rows, G, dtype=torch.float16) if fmt.asymmetric else None)
        A = rows if config.curvature == "channel" else 1
        self.register_buffer("curvature", torch.zeros(A, dtype=torch.float32) if fmt.curved else None)
        self._table: torch.Tensor | None = None
        self._table_key: tuple | None = None
        self._decoded: torch.Tensor | None = None
        self._refresh_table()

    def _curvature_key(self) -> tuple | None:
        c = self.curvature
        if c is None:
            return None
        # inference tensors keep no version counter: a new tensor still changes the key
        return (c.data_ptr(), None if c.is_inference() else c._version, c.device)

    def _refresh_table(self) -> None:
        """Rebuild the decode table from the curvature (one host round trip, not per forward)."""
        c = self.curvature
        device = self.qweight.device
        if c is not None and c.numel() > 1:
            self._table = None                           # per channel: built per decode
        elif device.type == "meta":
            self._table = torch.empty(1, 2 ** self.config.bits, device=device)
        else:
            self._table = build_table(self.config, c).to(device)
        self._table_key = self._curvature_key()

    def _current_table(self) -> torch.Tensor | None:
        if not torch.compiler.is_compiling() and self._table_key != self._curvature_key():
            self._refresh_table()
        return self._table

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() / .float() convert every float buffer; the stored
        # scales (float16) and curvature (float32) are part of the format (bf16 scales moved the
        # decoded 8-bit weights by ~0.4 step), so they keep their dtype and only change device
        stored = {id(b) for b in self._buffers.values() if b is not None}
        fresh = "qweight" in self._buffers and self._table_key == self._curvature_key()

        def keep_dtype(t):
            out = fn(t)
            return t.to(out.device) if id(t) in stored and out.dtype != t.dtype else out

        out = super()._apply(keep_dtype, recurse)
        if getattr(self, "_table", None) is not None:   # the table moves with its codes
            self._table = self._table.to(self.qweight.device)
        if fresh:
            self._table_key = self._curvature_key()
        return out

    # -- log8 scales (codec/scales.py): float16 in memory, 8-bit codes in every state dict ----
    def _log8(self) -> bool:
        return self.config.scale_dtype == "log8"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if prefix + "qweight" in destination and cuda_qlinear.is_tiled(destination[prefix + "qweight"]):
            destination[prefix + "qweight"] = self._untiled()     # the stored format is (O, words)
        if self._log8() and prefix + "scales" in destination:
            s = destination.pop(prefix + "scales")
            if s.is_meta:                            # a skeleton: shapes only
                code = torch.empty(s.shape, dtype=torch.uint8, device="meta")
                ref = torch.empty(s.shape[0], dtype=torch.float16, device="meta")
            else:
                code, ref = (t.to(s.device) for t in log8.encode(s, name=prefix + "scales"))
            destination[prefix + "scale_codes"], destination[prefix + "scale_refs"] = code, ref

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        codes, refs = prefix + "scale_codes", prefix + "scale_refs"
        if self._log8() and codes in state_dict and refs in state_dict:
            # state_dict is this module's own copy (nn.Module.load_state_dict): rewritten in place
            code = state_dict.pop(codes)
            state_dict[prefix + "scales"] = log8.decode(code, state_dict.pop(refs), prefix + "scales").to(code.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if "qweight" in self._buffers:              # copies in place: inference tensors (made
            self._refresh_table()                   # under inference_mode) keep no version

    def expect_stored_scales(self) -> None:
        """Before a loader that fills buffers by name (transformers'): hold log8 scales as the
        stored `scale_codes` / `scale_refs` buffers; `decode_stored_scales` turns them back."""
        if self._log8() and self._buffers.get("scales") is not None:
            s = self._buffers["scales"]
            self._buffers["scales"] = None
            self.register_buffer("scale_codes", torch.empty(s.shape, dtype=torch.uint8, device=s.device))
            self.register_buffer("scale_refs", torch.empty(s.shape[0], dtype=torch.float16, device=s.device))

    def decode_stored_scales(self) -> None:
        """After a loader filled the buffers by name (transformers'): float16 scales from stored
        log8 ones, the table, and (QINSLinear) the CUDA layout of the codes, which a loader that
        assigns tensors does not make (tests/gpu checks the layouts after
        from_pretrained(device_map="cuda"))."""
        if "scale_codes" in self._buffers:
            code, ref = self._buffers.pop("scale_codes"), self._buffers.pop("scale_refs")
            self._buffers["scales"] = log8.decode(code, ref, "scales").to(code.device)
        self._refresh_table()
        if hasattr(self, "_kmajor_on_cuda"):
            self._kmajor_on_cuda()

    def _set_quantized(self, qw: QuantizedWeight) -> None:
        self._untile()
        for k, v in qw.tensors().items():
            getattr(self, k).copy_(v)
        self._refresh_table()
        if hasattr(self, "_kmajor_on_cuda"):
            self._kmajor_on_cuda()

    # -- tiled codes (QINSLinear on CUDA, kernels.tiles_take): the same codes, another order ----
    def _untiled(self) -> torch.Tensor:
        """qweight as (O, words) codes: itself, or a K-major copy of tiled codes."""
        q = self._buffers["qweight"]
        if not cuda_qlinear.is_tiled(q):
            return q
        rows, cols = self.weight_shape
        return cuda_qlinear.untile_codes(q, rows, packed_words(cols, self.config.bits))

    def _untile(self) -> None:
        """Store the codes as (O, words) again (before anything that cuts or copies rows)."""
        if self._buffers.get("qweight") is not None:
            self._buffers["qweight"] = self._untiled()

    @property
    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self._untiled(), self.scales, self.offsets, self.curvature,
                               self.config, self.weight_shape, table=self._current_table())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return kernels.dequantize(self.quantized, dtype)

    def cache_decoded(self, on: bool) -> None:
        """Hold the decoded float weight (fast evaluation, float memory); results identical."""
        self._decoded = self.dequantize() if on else None


class QINSLinear(_QuantizedWeightMixin, nn.Module):
    """A Linear layer whose weight (out_features, in_features) is stored as QINS (or baseline) codes.

    Buffers: see _QuantizedWeightMixin. Parameter: bias (out_features,) or None, float.
    A tied lm_head holds no buffers of its own: it reads its QINSEmbedding's (`tied_to`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, config: WeightConfig,
                 tied_to: "QINSEmbedding | None" = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._tied = [tied_to] if tied_to is not None else []   # list: not a submodule
        if tied_to is None:
            self._init_buffers(out_features, in_features, config)
        else:
            if tied_to.weight_shape != (out_features, in_features):
                raise ValueError("tied embedding shape does not match the linear layer")
            self.config, self.weight_shape = tied_to.config, tied_to.weight_shape
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Module, config: WeightConfig, importance: torch.Tensor | None = None,
                   name: str = "linear", quantized: QuantizedWeight | None = None) -> "QINSLinear":
        """Quantize an nn.Linear (or transformers' Conv1D, whose weight is stored transposed).

        `quantized`: codes already made from this weight (e.g. by the bit allocator), used as is.
        """
        w = _linear_weight(linear, name)
        out_f, in_f = w.shape
        bias = getattr(linear, "bias", None)
        qw = _given_or_new(w, config, importance, name, quantized)
        with torch.device(w.device):                           # buffers made where the codes are
            mod = cls(in_f, out_f, bias is not None, qw.config, dtype=w.dtype)
        mod._set_quantized(qw)
        if bias is not None:
            mod.bias.data.copy_(bias.detach())
        return mod.to(w.device)

    @property
    def tied_to(self) -> "QINSEmbedding | None":
        return self._tied[0] if self._tied else None

    @property
    def quantized(self) -> QuantizedWeight:
        return self.tied_to.quantized if self.tied_to is not None else super().quantized

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return kernels.dequantize(self.quantized, dtype)

    def _kmajor_on_cuda(self) -> None:
        """On CUDA, codes and group parameters are stored K-major (the same values; saving
        writes them row-major), the order the fused kernels read (kernels/triton_kmajor.py);
        4-bit codes that the tensor-core kernel reads are tiled instead (kernels.tiles_take:
        cuda_qlinear.tile_codes; saved as (O, words) all the same). Off CUDA, tiled codes are
        untiled."""
        q = self._buffers.get("qweight")
        if q is None:
            return
        if not q.is_cuda:
            self._untile()
            return
        for name in ("qweight", "scales", "offsets"):
            t = self._buffers.get(name)
            if t is not None and t.dim() == 2 and not kernels.is_kmajor(t):
                self._buffers[name] = kernels.kmajor(t)
        if self._tileable() and kernels.tiles_take(q.device):
            self._buffers["qweight"] = cuda_qlinear.tile_codes(self._buffers["qweight"], self.weight_shape[1])

    def _tileable(self) -> bool:
        """(O, words) codes of a layer the CUDA kernel takes (cuda_qlinear.layer_unsupported: 4
        bits, one table, fp16 group scales of 32/64/128 codes, no offsets, K % 8, N % 4)."""
        b = self._buffers
        q = b.get("qweight")
        rows, cols = self.weight_shape
        return (q is not None and q.dim() == 2 and cuda_qlinear.layer_unsupported(
            self.config.bits, b.get("scales"), b.get("offsets"), self._table, self.config.group_size, rows, cols) is None)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._kmajor_on_cuda()
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        self._untile()                               # the state dict holds (O, words) codes
        super()._load_from_state_dict(*args, **kwargs)
        self._kmajor_on_cuda()                       # assign=True straight onto a GPU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        src = self._tied[0] if self._tied else self
        p = self._parameters                             # not self.bias: Module.__getattr__ is slow
        bias = p["bias"] if "bias" in p else self.bias
        if src._decoded is None and kernels.cpu_fast(x, bias, self.in_features):
            return kernels.cpu.run(x, self._cpu_plan(src, bias))
        q = src._buffers["qweight"]
        if q.dim() == 4 and src._decoded is None and kernels.backend() == "auto":     # tiled (CUDA)
            rows, cols = src.weight_shape
            curv, mode = kernels.op_mode(src.config, src._buffers["curvature"])
            return kernels.qlinear_tiled(x, q, src._buffers["scales"], src._current_table(), curv, bias,
                                         src.config.group_size, cols, rows, mode)
        return kernels.qlinear(x, self.quantized, bias, weight=src._decoded)

    def _cpu_plan(self, src: "_QuantizedWeightMixin", bias: torch.Tensor | None) -> tuple:
        """kernels.cpu.plan for this layer, rebuilt when a stored tensor, the curvature (object or
        version) or the bias changes; the key holds the objects themselves (compared with `is`)."""
        b = src._buffers
        c = b["curvature"]
        cached = self.__dict__.get("_plan")
        if cached is not None:
            k = cached[0]
            if (k[0] is b["qweight"] and k[1] is b["scales"] and k[2] is b["offsets"] and k[3] is c
                    and k[5] is bias and (c is None or k[4] is None or k[4] == c._version)):
                return cached[1]
        key = (b["qweight"], b["scales"], b["offsets"], c,
               None if c is None or c.is_inference() else c._version, bias)
        cached = (key, kernels.cpu.plan(self.quantized, bias))
        self.__dict__["_plan"] = cached
        return cached[1]

    def extra_repr(self) -> str:
        tie = ", tied" if self.tied_to is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.config.label}{tie}"


class QINSEmbedding(_QuantizedWeightMixin, nn.Module):
    """An embedding table (num_embeddings, embedding_dim) stored as codes; rows decode on lookup."""

    def __init__(self, num_embeddings: int, embedding_dim: int, config: WeightConfig,
                 padding_idx: int | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self._init_buffers(num_embeddings, embedding_dim, config)
        self.scale_output: float | None = None                 # e.g. Gemma's sqrt(d) embedding scale
        self.output_dtype = dtype                              # the float embedding's dtype

    @classmethod
    def from_float(cls, emb: nn.Embedding, config: WeightConfig, importance: torch.Tensor | None = None,
                   name: str = "embedding", quantized: QuantizedWeight | None = None) -> "QINSEmbedding":
        """`importance`: the tied lm_head's input statistics ((D,) or (D, D)), if any."""
        w = emb.weight.detach()
        qw = _given_or_new(w, config, importance, name, quantized)
        with torch.device(w.device):
            mod = cls(w.shape[0], w.shape[1], qw.config, padding_idx=emb.padding_idx, dtype=w.dtype)
        mod._set_quantized(qw)
        embed_scale = getattr(emb, "embed_scale", None)        # scaled embedding subclasses
        if embed_scale is not None:
            mod.scale_output = float(embed_scale)
        return mod.to(w.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if self._decoded is not None:
            rows = self._decoded[flat]
        else:
            rows = kernels.dequantize(self.quantized, torch.float32, rows=flat)
        out = rows.view(*ids.shape, self.embedding_dim)
        if self.scale_output is not None:
            out = out * self.scale_output
        return out.to(self.output_dtype)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() move the output dtype with the model; codes keep their dtypes
        probe = fn(torch.zeros((), dtype=self.output_dtype))
        if probe.is_floating_point():
            self.output_dtype = probe.dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.config.label}"


def _given_or_new(w, config, importance, name, quantized):
    if quantized is None:
        return QuantizedWeight.from_float(w, config, importance, name=name)
    if tuple(quantized.shape) != tuple(w.shape):
        raise ValueError(f"{name}: quantized weight has shape {tuple(quantized.shape)}, the module {tuple(w.shape)}")
    return quantized


def _linear_weight(module: nn.Module, name: str) -> torch.Tensor:
    """(out_features, in_features) float weight of a linear-like module, or a clear error."""
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):   # transformers' GPT-2 style
        return module.weight.detach().t().contiguous()
    raise TypeError(
        f"{name}: cannot quantize a module of type {type(module).__name__}; "
        f"qins quantizes nn.Linear, transformers Conv1D and nn.Embedding")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))
