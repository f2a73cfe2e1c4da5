"""Greedy decoding with a static KV cache: an eager prefill, then one decode step replayed.

The decode step (embed -> layers -> head -> argmax -> next input) reads and writes only fixed
buffers, so on CUDA it is captured once in a `torch.cuda.CUDAGraph` and replayed per token:
the host launches one graph per token instead of hundreds of kernels. HF `generate` costs
about 4 ms per token beyond the weight reads on an H200 (Llama-3-8B shape), more than the
weights themselves; this loop is what shows a weight kernel's speed end to end.

Buffers of a StaticDecoder (B = batch, P = prompt length, N = decode steps):

    tokens     (B, P + N + 1) int64   the prompt, then the greedy token of each position
    ids        (B, 1) int64           the step's input: the last greedy token
    positions  (B, 1) int64           its position
    counters   per cache layer, a 0-d int64: how many positions the layer holds (transformers'
               StaticLayer.cumulative_length, advanced in place by every step)

A step writes its token at tokens[:, positions + 1], then advances `ids` and `positions`; the
cache layers advance their own counters. Rewinding is copying saved ids, positions and
counters back in place (entries past a counter are masked out and overwritten). A
sliding-window layer also keeps its length as a Python int and rolls its window: it rewinds
(window saved too) but cannot be captured, so such a model decodes eagerly.

Compatible with transformers 5.17 (`past_key_values=`) and 5.2x (`cache=`): both take
`position_ids` and no `cache_position`; StaticCache(config=, max_cache_len=) in both.
"""
from __future__ import annotations

import contextlib
import inspect
import time
import warnings
from dataclasses import dataclass

import torch

from .._compat import cache_kwarg

MODES = ("graph", "compile", "eager")


@dataclass
class DecodeRun:
    """One greedy decode: the tokens, the first logits and the timed steps.

    tokens        (B, 1 + steps) int64 on the CPU: the prefill's greedy token, then one per step
    first_logits  (B, V) float32 on the CPU: logits of the last prompt position
    seconds       wall time of the `steps` timed decode steps (device synchronized around them)
    mode          what ran the timed steps: "cuda-graph", "compile" or "eager"
    error         why the requested mode did not run (then mode is "eager"), else None
    graph_matches_eager  share of the first checked steps' tokens the graph (or compiled) run
                  reproduced against eager steps from the same state; None in eager mode
    """

    tokens: torch.Tensor
    first_logits: torch.Tensor
    seconds: float
    steps: int
    batch: int
    mode: str
    error: str | None = None
    graph_matches_eager: float | None = None
    prefill_seconds: float = 0.0
    setup_seconds: float = 0.0         # eager check steps + capture (or compile)

    @property
    def tokens_per_second(self) -> float:
        return self.batch * self.steps / self.seconds if self.seconds > 0 else 0.0


class StaticDecoder:
    """Greedy decoding of `prompt` (B, P) with a transformers StaticCache of P + steps positions."""

    def __init__(self, model, prompt: torch.Tensor, steps: int):
        from transformers import StaticCache

        self.model = model
        self.device = next(model.parameters()).device
        B, P = prompt.shape
        self.batch, self.prompt_len, self.max_steps = B, P, steps
        self.cache = StaticCache(config=model.config, max_cache_len=P + steps)
        self._cache_kw = cache_kwarg(model)
        self._keep_kw = "logits_to_keep" in _parameters(model)
        self.tokens = torch.zeros(B, P + steps + 1, dtype=torch.long, device=self.device)
        self.tokens[:, :P] = prompt.to(self.device)
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=self.device)
        self.positions = torch.full((B, 1), P, dtype=torch.long, device=self.device)
        self.counters: list[torch.Tensor] = []

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kw = {self._cache_kw: self.cache, "use_cache": True}
        if self._keep_kw:
            kw["logits_to_keep"] = 1
        return self.model(input_ids=ids, position_ids=positions, **kw).logits[:, -1, :]   # (B, V)

    def prefill(self) -> torch.Tensor:
        """Run the prompt, write the first greedy token; (B, V) float32 logits of the last position."""
        B, P = self.batch, self.prompt_len
        pos = torch.arange(P, device=self.device).expand(B, P)
        logits = self._forward(self.tokens[:, :P], pos)
        nxt = logits.argmax(-1, keepdim=True)                        # (B, 1)
        self.tokens[:, P:P + 1] = nxt
        self.ids.copy_(nxt)
        # the layers allocate their tensors (and move their counters) on the first update
        self.counters = [layer.cumulative_length for layer in self.cache.layers]
        if not all(isinstance(c, torch.Tensor) for c in self.counters):
            raise TypeError("the cache layers keep their lengths as Python ints: not a static cache")
        return logits.float()

    def step(self) -> None:
        """One decode step on the fixed buffers (what the graph captures)."""
        nxt = self._forward(self.ids, self.positions).argmax(-1, keepdim=True)   # (B, 1)
        self.tokens.index_copy_(1, self.positions[0] + 1, nxt)
        self.ids.copy_(nxt)
        self.positions.add_(1)

    @property
    def capturable(self) -> bool:
        """False when a cache layer keeps state on the host: a sliding-window StaticLayer
        branches on a Python int length (and rolls its window), which a graph would freeze."""
        return not any(getattr(layer, "is_sliding", False) for layer in self.cache.layers)

    def snapshot(self) -> tuple:
        layers = []
        for layer in self.cache.layers:
            # a sliding window rolls its contents once full: those must be saved too
            kv = (layer.keys.clone(), layer.values.clone()) if getattr(layer, "is_sliding", False) else None
            layers.append((getattr(layer, "cumulative_length_int", None), kv))
        return self.ids.clone(), self.positions.clone(), [c.clone() for c in self.counters], layers

    def restore(self, snap: tuple) -> None:
        """Rewind to a snapshot, in place (a captured graph keeps the buffers' addresses)."""
        ids, positions, counters, layers = snap
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        for c, saved in zip(self.counters, counters):
            c.copy_(saved)
        for layer, (n, kv) in zip(self.cache.layers, layers):
            if n is not None:
                layer.cumulative_length_int = n
            if kv is not None:
                layer.keys.copy_(kv[0])
                layer.values.copy_(kv[1])

    def host_syncs(self) -> str | None:
        """Run one step with CUDA sync debugging on; the first synchronizing call's message, or
        None. A step that synchronizes with the host cannot be captured in a graph."""
        before = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                self.step()
            finally:
                torch.cuda.set_sync_debug_mode(before)
        # torch also warns that the debug mode itself "is a prototype feature": not a sync
        msgs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()
                and "prototype feature" not in str(w.message)]
        return msgs[0].splitlines()[0] if msgs else None

    def capture(self) -> torch.cuda.CUDAGraph:
        """Capture one step (the buffers advance only when the graph is replayed)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step()
        return graph

    def generated(self, steps: int) -> torch.Tensor:
        """(B, 1 + steps) int64 on the CPU: the prefill's token and `steps` decoded ones."""
        P = self.prompt_len
        return self.tokens[:, P:P + 1 + steps].cpu()


