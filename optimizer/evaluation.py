"""lm-eval in-process: evaluate a (fake-quantized) model object on lm-eval tasks.

Local tasks ship as package data in ``optimizer/resources/evals/tasks`` (offline copies of
real benchmarks, see optimizer/resources/evals/README.md); any built-in lm-eval task name
works too where the hub is reachable. Settings that change
scores (max_length, float32 softmax, batch size) are pinned so that a baseline and a
candidate are evaluated identically. lm-eval's response cache is never used: it is keyed by
request, not by model, so a candidate could be served the baseline's answers.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

#: The shipped offline task definitions (package data: a wheel installs them too).
from optimizer.resources import TASKS as LOCAL_TASKS

#: How loglikelihoods are computed (part of the baseline cache key): shared contexts, see
#: optimizer/prefix_sharing.py.
SCORING = "prefix-sharing-v1"


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    limit: int | None = None,
    batch_size: int = 16,
    max_length: int = 2048,
    num_fewshot: int | None = None,
    include_path: Path | None = LOCAL_TASKS,
    log_samples: bool = False,
    lm: Any = None,
) -> dict[str, Any]:
    """Run lm-eval; returns ``{"results": {task: {metric: value, metric_stderr: value}},
    "samples": {task: [...]}}`` (samples only with ``log_samples``)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from optimizer.prefix_sharing import PrefixSharingHFLM

    if lm is None:  # a served model comes with its own client (optimizer.endpoint)
        lm = PrefixSharingHFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            softmax_dtype="float32",
        )
    manager = TaskManager(
        include_path=str(include_path) if include_path else None,
        # lm-eval's own tasks (hub data) only when asked for: indexing them costs seconds.
        include_defaults=include_path is None or any(not t.startswith("local_") for t in tasks),
    )
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=log_samples,
        use_cache=None,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    results: dict[str, dict[str, float | None]] = {}
    for task, metrics in out["results"].items():
        clean: dict[str, float | None] = {}
        for key, value in metrics.items():
            if "," not in key:
                continue
            name = key.split(",")[0]
            try:
                number = float(value)
            except (TypeError, ValueError):  # lm-eval writes "N/A" for unavailable stderr
                number = None
            clean[name] = None if number is None or math.isnan(number) else number
        results[task] = clean
    return {"results": results, "samples": out.get("samples", {}) if log_samples else {}}


# --------------------------------------------------------------------------- suites


from pydantic import BaseModel, ConfigDict, Field, model_validator  # noqa: E402


class Threshold(BaseModel):
    """One rule per metric: an absolute drop, a relative drop, or a floor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_drop: float | None = Field(
        None, ge=0, description="allowed baseline - candidate (absolute)"
    )
    max_relative_drop: float | None = Field(None, ge=0, lt=1, description="allowed drop / baseline")
    min_value: float | None = Field(None, description="the candidate must score at least this")

    @model_validator(mode="after")
    def _exactly_one(self):
        if sum(v is not None for v in (self.max_drop, self.max_relative_drop, self.min_value)) != 1:
            raise ValueError("set exactly one of max_drop, max_relative_drop, min_value")
        return self


class SuiteTask(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str
    metric: str = "acc"
    limit: int | None = Field(None, gt=0)
    num_fewshot: int | None = Field(None, ge=0)

    @property
    def key(self) -> str:
        return f"{self.task}/{self.metric}"


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str | None = None
    limit: int | None = Field(None, gt=0, description="docs per task unless the task sets its own")
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int = Field(16, gt=0)
    max_length: int = Field(2048, gt=0)
    tasks: list[SuiteTask] = Field(min_length=1)
    thresholds: dict[str, Threshold] = Field(
        default_factory=lambda: {"default": Threshold(max_drop=0.01)}
    )

    def threshold_for(self, key: str) -> Threshold:
        return (
            self.thresholds.get(key) or self.thresholds.get("default") or Threshold(max_drop=0.01)
        )


def load_suite(path: Path) -> Suite:
    import yaml

    from optimizer.errors import OptimizerError

    try:
        return Suite.model_validate(yaml.safe_load(Path(path).read_text()))
    except FileNotFoundError:
        raise OptimizerError(f"suite file not found: {path}") from None
    except Exception as e:  # yaml or pydantic: either way the suite file is wrong
        raise OptimizerError(f"invalid suite {path}: {e}") from None


# --------------------------------------------------------------------------- per-document scores


def task_fingerprint(task: str, include_path: Path | None = LOCAL_TASKS) -> str:
    """Identity of a task's prompts and data: its YAML, helpers and data files (local tasks),
    or its name (built-in lm-eval tasks, versioned by the lm-eval version in the cache key)."""
    import hashlib

    h = hashlib.sha256(task.encode())
    if include_path is not None and include_path.is_dir():
        for f in sorted(include_path.glob("*")):
            if f.is_file():
                h.update(f.name.encode() + f.read_bytes())
        data = include_path.parent / "data"
        for f in sorted(data.glob("*.jsonl")) if data.is_dir() else []:
            h.update(f.name.encode() + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def evaluate_suite(
    model: Any,
    tokenizer: Any,
    suite: Suite,
    *,
    include_path: Path | None = LOCAL_TASKS,
    lm: Any = None,
) -> dict[str, dict[str, Any]]:
    """Per suite metric: ``{"value", "stderr", "n", "docs": {doc_id: score}, "doc_hashes"}``."""
    out: dict[str, dict[str, Any]] = {}
    groups: dict[tuple, list[SuiteTask]] = {}
    for t in suite.tasks:
        groups.setdefault(
            (
                t.limit or suite.limit,
                t.num_fewshot if t.num_fewshot is not None else suite.num_fewshot,
            ),
            [],
        ).append(t)
    for (limit, shots), tasks in groups.items():
        res = evaluate(
            model,
            tokenizer,
            sorted({t.task for t in tasks}),
            limit=limit,
            num_fewshot=shots,
            batch_size=suite.batch_size,
            max_length=suite.max_length,
            include_path=include_path,
            log_samples=True,
            lm=lm,
        )
        for t in tasks:
            docs, hashes = {}, {}
            for task_name, samples in res["samples"].items():
                if task_name != t.task and not task_name.startswith(f"{t.task}_"):
                    continue  # a group (local_mmlu) reports its subtasks' samples
                for s in samples:
                    key = f"{task_name}:{s['doc_id']}"
                    docs[key] = float(s[t.metric])
                    hashes[key] = s.get("doc_hash")
            if not docs:
                raise RuntimeError(f"lm-eval returned no per-document {t.metric} for {t.task}")
            n = len(docs)
            mean = sum(docs.values()) / n
            var = sum((v - mean) ** 2 for v in docs.values()) / max(n - 1, 1)
            out[t.key] = {
                "value": mean,
                "stderr": math.sqrt(var / n),
                "n": n,
                "docs": docs,
                "doc_hashes": hashes,
            }
    return out
