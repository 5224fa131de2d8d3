"""Accuracy-driven quantization search: the fewest layers kept in higher precision for the
model to pass a judge (the accuracy gate), usable without the runner.

The loop (what Intel Neural Compressor does for its accuracy criterion, with ModelOpt's
quantizers and the pipeline's own gate as the judge):

1. trial 0 quantizes every linear layer to the candidate ``format`` and asks the judge;
2. if it fails, every *layer group* is scored by its sensitivity: the KL divergence of the
   model's next-token distribution on calibration batches when that group alone is
   quantized (its modules from trial 0 swapped into the unquantized model). A group is the
   linears that read one input tensor (q/k/v; gate/up): TensorRT-LLM fuses them, so they
   must share a format;
3. trial *k* moves the most sensitive ``n_k`` groups to the ``fallback`` (16 bits, or a
   higher-precision format), ``n_1 = first_step`` and growing by ``growth``, re-quantizes
   and re-judges, until a trial passes or the budget (trials, minutes) runs out.

Each trial re-calibrates only what changed: the groups moved since the previous trial get
their pristine base weights back (AWQ and SmoothQuant fold their scales into the weights)
and, with a fallback format, its quantizers max-calibrated; every other layer keeps the
previous trial's scales. That is exact, not an approximation: ModelOpt calibrates on the
unquantized forward (its calibration mode passes activations through unquantized and AWQ's
search returns the unquantized output), so a layer's scales do not depend on the other
layers' formats (tests/stages/test_search.py checks the result tensor for tensor against a
full re-quantization). A resumed search, whose previous trial is not in memory, quantizes
the base model afresh. What trials share is the calibration data and the judge's baseline.

Example::

    outcome = search(model, SearchConfig(format="int4_awq"), forward_loop=loop,
                     batches=batches, judge=my_gate)
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from optimizer.formats import FORMAT_NAMES, FORMATS, bits_per_weight, build_config
from optimizer.techniques.quantize import QuantizeConfig

FallbackName = Literal[("none", *FORMAT_NAMES)]  # type: ignore[valid-type]

_log = logging.getLogger(__name__)


class SearchConfig(QuantizeConfig):
    """The candidate (``format`` and its options, as for ``ptq``), what sensitive layers move
    to, and the budget."""

    fallback: FallbackName = Field(
        "none",
        description="what the most sensitive layer groups move to: none (left in 16 bits) or "
        "a higher-precision format (e.g. fp8 under int4_awq)",
    )
    max_trials: int = Field(
        6, ge=1, le=100, description="trials at most, the all-candidate trial included"
    )
    max_minutes: float | None = Field(
        None, gt=0, description="no new trial starts after this many minutes"
    )
    first_step: int = Field(1, ge=1, description="layer groups moved in the first retry")
    growth: float = Field(
        2.0, ge=1.0, description="each retry moves this many times more groups (at least one more)"
    )
    sensitivity_batches: int = Field(
        2, ge=1, description="calibration batches the sensitivity scores are measured on"
    )

    @model_validator(mode="after")
    def _search_needs_format(self):
        if self.format is None:
            raise ValueError("search needs `format` (a simple name), not a modelopt_recipe")
        if self.fallback != "none":
            if self.fallback == self.format:
                raise ValueError("fallback is the candidate format itself; choose a higher one")
            if bits_per_weight(self.fallback, None) <= bits_per_weight(self.format, None):
                raise ValueError(
                    f"fallback {self.fallback} keeps no more bits than {self.format}; choose a "
                    "higher-precision format or none (16 bits)"
                )
            if FORMATS[self.fallback].algorithms[0] != "max":
                raise ValueError(
                    f"fallback {self.fallback} calibrates with "
                    f"{FORMATS[self.fallback].algorithms[0]}, which would re-calibrate the whole "
                    "model; choose a max-calibrated one (fp8, fp8_pc_pt, int8_wo, nvfp4) or none"
                )
        return self


class Trial(BaseModel):
    """One judged trial (``search.json`` rows)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int
    moved: list[str]  # layer groups in the fallback
    moved_modules: int
    effective_bits: float
    weight_bytes: int
    passed: bool
    failing: list[str]
    #: How far the failing metrics miss their thresholds (0 when passed): ranks failures.
    shortfall: float
    metrics: dict[str, float]
    seconds: float


