"""The accuracy gate: paired statistics of candidate vs baseline per metric, and the verdict.

Rule (see README "Accuracy gate"): for each metric, over the documents both models answered,
the per-document difference d = candidate - baseline gives the mean change and its standard
error SE = sd(d) / sqrt(n) (paired, so the many documents both get right or wrong add no
noise). With the allowed drop T (absolute, or relative x baseline), and z = 1.645 (one-sided
95 %):

- pass when drop + z*SE <= T (confidently within the threshold),
- fail when drop - z*SE > T (confidently beyond it),
- inconclusive otherwise: the drop is within noise of the threshold. It is reported as such
  and fails the gate unless the gate sets ``on_inconclusive: pass``; evaluating more documents
  (a larger ``limit``) shrinks SE and settles it.

A ``min_value`` floor uses the candidate's own standard error the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
from importlib import metadata
from pathlib import Path
from typing import Any

from optimizer.evaluation import SCORING, Suite, Threshold, task_fingerprint

Z_DECIDE = 1.645  # one-sided 95 %
Z_INTERVAL = 1.96  # two-sided 95 % for the reported interval


def _paired(base: dict[str, Any], cand: dict[str, Any]) -> tuple[list[float], list[float]]:
    keys = sorted(set(base["docs"]) & set(cand["docs"]))
    if not keys:
        raise ValueError("baseline and candidate share no documents")
    for k in keys:
        hb, hc = base.get("doc_hashes", {}).get(k), cand.get("doc_hashes", {}).get(k)
        if hb and hc and hb != hc:
            raise ValueError(f"document {k} differs between baseline and candidate evaluations")
    return [base["docs"][k] for k in keys], [cand["docs"][k] for k in keys]


def _mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    return mean, math.sqrt(var / n)


def judge(
    key: str, base: dict[str, Any], cand: dict[str, Any], threshold: Threshold
) -> dict[str, Any]:
    b, c = _paired(base, cand)
    base_mean, _ = _mean_se(b)
    cand_mean, cand_se = _mean_se(c)
    delta, se = _mean_se([y - x for x, y in zip(b, c, strict=True)])
    entry: dict[str, Any] = {
        "metric": key,
        "n": len(b),
        "baseline": base_mean,
        "candidate": cand_mean,
        "delta": delta,
        "delta_stderr": se,
        "delta_ci95": [delta - Z_INTERVAL * se, delta + Z_INTERVAL * se],
        "threshold": threshold.model_dump(exclude_none=True),
    }
    if threshold.min_value is not None:
        low, high, limit = (
            cand_mean - Z_DECIDE * cand_se,
            cand_mean + Z_DECIDE * cand_se,
            threshold.min_value,
        )
        verdict = "pass" if low >= limit else "fail" if high < limit else "inconclusive"
        entry["reason"] = (
            f"candidate {cand_mean:.4f} ± {Z_DECIDE * cand_se:.4f} vs floor {limit:.4f}"
        )
    else:
        allowed = (
            threshold.max_drop
            if threshold.max_drop is not None
            else threshold.max_relative_drop * base_mean
        )
        drop = -delta
        verdict = (
            "pass"
            if drop + Z_DECIDE * se <= allowed
            else "fail"
            if drop - Z_DECIDE * se > allowed
            else "inconclusive"
        )
        entry["allowed_drop"] = allowed
        entry["reason"] = (
            f"drop {drop:+.4f} ± {Z_DECIDE * se:.4f} (95 % one-sided) vs allowed {allowed:.4f}"
        )
    entry["verdict"] = verdict
    return entry


def decide(
    suite: Suite, baseline: dict, candidate: dict, on_inconclusive: str = "fail"
) -> dict[str, Any]:
    metrics = [
        judge(t.key, baseline[t.key], candidate[t.key], suite.threshold_for(t.key))
        for t in suite.tasks
    ]
    failing = [
        m["metric"]
        for m in metrics
        if m["verdict"] == "fail" or (m["verdict"] == "inconclusive" and on_inconclusive == "fail")
    ]
    return {
        "passed": not failing,
        "failing": failing,
        "on_inconclusive": on_inconclusive,
        "rule": "paired per-document difference; pass if drop + 1.645*SE <= allowed, fail if "
        "drop - 1.645*SE > allowed, else inconclusive",
        "metrics": metrics,
    }


# --------------------------------------------------------------------------- baseline cache


def baseline_key(
    model_fingerprint: str,
    suite: Suite,
    dtype: str,
    include_path: Path | None,
    compute_dtype: str | None = None,
) -> dict[str, Any]:
    """Everything a baseline score depends on; its hash names the cache entry."""
    return {
        "model": model_fingerprint,
        "dtype": dtype,
        "compute_dtype": compute_dtype or dtype,
        "scoring": SCORING,
        "lm_eval": metadata.version("lm-eval"),
        "seed": 0,
        "max_length": suite.max_length,
        "batch_size": suite.batch_size,
        "tasks": [
            {
                "task": t.task,
                "metric": t.metric,
                "limit": t.limit or suite.limit,
                "num_fewshot": t.num_fewshot if t.num_fewshot is not None else suite.num_fewshot,
                "config": task_fingerprint(t.task, include_path),
            }
            for t in suite.tasks
        ],
    }


def baseline_path(cache_root: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_root / "baselines" / f"{digest}.json"


def load_baseline(path: Path, key: dict[str, Any]) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data["metrics"] if data.get("key") == key else None


def save_baseline(path: Path, key: dict[str, Any], metrics: dict) -> None:
    from optimizer.rundir import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"key": key, "metrics": metrics}))
