"""Sequential GPTQ over a model that is never whole in memory: one decoder layer at a time.

`SequentialGPTQ(...).quantized(module)` returns the codes of a planned module; streaming
compression (`weights/stream.py`) asks for them in the order it writes them. Behind it:

    ids (N, T) --embedding--> X_0 --layer 0--> X_1 --> ... --layer L-1--> X_L --norm--> lm_head

1. The input embedding is quantized first, to nearest (no input statistics exist for a
   lookup table), and the calibration windows run through the *quantized* embedding and the
   model's prefix (rotary tables, masks) up to layer 0, which records X_0 and the keyword
   arguments every layer receives (`_Stop` ends the pass there).
2. Layer i: its float weights are read (in `dtype`, computed in float32, on `device`); the
   second-moment matrix E[x x^T] of every linear's input is collected from X_i
   (`calibration.input_moments`, per batch of `batch_size` windows, float64 sums: layers fed
   the same tensor share one); each planned linear is quantized with it
   (`QuantizedWeight.from_float`, rounding per its config: gptq compensates, nearest uses the
   diagonal as error weights); the quantized layer runs on X_i to give X_{i+1}; the layer is
   freed. So every layer's Hessian comes from the already-quantized layers below it. Inside a
   layer the linears share one float pass (q/k/v and gate/up see the same input; o_proj and
   down_proj see the float layer's attention and MLP activations), as in the GPTQ paper's
   reference code without its `true-sequential` option.
3. lm_head (when planned and not tied): X_L goes through the model's final norm (every layer
   replays its stored output) and lm_head's input statistics are collected the same way.

This equals, code for code, quantizing the whole float model in memory in that order: the
embedding, then for each layer `input_hessians(model, windows, names=layer)` followed by
`qins.quantize` of that layer, then lm_head (tests/weights/test_sequential.py checks it).
It differs from `qins compress` on a loaded model, which collects every Hessian from the float
model in one pass. A tied lm_head shares the embedding's codes, which are rounded to nearest.

Memory: the float layer (in float32), its Hessians (float64 while summed; Phi-3.5-mini's
down_proj input is 8192^2 = 537 MB), the activations X (N * T * hidden float32: 8 windows of
512 tokens at hidden 3072 is 50 MB) and the quantization temporaries of one weight.

Resuming (stream.py): a module already written is not quantized again; `stored(module)`
returns its codes and the layer is rebuilt from them, so the activations at the resume point
are recomputed by running the calibration windows through the finished layers (a forward
pass per layer, no GPTQ) and the rest of the run sees exactly what an uninterrupted run saw.
"""
from __future__ import annotations

import inspect
from typing import Callable, Mapping

import torch
from torch import nn

from ..codec.config import WeightConfig
from ..codec.tensor import QuantizedWeight
from .calibration import input_moments
from .linear import QINSEmbedding, QINSLinear, _linear_weight
from .skeleton import check_materialised, params_on_meta
from .swap import replace_module


class _Stop(Exception):
    """Ends a forward pass once the inputs wanted have been recorded."""


