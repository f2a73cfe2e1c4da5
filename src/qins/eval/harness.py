"""One process, same data: the float reference and every variant measured side by side.

    h = Harness(tok, float_model, Protocol(windows=16))
    row = h.measure_config(WeightConfig("qins", 8, 128))     # quantizes a copy, measures it

Evaluation windows are the LAST `windows` 512-token windows of the corpus; calibration text
(when a variant asks for it) is the FIRST `calibration_windows` windows. The two never
overlap; `Harness.describe()` says which token ranges each used.
"""
from __future__ import annotations

import copy
import platform
import time
from dataclasses import asdict, dataclass
from datetime import date

import torch
from torch import nn

from ..codec.config import WeightConfig
from ..metrics.generation import greedy_generate, load_prompts, token_match
from ..metrics.memory import memory_report
from ..metrics.quality import Reference, evaluate, token_windows
from ..metrics.rows import match_fields, quality_row


@dataclass(frozen=True)
class Protocol:
    windows: int = 16                 # evaluation windows of `window` tokens (from the end)
    window: int = 512
    prompts: int = 32                 # greedy token match: prompts x new_tokens
    new_tokens: int = 64
    batch_size: int = 4
    gen_batch_size: int = 16
    calibration_windows: int = 8      # from the start of the corpus, disjoint from evaluation


