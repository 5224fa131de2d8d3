"""The accuracy verdict: paired statistics of candidate vs baseline per metric.

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

:class:`Verdict` serialises (:meth:`Verdict.to_json`) to exactly the ``gate.json`` keys the
gate has always written.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from optimizer.evaluation.harness import SuiteScores, TaskScores, mean_stderr
from optimizer.evaluation.suite import Suite, Threshold

Z_DECIDE = 1.645  # one-sided 95 %
Z_INTERVAL = 1.96  # two-sided 95 % for the reported interval
RULE = (
    "paired per-document difference; pass if drop + 1.645*SE <= allowed, fail if "
    "drop - 1.645*SE > allowed, else inconclusive"
)

Outcome = Literal["pass", "fail", "inconclusive"]


class MetricVerdict(BaseModel):
    """One metric's comparison (field order is ``gate.json``'s key order)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str
    n: int
    baseline: float
    candidate: float
    delta: float
    delta_stderr: float
    delta_ci95: tuple[float, float]
    threshold: dict[str, float]
    #: The absolute drop allowed (drop thresholds only; a floor has none).
    allowed_drop: float | None = None
    reason: str
    verdict: Outcome


class Verdict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    passed: bool
    failing: list[str]
    on_inconclusive: Literal["fail", "pass"]
    rule: str
    metrics: list[MetricVerdict]

    def to_json(self) -> dict[str, Any]:
        """``gate.json`` (without its ``meta``): the keys it has always had."""
        return self.model_dump(mode="json", exclude_none=True)


def _paired(base: TaskScores, cand: TaskScores) -> tuple[list[float], list[float]]:
    keys = sorted(set(base.docs) & set(cand.docs))
    if not keys:
        raise ValueError("baseline and candidate share no documents")
    for k in keys:
        hb, hc = base.doc_hashes.get(k), cand.doc_hashes.get(k)
        if hb and hc and hb != hc:
            raise ValueError(f"document {k} differs between baseline and candidate evaluations")
    return [base.docs[k] for k in keys], [cand.docs[k] for k in keys]


def judge(key: str, base: TaskScores, cand: TaskScores, threshold: Threshold) -> MetricVerdict:
    b, c = _paired(base, cand)
    base_mean, _ = mean_stderr(b)
    cand_mean, cand_se = mean_stderr(c)
    delta, se = mean_stderr([y - x for x, y in zip(b, c, strict=True)])
    allowed: float | None = None
    verdict: Outcome
    if threshold.min_value is not None:
        low, high, limit = (
            cand_mean - Z_DECIDE * cand_se,
            cand_mean + Z_DECIDE * cand_se,
            threshold.min_value,
        )
        verdict = "pass" if low >= limit else "fail" if high < limit else "inconclusive"
        reason = f"candidate {cand_mean:.4f} ± {Z_DECIDE * cand_se:.4f} vs floor {limit:.4f}"
    else:
        allowed = (
            threshold.max_drop
            if threshold.max_drop is not None
            else threshold.max_relative_drop * base_mean  # type: ignore[operator]
        )
        drop = -delta
        verdict = (
            "pass"
            if drop + Z_DECIDE * se <= allowed
            else "fail"
            if drop - Z_DECIDE * se > allowed
            else "inconclusive"
        )
        reason = f"drop {drop:+.4f} ± {Z_DECIDE * se:.4f} (95 % one-sided) vs allowed {allowed:.4f}"
    return MetricVerdict(
        metric=key,
        n=len(b),
        baseline=base_mean,
        candidate=cand_mean,
        delta=delta,
        delta_stderr=se,
        delta_ci95=(delta - Z_INTERVAL * se, delta + Z_INTERVAL * se),
        threshold=threshold.model_dump(exclude_none=True),
        allowed_drop=allowed,
        reason=reason,
        verdict=verdict,
    )


def decide(
    suite: Suite,
    baseline: SuiteScores,
    candidate: SuiteScores,
    on_inconclusive: Literal["fail", "pass"] = "fail",
) -> Verdict:
    metrics = [
        judge(t.key, baseline[t.key], candidate[t.key], suite.threshold_for(t.key))
        for t in suite.tasks
    ]
    failing = [
        m.metric
        for m in metrics
        if m.verdict == "fail" or (m.verdict == "inconclusive" and on_inconclusive == "fail")
    ]
    return Verdict(
        passed=not failing,
        failing=failing,
        on_inconclusive=on_inconclusive,
        rule=RULE,
        metrics=metrics,
    )
