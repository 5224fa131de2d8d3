"""Phase timing and peak GPU memory for bench/pipeline_vs_bare.py, in both of its children.

``Phases`` records named spans: wall seconds and, per CUDA device, the peak of
``torch.cuda.max_memory_allocated`` (and ``max_memory_reserved``) within each span. Spans
may nest: at every span boundary the allocator's peak is folded into every open span and
then reset, so each span sees its own peak and the process-wide peak is the maximum of all.
torch is never imported here: memory is read only once the measured code has imported it.

``install_pipeline_probes(phases)`` wraps a few functions of the optimizer package (model
loads, calibration windows and forward, quantize, hand-over save, both exports, the gate's
rebuild and lm-eval scoring) so that a run of the real CLI (``python -m optimizer run``,
started with this directory's sitecustomize.py) reports the same phases as the bare script.
The wrappers only time and call through.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
import time
from typing import Any


def _cuda():
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return torch.cuda if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    except Exception:  # a half-imported torch during interpreter start or exit
        return None


class Phases:
    def __init__(self) -> None:
        self.t0 = time.time()
        self.records: list[dict[str, Any]] = []
        self.open: list[dict[str, Any]] = []
        self.peak_allocated: dict[int, int] = {}
        self.peak_reserved: dict[int, int] = {}
        self.context: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}

    def _fold(self) -> None:
        cuda = _cuda()
        if cuda is None:
            return
        for dev in range(cuda.device_count()):
            allocated = cuda.max_memory_allocated(dev)
            reserved = cuda.max_memory_reserved(dev)
            self.peak_allocated[dev] = max(self.peak_allocated.get(dev, 0), allocated)
            self.peak_reserved[dev] = max(self.peak_reserved.get(dev, 0), reserved)
            for rec in self.open:
                peaks = rec.setdefault("gpu_peak_allocated", {})
                peaks[str(dev)] = max(peaks.get(str(dev), 0), allocated)
            cuda.reset_peak_memory_stats(dev)

    @contextlib.contextmanager
    def span(self, name: str, **info: Any):
        rec: dict[str, Any] = {
            "phase": name,
            **self.context,
            **info,
            "start": round(time.time() - self.t0, 3),
        }
        self._fold()
        self.open.append(rec)
        t = time.perf_counter()
        try:
            yield rec
        finally:
            cuda = _cuda()
            if cuda is not None:
                cuda.synchronize()
            rec["seconds"] = round(time.perf_counter() - t, 4)
            self._fold()
            self.open.remove(rec)
            self.records.append(rec)

    def result(self) -> dict[str, Any]:
        self._fold()
        return {
            "phases": sorted(self.records, key=lambda r: r["start"]),
            "gpu_peak_allocated": {str(k): v for k, v in self.peak_allocated.items()},
            "gpu_peak_reserved": {str(k): v for k, v in self.peak_reserved.items()},
            **self.extra,
        }

    def write(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as fh:
            json.dump(self.result(), fh, indent=1)
        os.replace(tmp, path)


def tokens_digest(tokens: Any) -> str:
    """sha256 of a calibration window tensor (shape and int64 values)."""
    data = tokens.detach().cpu().contiguous()
    return hashlib.sha256(str(tuple(data.shape)).encode() + data.numpy().tobytes()).hexdigest()


def _wrap(owner: Any, name: str, make) -> None:
    original = getattr(owner, name)
    setattr(owner, name, functools.wraps(original)(make(original)))


def install_pipeline_probes(phases: Phases) -> None:
    """Observe the optimizer package's phases (imports only its light modules: no torch)."""
    from optimizer import calibration, context, exporters, models
    from optimizer.evaluation import harness
    from optimizer.techniques import quantize as quantize_module
    from optimizer.unified import rebuild as rebuild_module

    def timed(name: str):
        def make(original):
            def call(*args, **kwargs):
                with phases.span(name):
                    return original(*args, **kwargs)

            return call

        return make

    # which stage is running: a StageContext per stage
    def make_context_init(original):
        def init(self, *args, **kwargs):
            original(self, *args, **kwargs)
            phases.context["stage"] = self.recipe.stages[self.index].name

        return init

    _wrap(context.StageContext, "__init__", make_context_init)
    _wrap(models, "load_model", timed("load"))
    _wrap(models, "save_in_dtype", timed("save"))
    _wrap(quantize_module, "quantize", timed("ptq"))
    _wrap(exporters, "export_trtllm_checkpoint", timed("trtllm_export"))
    _wrap(exporters, "export_unified_hf_checkpoint", timed("hf_export"))
    _wrap(rebuild_module, "rebuild", timed("rebuild_export"))
    _wrap(harness, "score_suite", timed("evaluate"))

    def make_tokenize(original):
        def tokenize(spec, texts, tokenizer):
            with phases.span("calibration_data") as rec:
                tokens = original(spec, texts, tokenizer)
                rec["tokens"] = int(tokens.numel())
                rec["sha256"] = tokens_digest(tokens)
            return tokens

        return tokenize

    _wrap(calibration, "tokenize", make_tokenize)

    def make_forward_loop(original):
        def forward_loop(tokens, batch_size, *args, **kwargs):
            loop = original(tokens, batch_size, *args, **kwargs)

            def timed_loop(model):
                with phases.span("calibration_forward", tokens=int(tokens.numel())) as rec:
                    rec["logits"] = calibration.logits_kwargs(model) or "all"
                    return loop(model)

            return timed_loop

        return forward_loop

    _wrap(calibration, "forward_loop", make_forward_loop)