class Judged(BaseModel):
    """What the judge says about one trial's model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    passed: bool
    failing: list[str] = []
    shortfall: float = 0.0
    metrics: dict[str, float] = {}


class SearchState(BaseModel):
    """What a search knows so far; saved after each step so an interrupted search resumes
    without redoing a judged trial or the sensitivity scores."""

    model_config = ConfigDict(extra="forbid")

    groups: list[list[str]] = []  # module names per group, model order
    ranking: list[tuple[str, float]] = []  # (group, KL) most sensitive first
    trials: list[Trial] = []
    seconds: float = 0.0


def group_name(modules: list[str]) -> str:
    """A group's label: its one module, or the shared prefix with the members' last parts
    (``model.layers.3.self_attn.{q_proj,k_proj,v_proj}``)."""
    if len(modules) == 1:
        return modules[0]
    prefix = modules[0].rsplit(".", 1)[0]
    if all(m.rsplit(".", 1)[0] == prefix for m in modules):
        return f"{prefix}.{{{','.join(m.rsplit('.', 1)[1] for m in modules)}}}"
    return "+".join(modules)


def layer_groups(model, batch, exclude: list[str]) -> list[list[str]]:
    """The quantizable linears (lm_head and ``exclude`` globs left out) grouped by the input
    tensor they read in one forward pass, in the order they run."""
    import fnmatch

    import torch

    seen: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    alive = []  # held so that no freed input's memory (and address) is reused in the pass
    hooks = []

    def record(name):
        def hook(module, args):
            x = args[0]
            alive.append(x)
            seen.setdefault((x.data_ptr(), tuple(x.shape)), []).append(name)

        return hook

    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        if any(fnmatch.fnmatch(name, p if p.endswith("*") else f"{p}*") for p in exclude):
            continue
        hooks.append(module.register_forward_pre_hook(record(name)))
    try:
        with torch.inference_mode():
            model(batch[:1, :16].to(next(model.parameters()).device))  # one short row
    finally:
        for h in hooks:
            h.remove()
    return [sorted(set(names), key=names.index) for names in seen.values()]


def _module(model, name: str):
    return model.get_submodule(name)


def _swap(model, name: str, replacement):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    original = getattr(parent, child)
    setattr(parent, child, replacement)
    return original


def sensitivity(
    base, quantized, groups: list[list[str]], batches: list[Any]
) -> list[tuple[str, float]]:
    """KL(base || base with only this group quantized) of the next-token distributions on
    ``batches``, averaged over tokens; most sensitive first. The quantized modules come from
    ``quantized`` (same names), swapped in one group at a time."""
    import torch
    import torch.nn.functional as F

    device = next(base.parameters()).device

    def log_probs(model, batch):
        logits = model(batch.to(device)).logits.float()
        return F.log_softmax(logits, dim=-1)

    with torch.inference_mode():
        reference = [log_probs(base, b) for b in batches]
        scores = []
        for members in groups:
            originals = {m: _swap(base, m, _module(quantized, m)) for m in members}
            try:
                kl = sum(
                    F.kl_div(log_probs(base, b), ref, log_target=True, reduction="sum").item()
                    / ref.shape[0]
                    / ref.shape[1]
                    for b, ref in zip(batches, reference, strict=True)
                ) / len(batches)
            finally:
                for m, original in originals.items():
                    _swap(base, m, original)
            scores.append((group_name(members), kl))
    return sorted(scores, key=lambda s: -s[1])


def moved_counts(config: SearchConfig, groups: int) -> list[int]:
    """Groups in the fallback per trial: 0, first_step, then x growth (at least +1), up to
    every group, at most ``max_trials`` entries."""
    counts = [0]
    n = min(config.first_step, groups)
    while len(counts) < config.max_trials and counts[-1] < groups:
        counts.append(n)
        n = min(groups, max(n + 1, math.ceil(n * config.growth)))
    return counts


def trial_config(config: SearchConfig, moved_modules: list[str]) -> dict[str, Any]:
    """The ``mtq.quantize`` config of a trial: the candidate everywhere but on the moved
    modules, which are left unquantized (the fallback's quantizers come after calibration:
    :func:`fallback_entries`)."""
    return build_config(
        config.format,
        algorithm=config.algorithm,
        group_size=config.group_size,
        kv_cache=config.kv_cache,
        exclude=[*config.exclude, *moved_modules],
    )


def fallback_entries(config: SearchConfig, moved_modules: list[str]) -> list[dict[str, Any]]:
    """The fallback format's weight and input quantizers, one entry per moved module."""
    entries = [
        e
        for e in build_config(config.fallback)["quant_cfg"]
        if e.get("quantizer_name") in ("*weight_quantizer", "*input_quantizer")
    ]
    return [
        {**e, "quantizer_name": f"{module}.{e['quantizer_name'][1:]}"}
        for module in moved_modules
        for e in entries
    ]


