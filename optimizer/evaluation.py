"""lm-eval in-process: evaluate a (fake-quantized) model object on lm-eval tasks.

Local tasks live in ``evals/tasks`` (offline copies of real benchmarks, see evals/README.md);
any built-in lm-eval task name works too where the hub is reachable. Settings that change
scores (max_length, float32 softmax, batch size) are pinned so that a baseline and a
candidate are evaluated identically. lm-eval's response cache is never used: it is keyed by
request, not by model, so a candidate could be served the baseline's answers.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

#: The repository's offline task definitions (present in a source checkout).
LOCAL_TASKS = Path(__file__).resolve().parents[1] / "evals" / "tasks"


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
) -> dict[str, Any]:
    """Run lm-eval; returns ``{"results": {task: {metric: value, metric_stderr: value}},
    "samples": {task: [...]}}`` (samples only with ``log_samples``)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_length=max_length,
        softmax_dtype="float32",
    )
    manager = TaskManager(
        include_path=str(include_path) if include_path else None,
        include_defaults=include_path is None,
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