class Harness:
    """Holds the float model, its reference predictions and its greedy generations."""

    def __init__(self, tok, model: nn.Module, protocol: Protocol = Protocol(), text: str | None = None,
                 progress: bool = True):
        from ..metrics.models import default_corpus

        self.tok, self.model, self.protocol, self.progress = tok, model, protocol, progress
        all_windows = token_windows(tok, text if text is not None else default_corpus(), protocol.window)
        n = all_windows.shape[0]
        if protocol.windows + protocol.calibration_windows > n:
            raise ValueError(
                f"the corpus has {n} windows of {protocol.window} tokens: too few for "
                f"{protocol.windows} evaluation + {protocol.calibration_windows} calibration windows")
        self.n_corpus_windows = n
        self.eval_windows = all_windows[n - protocol.windows:]
        self.calibration_windows = all_windows[:protocol.calibration_windows]
        t0 = time.perf_counter()
        self.reference = Reference.build(model, self.eval_windows, protocol.batch_size, progress)
        self.reference_seconds = time.perf_counter() - t0
        self.prompts = load_prompts(protocol.prompts)
        self._ref_gen: list[list[int]] | None = None
        self._calibration_stats = None
        self._calibration_hessians = None
        self._sensitivity: dict = {}

    # -- shared data ----------------------------------------------------------------------
    def reference_generations(self) -> list[list[int]]:
        if self._ref_gen is None:
            self._ref_gen = self._generate(self.model)
        return self._ref_gen

    def _generate(self, model: nn.Module) -> list[list[int]]:
        p = self.protocol
        return greedy_generate(model, self.tok, self.prompts, p.new_tokens, p.gen_batch_size, self.progress)

    def calibration_stats(self) -> dict[str, torch.Tensor]:
        """Per-layer mean squared inputs of the float model on the calibration windows."""
        if self._calibration_stats is None:
            from ..weights.calibration import input_second_moments
            self._calibration_stats = input_second_moments(self.model, self.calibration_windows,
                                                           self.protocol.batch_size, self.progress)
        return self._calibration_stats

    def calibration_hessians(self) -> dict[str, torch.Tensor]:
        """Per-layer input second-moment matrices (I, I) of the float model (for GPTQ)."""
        if self._calibration_hessians is None:
            from ..weights.calibration import input_hessians
            self._calibration_hessians = input_hessians(self.model, self.calibration_windows,
                                                        self.protocol.batch_size, self.progress)
        return self._calibration_hessians

    def describe(self) -> dict:
        p = self.protocol
        n = self.n_corpus_windows
        return {
            "protocol": asdict(p),
            "eval_windows": f"windows {n - p.windows}..{n - 1} of {n} (tokens {(n - p.windows) * p.window}.."
                            f"{n * p.window - 1}), {self.reference.tokens} predicted tokens",
            "calibration_windows": f"windows 0..{p.calibration_windows - 1} (tokens 0..{p.calibration_windows * p.window - 1})"
                                   if p.calibration_windows else "none",
            "ppl_ref": self.reference.ppl,
            "machine": f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} torch threads, "
                       f"torch {torch.__version__}",
            "date": date.today().isoformat(),
        }

    # -- measuring ------------------------------------------------------------------------
    def measure(self, model: nn.Module, label: str, bpw: float | None = None, match: bool = True,
                extra: dict | None = None) -> dict:
        """Quality (+ greedy token match) and memory of `model` against the reference."""
        from ..weights.quantize import decoded_weights

        t0 = time.perf_counter()
        with decoded_weights(model):
            q = evaluate(model, self.reference, self.protocol.batch_size, self.progress)
            tm = token_match(self.reference_generations(), self._generate(model)) if match else None
        mem = memory_report(model)
        row = quality_row(label, q, bpw=bpw if bpw is not None else mem["quantized_bpw"], bpw_all=mem["bpw_all"],
                          total_bytes=mem["total_bytes"], stored_bytes=mem["stored_bytes"],  # bpw_all = 8 stored / params
                          params=mem["params"])
        row.update(match_fields(tm))
        row["seconds"] = time.perf_counter() - t0
        row.update(extra or {})
        return row

    def measure_config(self, config: WeightConfig, match: bool = True, calibrated: bool = False,
                       include_embeddings: bool = False, skip=None, keep: bool = False):
        """Quantize a copy of the float model with `config` and measure it.

        `calibrated`: activation-weighted error from the calibration windows; a config with
        rounding="gptq" always uses them (their Hessians). Returns the row, or (row, quantized
        model) with keep=True.
        """
        from ..weights.quantize import quantize

        variant = copy.deepcopy(self.model)
        t0 = time.perf_counter()
        gptq = config.rounding == "gptq"
        calibrated = calibrated or gptq
        stats = self.calibration_hessians() if gptq else (self.calibration_stats() if calibrated else None)
        quantize(variant, config, skip=skip, include_embeddings=include_embeddings, calibration=stats,
                 progress=self.progress)
        qt = time.perf_counter() - t0
        label = config.label + ("+act" if calibrated and not gptq else "")
        row = self.measure(variant, label, match=match,
                           extra={"format": config.format, "bits": config.bits,
                                  "group_size": config.group_size, "quantize_seconds": qt,
                                  "calibrated": calibrated, "rounding": config.rounding})
        return (row, variant) if keep else row

    def measure_budget(self, target_bpw: float, candidates=None, match: bool = False):
        """Quantize a copy of the whole model (every tensor) to `target_bpw` with the bit
        allocator; the sensitivity measurement is shared by every budget of one harness."""
        from ..weights import allocate
        from ..weights.budget import measure_sensitivity, quantize_to_budget

        candidates = list(candidates or allocate.default_candidates())
        key = tuple(c.label for c in candidates)
        t0 = time.perf_counter()
        if key not in self._sensitivity:
            self._sensitivity[key] = measure_sensitivity(self.model, self.calibration_windows, candidates,
                                                         progress=self.progress)
        variant = copy.deepcopy(self.model)
        rep = quantize_to_budget(variant, self.calibration_windows, target_bpw=target_bpw, candidates=candidates,
                                 sensitivity=self._sensitivity[key], progress=self.progress)
        qt = time.perf_counter() - t0
        mix = {}
        for t in rep["tensors"]:
            mix[t["config"]] = mix.get(t["config"], 0) + t["numel"]
        total = sum(mix.values())
        row = self.measure(variant, f"qins-mixed<={target_bpw:g}bpw", bpw=rep["bpw_all"], match=match,
                           extra={"format": "qins-mixed", "bits": target_bpw, "group_size": None,
                                  "quantize_seconds": qt, "calibrated": True, "whole_model": True,
                                  "estimated_kl": rep["estimated_kl"],
                                  "mix": {k: round(v / total, 4) for k, v in sorted(mix.items())}})
        return row, rep