def greedy_decode(model, prompt: torch.Tensor, steps: int, mode: str = "graph", check_steps: int = 4,
                  max_seconds: float | None = None) -> DecodeRun:
    """Prefill `prompt` (B, P) eagerly, then time `steps` greedy decode steps.

    mode         "graph": capture the step in a CUDA graph (CUDA only; the CPU runs eagerly);
                 "compile": torch.compile(step, mode="reduce-overhead"); "eager": plain calls.
                 A step that cannot be captured or compiled runs eagerly; `error` says why.
    check_steps  steps run eagerly first (also the graph's warm-up), then rewound: the timed
                 run starts from the same state and must reproduce their tokens
    max_seconds  stop the timed loop after this much wall time (a slow eager fallback);
                 `steps` then counts the steps done
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    check_steps = min(check_steps, steps)
    with torch.inference_mode():
        dec = StaticDecoder(model, prompt, steps)
        sync()
        t0 = time.perf_counter()
        first_logits = dec.prefill().cpu()
        sync()
        prefill_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        start = dec.snapshot()
        stream = torch.cuda.Stream(device) if cuda else None
        if cuda:
            stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            for _ in range(check_steps):                             # also the capture's warm-up
                dec.step()
        if cuda:
            torch.cuda.current_stream(device).wait_stream(stream)
        P = dec.prompt_len
        eager_check = dec.tokens[:, P + 1:P + 1 + check_steps].clone()
        dec.restore(start)

        run, used, error = dec.step, "eager", None
        if (mode == "compile" or (mode == "graph" and cuda)) and not dec.capturable:
            error = "a sliding-window cache layer keeps its length on the host: not capturable"
        elif mode == "graph" and cuda:
            error = dec.host_syncs()
            dec.restore(start)
            if error is not None:
                error = f"the step synchronizes with the host: {error}"
            else:
                try:
                    run, used = dec.capture().replay, "cuda-graph"
                except Exception as e:                               # noqa: BLE001 - reported
                    error = f"capture failed: {type(e).__name__}: {_first_line(e)}"
                dec.restore(start)
        elif mode == "compile":
            try:
                for t in (dec.ids, dec.positions, dec.tokens):
                    torch._dynamo.mark_static_address(t)
                compiled = torch.compile(dec.step, mode="reduce-overhead", fullgraph=False)
                for _ in range(3):                                   # compile, warm up, record
                    compiled()
                run, used = compiled, "compile"
            except Exception as e:                                   # noqa: BLE001 - reported
                error = f"compile failed: {type(e).__name__}: {_first_line(e)}"
            dec.restore(start)
        sync()
        setup_s = time.perf_counter() - t0

        done = 0
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
            done += 1
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                break
        sync()
        seconds = time.perf_counter() - t0

        tokens = dec.generated(done)
        matches = None
        if used != "eager" and check_steps:
            k = min(check_steps, done)
            matches = float((tokens[:, 1:1 + k] == eager_check[:, :k].cpu()).float().mean())
    return DecodeRun(tokens=tokens, first_logits=first_logits, seconds=seconds, steps=done,
                     batch=dec.batch, mode=used, error=error, graph_matches_eager=matches,
                     prefill_seconds=prefill_s, setup_seconds=setup_s)


def _parameters(model) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else ""