def decoder_layers(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    """(qualified name, module list) of the model's decoder layers: the first ModuleList of
    `n_layers` modules (Llama/Phi-3 `model.layers`, GPT-2 `transformer.h`)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n_layers:
            return name, mod
    raise ValueError(f"cannot find the {n_layers} decoder layers of {type(model).__name__} "
                     f"(no nn.ModuleList of that length)")


def _first(out):
    """The hidden states of a decoder layer's output (a tensor, or a tuple starting with it)."""
    return out[0] if isinstance(out, (tuple, list)) else out


class SequentialGPTQ:
    """Layer-by-layer calibration and quantization of the checkpoint behind `read`.

    hf_config  the model's transformers config (no quantization_config)
    modules    the plan {module name: {"kind", "config" | "tied_to"}} (targets.plan_modules)
    read       tensor name -> the checkpoint's tensor (any device, its stored dtype)
    windows    (N, T) int64 calibration token ids
    dtype      the weights are cast to it first (as a model loaded in `dtype`), then computed in
               float32
    device     where layers, activations, Hessians and quantization live (None: the CPU)
    stored     module name -> its QuantizedWeight already written (resume), or None
    """

    def __init__(self, hf_config, modules: Mapping[str, dict], read: Callable[[str], torch.Tensor],
                 windows: torch.Tensor, dtype: torch.dtype = torch.float32, device=None, batch_size: int = 4,
                 stored: Callable[[str], QuantizedWeight | None] | None = None, progress: bool = True):
        from transformers import AutoModelForCausalLM
        if windows.dim() != 2 or windows.dtype not in (torch.int64, torch.int32) or windows.shape[0] == 0:
            raise ValueError(f"calibration windows must be a non-empty (N, T) integer tensor of token ids, "
                             f"got {tuple(windows.shape)} {windows.dtype}")
        self.modules = dict(modules)
        self.read, self.dtype = read, dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.windows, self.batch_size = windows, batch_size
        self.stored = stored or (lambda name: None)
        self.progress = progress
        with params_on_meta():                          # parameters on meta, buffers real
            self.model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
        self.model.eval()
        dev = self.device
        self.model._apply(lambda t: t if t.is_meta else t.to(dev))
        text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        self.prefix, self.layers = decoder_layers(self.model, text.num_hidden_layers)
        self._next = 0                                  # the first layer not yet processed
        self._x: list[torch.Tensor] | None = None       # X_i, one (B, T, D) float32 per batch
        self._kwargs: list[dict] = []                   # what every layer receives, per batch
        self._last: list = []                           # the last layer's raw outputs
        self._ready: dict[str, QuantizedWeight] = {}    # made, not yet handed out

    # ---------------------------------------------------------------- what the writer calls
    def quantized(self, module: str) -> QuantizedWeight:
        """The codes of planned module `module`; layers below it are processed first."""
        if module not in self._ready:
            if self._x is None:
                self._start()
            i = self._layer_of(module)
            if i is None and module not in self._ready:  # after the layers: lm_head
                while self._next < len(self.layers):
                    self._advance()
                self._tail(module)
            while i is not None and self._next <= i:
                self._advance()
        if module not in self._ready:
            raise KeyError(f"{module} is not a quantized module of the plan")
        return self._ready.pop(module)

    # ---------------------------------------------------------------- the passes
    def _layer_of(self, module: str) -> int | None:
        p = self.prefix + "."
        return int(module[len(p):].split(".")[0]) if module.startswith(p) else None

    def _batches(self, state: dict | None = None):
        for k, i in enumerate(range(0, self.windows.shape[0], self.batch_size)):
            if state is not None:
                state["batch"] = k
            yield dict(input_ids=self.windows[i:i + self.batch_size].to(self.device), use_cache=False), None

    def _load(self, module: nn.Module, prefix: str) -> None:
        """Fill `module`'s parameters from the checkpoint (cast to dtype, then float32)."""
        state = {n: self.read(prefix + n).to(self.dtype).to(device=self.device, dtype=torch.float32)
                 for n, _ in module.named_parameters()}
        module.load_state_dict(state, strict=False, assign=True)
        check_materialised(module, f"layer {prefix.rstrip('.')}")

    def _quantize(self, name: str, mod: nn.Module, importance: torch.Tensor | None,
                  qw: QuantizedWeight | None = None) -> None:
        """Quantize `mod` (or take `qw`, its codes already written) and swap the result in."""
        cfg = WeightConfig.from_dict(self.modules[name]["config"])
        if qw is None:
            w = mod.weight.detach() if isinstance(mod, nn.Embedding) else _linear_weight(mod, name)
            qw = QuantizedWeight.from_float(w, cfg, importance, name=name)
            self._ready[name] = qw
        qw = QuantizedWeight(*(t.to(self.device) if t is not None else None
                               for t in (qw.qweight, qw.scales, qw.offsets, qw.curvature)), qw.config, qw.shape)
        cls = QINSEmbedding if isinstance(mod, nn.Embedding) else QINSLinear
        replace_module(self.model, name, cls.from_float(mod, cfg, name=name, quantized=qw))

    def _start(self) -> None:
        """Fill the tensors outside the decoder layers (but lm_head's), quantize the input
        embedding if planned, and record X_0 and each layer's keyword arguments."""
        # lm_head (and any planned linear outside the layers) is filled when its turn comes
        later = [n for n, e in self.modules.items() if e["kind"] != "embedding" and self._layer_of(n) is None]
        out_emb = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        for n, m in self.model.named_modules():
            if n == self.prefix or n.startswith(self.prefix + ".") or m is out_emb \
                    or any(n == h or n.startswith(h + ".") for h in later):
                continue
            own = [(k, p) for k, p in m.named_parameters(recurse=False) if p.is_meta]
            if own:
                state = {k: self.read(f"{n}.{k}" if n else k).to(self.dtype).to(self.device, torch.float32)
                         for k, _ in own}
                m.load_state_dict(state, strict=False, assign=True)
        for n, e in self.modules.items():
            if e["kind"] == "embedding":
                self._quantize(n, self.model.get_submodule(n), None, self.stored(n))
        first = self.layers[0]
        self._x, self._kwargs = [], []
        sig = inspect.signature(type(first).forward)
        hidden = list(sig.parameters)[1]                  # after self: the hidden states
        var_kw = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)

        def catch(*args, **kwargs):
            # every argument by name, so that each layer (and input_moments) can be called alike
            bound = dict(sig.bind(first, *args, **kwargs).arguments)
            bound.pop(next(iter(sig.parameters)))
            bound.update(bound.pop(var_kw, {}) if var_kw else {})
            self._x.append(bound.pop(hidden))
            self._kwargs.append(bound)
            raise _Stop

        self._hidden = hidden
        first.forward = catch
        try:
            with torch.inference_mode():
                for kwargs, _ in self._batches():
                    try:
                        self.model(**kwargs)
                    except _Stop:
                        pass
        finally:
            del first.forward
        if len(self._x) != -(-self.windows.shape[0] // self.batch_size):
            raise RuntimeError("the calibration pass did not reach the first decoder layer")

    def _layer_batches(self):
        """(keyword arguments of one layer call, keep=None) per batch, as input_moments takes."""
        for x, kw in zip(self._x, self._kwargs):
            yield {self._hidden: x, **kw}, None

    def _advance(self) -> None:
        """Calibrate, quantize and run layer `self._next`; X moves one layer up."""
        i = self._next
        prefix = f"{self.prefix}.{i}."
        layer = self.layers[i]
        names = [n for n, e in self.modules.items() if n.startswith(prefix) and e["kind"] == "linear"]
        self._load(layer, prefix)
        done = {n: self.stored(n) for n in names}
        hess = {}
        if any(qw is None for qw in done.values()):
            hess = input_moments(layer, self._layer_batches(), full=True, names=[n[len(prefix):] for n in names],
                                 total=len(self._x), progress=False)
        for n in names:
            self._quantize(n, self.model.get_submodule(n), hess.get(n[len(prefix):]), done[n])
        del hess, done
        outs = []
        with torch.inference_mode():
            for kw, _ in self._layer_batches():
                outs.append(layer(**kw))
        self._x = [_first(o) for o in outs]
        self._last = outs if i == len(self.layers) - 1 else []
        layer.to(torch.device("meta"))                    # free the layer's tensors
        self._next += 1
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _tail(self, module: str) -> None:
        """lm_head: its input statistics from X_L through the model's final modules."""
        head = self.model.get_submodule(module)
        state = {"batch": 0}
        for layer in self.layers:                         # every layer replays the stored output
            layer.forward = lambda *a, **k: self._last[state["batch"]]
        head.forward = lambda x: x                        # its statistics, not its logits
        try:
            hess = input_moments(self.model, self._batches(state), full=True, names=[module],
                                 total=len(self._x), progress=False)
        finally:
            del head.forward
            for layer in self.layers:
                del layer.forward
        self._load(head, module + ".")
        self._quantize(module, head, hess[module])
        head.to(torch.device("meta"))