def quantize_trial(model, config: SearchConfig, moved_modules: list[str], forward_loop):
    """A quantized copy of ``model`` (left unchanged) with ``moved_modules`` in the fallback.

    In two steps when there is a fallback format: the candidate's algorithm (AWQ would
    otherwise search pre-quant scales for the fallback's layers too, which an FP8 export
    cannot hold), then the fallback quantizers switched on and max-calibrated alone (a max
    pass over every quantizer would overwrite what AWQ's clipping or MSE chose)."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.conversion import set_quantizer_by_cfg

    trial = copy.deepcopy(model)
    mtq.quantize(trial, trial_config(config, moved_modules), forward_loop)
    if config.fallback != "none" and moved_modules:
        set_quantizer_by_cfg(trial, fallback_entries(config, moved_modules))
        _calibrate_only(trial, moved_modules, forward_loop)
    return trial


def _calibrate_only(trial, modules: list[str], forward_loop) -> None:
    """Max-calibrate the quantizers of ``modules`` alone: every other quantizer is off for the
    pass (disabled quantizers still apply their pre-quant scales, so activations are those of
    the unquantized forward either way) and keeps its scales."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.nn import TensorQuantizer

    others = [
        q
        for n, q in trial.named_modules()
        if isinstance(q, TensorQuantizer)
        and q.is_enabled
        and not any(n.startswith(f"{m}.") for m in modules)
    ]
    for q in others:
        q.disable()
    try:
        mtq.calibrate(trial, "max", forward_loop)
    finally:
        for q in others:
            q.enable()


def advance_trial(trial, base, config: SearchConfig, newly_moved: list[str], forward_loop):
    """``trial`` (a quantized copy of ``base``) with ``newly_moved`` modules also in the
    fallback, changed in place: only those modules are reset and re-calibrated (see the module
    docstring for why the other layers' scales stay valid)."""
    from modelopt.torch.quantization.conversion import set_quantizer_by_cfg

    for name in newly_moved:
        module = trial.get_submodule(name)
        module.weight.data.copy_(base.get_submodule(name).weight.data)
        for quantizer in (module.input_quantizer, module.weight_quantizer):
            for buffer in ("_pre_quant_scale", "_amax"):
                if hasattr(quantizer, buffer):
                    delattr(quantizer, buffer)
    if config.fallback == "none":
        set_quantizer_by_cfg(
            trial, [{"quantizer_name": f"{m}*", "enable": False} for m in newly_moved]
        )
        return trial
    set_quantizer_by_cfg(trial, fallback_entries(config, newly_moved))
    _calibrate_only(trial, newly_moved, forward_loop)
    return trial


def size_of(model, groups: list[list[str]], moved: set[str], config: SearchConfig):
    """(effective weight bits over the searched linears, estimated bytes of the model's
    weights) when the groups in ``moved`` hold the fallback."""
    modules = {m: members for members in groups for m in members}
    searched_bits = searched = 0
    other_bytes = 0
    for name, param in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module in modules:
            group = group_name(modules[module])
            if group in moved:
                bits = bits_per_weight(config.fallback, None)
            else:
                bits = bits_per_weight(config.format, config.group_size)
            searched_bits += param.numel() * bits
            searched += param.numel()
        else:
            other_bytes += param.numel() * 2  # 16-bit storage
    return searched_bits / max(searched, 1), int(other_bytes + searched_bits / 8)


