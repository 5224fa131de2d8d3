"""The baseline: which model a candidate is compared against, and the cache of its scores.

The baseline's per-document scores are cached in ``<cache_dir>/baselines/<sha256 of the
key>.json``; the key holds everything a score depends on, so a second gate on the same
model reuses them and a different model (or suite setting, lm-eval version, dtype ...)
never does.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from optimizer.evaluation.harness import LOCAL_TASKS, SCORING, SuiteScores, task_fingerprint
from optimizer.evaluation.suite import Suite


class BaselineRef(BaseModel):
    """The unoptimized model: a checkpoint directory and its identity.

    ``fingerprint`` identifies its content (``optimizer.models.resolve_source``); ``dtype``
    is what it is stored in and ``compute_dtype`` what it is evaluated in — candidates loaded
    from disk are evaluated in the same compute dtype and with its tokenizer unless they
    say otherwise.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path
    fingerprint: str
    dtype: str
    compute_dtype: str
    trust_remote_code: bool = False


def baseline_key(
    baseline: BaselineRef, suite: Suite, include_path: Path | None = LOCAL_TASKS
) -> dict[str, Any]:
    """Everything a baseline score depends on; its hash names the cache entry."""
    return {
        "model": baseline.fingerprint,
        "dtype": baseline.dtype,
        "compute_dtype": baseline.compute_dtype or baseline.dtype,
        "scoring": SCORING,
        "lm_eval": metadata.version("lm-eval"),
        "seed": 0,
        "max_length": suite.max_length,
        "batch_size": suite.batch_size,
        "tasks": [
            {
                "task": t.task,
                "metric": t.metric,
                "limit": suite.settings(t).limit,
                "num_fewshot": suite.settings(t).num_fewshot,
                "config": task_fingerprint(t.task, include_path, suite.tasks_dir),
                # only where set: keys of suites without it stay what they were
                **({"max_gen_toks": t.max_gen_toks} if t.max_gen_toks else {}),
            }
            for t in suite.tasks
        ],
    }


def baseline_path(cache_root: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_root / "baselines" / f"{digest}.json"


def load_baseline(path: Path, key: dict[str, Any]) -> SuiteScores | None:
    """The cached scores, or None (no entry, an unreadable one, or one for another key)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    try:
        return SuiteScores.model_validate(data["metrics"])
    except (KeyError, ValidationError):
        return None


def save_baseline(path: Path, key: dict[str, Any], scores: SuiteScores) -> None:
    from optimizer.rundir import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"key": key, "metrics": scores.model_dump(mode="json")}))
