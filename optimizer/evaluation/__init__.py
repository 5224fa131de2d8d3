"""Accuracy evaluation: score a candidate and its baseline on a suite with lm-eval, and judge.

One call does it for every caller (the gate stage, ``optimize gate``, a search over
quantization settings): :func:`evaluate_and_judge`. Its parts:

- ``suite``: suites, their overrides and each task's effective limit / shots;
- ``harness``: lm-eval in-process -> per-document :class:`TaskScores` / :class:`SuiteScores`;
- ``prefix_sharing``: lm-eval's HFLM scoring a question's choices over one shared context;
- ``candidates``: what can be evaluated (in-memory model, checkpoint, endpoint) and its
  refusals;
- ``baseline``: the model compared against (:class:`BaselineRef`) and its score cache;
- ``verdict``: paired statistics -> :class:`Verdict`;
- ``report``: gate.json, report.md, report.html.

Importing this package imports neither torch nor transformers nor lm-eval.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from optimizer.evaluation.baseline import BaselineRef
from optimizer.evaluation.candidates import (
    TARGETS,
    Candidate,
    CheckpointCandidate,
    ModelCandidate,
    make_candidate,
)
from optimizer.evaluation.endpoint import EndpointCandidate
from optimizer.evaluation.harness import LOCAL_TASKS, SCORING, SuiteScores, TaskScores
from optimizer.evaluation.report import regenerate, run_meta, training_stages, write_reports
from optimizer.evaluation.suite import (
    Suite,
    SuiteTask,
    Threshold,
    apply_overrides,
    load_suite,
    resolve_suite,
)
from optimizer.evaluation.verdict import MetricVerdict, Verdict

__all__ = [
    "LOCAL_TASKS",
    "SCORING",
    "TARGETS",
    "BaselineRef",
    "Candidate",
    "CheckpointCandidate",
    "EndpointCandidate",
    "Judgement",
    "MetricVerdict",
    "ModelCandidate",
    "Suite",
    "SuiteScores",
    "SuiteTask",
    "TaskScores",
    "Threshold",
    "Verdict",
    "apply_overrides",
    "evaluate_and_judge",
    "load_suite",
    "resolve_suite",
    "make_candidate",
    "regenerate",
    "run_meta",
    "training_stages",
    "write_reports",
]

_log = logging.getLogger(__name__)


class Judgement(BaseModel):
    """The outcome of :func:`evaluate_and_judge`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    verdict: Verdict
    baseline: SuiteScores
    candidate: SuiteScores
    suite: str
    baseline_model: str
    #: The baseline's scores came from the cache (it was not evaluated).
    baseline_cached: bool
    #: The cache entry (None without a cache).
    baseline_cache_file: Path | None = None
    baseline_seconds: float
    candidate_seconds: float

    @property
    def passed(self) -> bool:
        return self.verdict.passed

    def summary(self) -> dict[str, Any]:
        """What run.json records for the gate: pass/fail, failing metrics, whether the
        baseline was cached, and per metric the baseline, candidate and verdict."""
        return {
            "passed": self.verdict.passed,
            "failing": list(self.verdict.failing),
            "baseline_cached": self.baseline_cached,
            **{
                m.metric: {"baseline": m.baseline, "candidate": m.candidate, "verdict": m.verdict}
                for m in self.verdict.metrics
            },
        }


def _score(target: Candidate, suite: Suite, baseline: BaselineRef, include_path) -> SuiteScores:
    from optimizer.evaluation import harness
    from optimizer.hardware import release_memory

    # The loaded model lives only in this frame: dropped before the next one loads (and
    # collected: its modules reference each other, see release_memory).
    try:
        return harness.score_suite(target.load(suite, baseline), suite, include_path=include_path)
    finally:
        release_memory()


def _check(candidate: Candidate, baseline: BaselineRef, suite: Suite, include_path) -> None:
    """``candidate.check``, told the suite (an endpoint probes for prompt logprobs only when
    the suite has loglikelihood tasks)."""
    candidate.check(baseline, suite, include_path=include_path)


def evaluate_and_judge(
    suite: Suite,
    baseline: BaselineRef,
    candidate: Candidate,
    *,
    cache_dir: Path | None,
    on_inconclusive: Literal["fail", "pass"] = "fail",
    include_path: Path | None = LOCAL_TASKS,
    log: logging.Logger | None = None,
) -> Judgement:
    """Score ``baseline`` (from ``cache_dir``'s baseline cache when it holds this key, else
    evaluated from its checkpoint and cached; no cache if None) and ``candidate`` on
    ``suite``, and judge every metric with paired statistics.

    Refusals come first: the baseline checkpoint and ``candidate.check(baseline)`` raise
    :class:`~optimizer.errors.OptimizerError` before anything is evaluated."""
    from optimizer.evaluation import baseline as cache
    from optimizer.evaluation.verdict import decide

    log = log or _log
    baseline_target = CheckpointCandidate(
        baseline.path, trust_remote_code=baseline.trust_remote_code, fold=False
    )
    _check(candidate, baseline, suite, include_path)

    t0 = time.time()
    key = cache.baseline_key(baseline, suite, include_path)
    cache_file = cache.baseline_path(cache_dir, key) if cache_dir is not None else None
    base_scores = cache.load_baseline(cache_file, key) if cache_file is not None else None
    cached = base_scores is not None
    if cache_file is not None and base_scores is not None:
        log.info("baseline: reusing cached scores (%s)", cache_file.name)
    else:
        log.info("baseline: evaluating %s on suite %s", baseline.path, suite.name)
        base_scores = _score(baseline_target, suite, baseline, include_path)
        if cache_file is not None:
            cache.save_baseline(cache_file, key, base_scores)
    baseline_seconds = time.time() - t0

    t0 = time.time()
    log.info("candidate: evaluating %s on suite %s", candidate.describe(), suite.name)
    cand_scores = _score(candidate, suite, baseline, include_path)
    candidate_seconds = time.time() - t0

    verdict = decide(suite, base_scores, cand_scores, on_inconclusive)
    for m in verdict.metrics:
        log.info(
            "gate %s: %s %.4f -> %.4f (%s)",
            m.metric,
            m.verdict,
            m.baseline,
            m.candidate,
            m.reason,
        )
    return Judgement(
        verdict=verdict,
        baseline=base_scores,
        candidate=cand_scores,
        suite=suite.name,
        baseline_model=str(baseline.path),
        baseline_cached=cached,
        baseline_cache_file=cache_file,
        baseline_seconds=baseline_seconds,
        candidate_seconds=candidate_seconds,
    )