def search(
    model,
    config: SearchConfig,
    *,
    forward_loop: Callable[[Any], None],
    batches: list[Any],
    judge: Callable[[Any], Judged],
    state: SearchState | None = None,
    save_state: Callable[[SearchState], None] | None = None,
    log: logging.Logger | None = None,
) -> tuple[Any, SearchState, int]:
    """Search per-layer precision until ``judge(quantized_model)`` passes.

    ``model`` is the unquantized base (kept unchanged: each trial quantizes a copy).
    ``state`` (from ``save_state``) resumes a search: judged trials are not redone. Returns
    the chosen trial's quantized model, the state, and the chosen trial's index: the first
    passing trial (the fewest groups moved), or, when none passed within the budget, the
    failing trial with the smallest shortfall.
    """
    log = log or _log
    state = state or SearchState()
    save = save_state or (lambda s: None)
    started = time.time() - state.seconds
    if not state.groups:
        state.groups = layer_groups(model, batches[0], config.exclude)
        save(state)
    members = {group_name(g): g for g in state.groups}

    def quantized(moved: list[str]):
        return quantize_trial(model, config, [m for g in moved for m in members[g]], forward_loop)

    counts = moved_counts(config, len(state.groups))
    last: tuple[int, Any] | None = None  # the newest trial's model, reused if chosen
    for index, count in enumerate(counts):
        if index < len(state.trials):
            if state.trials[index].passed:
                break
            continue
        if config.max_minutes is not None and time.time() - started > config.max_minutes * 60:
            log.info("search: %.1f minutes spent, no new trial", config.max_minutes)
            break
        t0 = time.time()
        moved = [g for g, _ in state.ranking[:count]]
        if last is not None and last[0] == index - 1:
            # The previous trial moved a prefix of the same ranking: move the rest onto it.
            earlier = set(state.trials[index - 1].moved)
            newly = [m for g in moved if g not in earlier for m in members[g]]
            log.info(
                "search trial %d: re-calibrating the %d module(s) moved since trial %d",
                index,
                len(newly),
                index - 1,
            )
            trial = advance_trial(last[1], model, config, newly, forward_loop)
        else:
            trial = quantized(moved)
        last = None  # at most one trial's model alive besides the base
        verdict = judge(trial)
        bits, size = size_of(model, state.groups, set(moved), config)
        if index == 0 and not verdict.passed:
            state.ranking = sensitivity(
                model, trial, state.groups, batches[: config.sensitivity_batches]
            )
            log.info(
                "search: most sensitive groups %s",
                ", ".join(f"{g} ({kl:.3g})" for g, kl in state.ranking[:3]),
            )
        state.trials.append(
            Trial(
                index=index,
                moved=moved,
                moved_modules=sum(len(members[g]) for g in moved),
                effective_bits=round(bits, 3),
                weight_bytes=size,
                passed=verdict.passed,
                failing=verdict.failing,
                shortfall=0.0 if verdict.passed else verdict.shortfall,
                metrics=verdict.metrics,
                seconds=round(time.time() - t0, 3),
            )
        )
        state.seconds = time.time() - started
        save(state)
        log.info(
            "search trial %d: %d group(s) in %s, %.2f effective bits: %s",
            index,
            len(moved),
            config.fallback,
            bits,
            "passed" if verdict.passed else f"failed ({', '.join(verdict.failing)})",
        )
        last = (index, trial)
        if verdict.passed:
            break
    chosen = best_trial(state.trials)
    if last is not None and last[0] == chosen:
        chosen_model = last[1]
    else:
        last = trial = None  # free it before quantizing the chosen one again
        from optimizer.hardware import release_memory

        release_memory()
        chosen_model = quantized(state.trials[chosen].moved)
    state.seconds = time.time() - started
    save(state)
    return chosen_model, state, chosen


def best_trial(trials: list[Trial]) -> int:
    """The first passing trial, else the failing one that misses by the least (ties: the
    fewest groups moved)."""
    for t in trials:
        if t.passed:
            return t.index
    return min(trials, key=lambda t: (t.shortfall, len(t.moved))).index
