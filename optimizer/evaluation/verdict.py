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

``greedy_agreement`` (a suite metric of a generative task) needs no logprobs: per prompt, 1
if the candidate's greedy continuation is the baseline's (the same first ``max_gen_toks``
tokens), else 0. The baseline scores 1 on every prompt by definition, so the same rule
applies unchanged: ``max_drop: 0.1`` allows 10 % of prompts to diverge, ``min_value: 0.9``
asks for 90 % agreement (with the candidate's standard error). See :func:`agreement`.

:class:`Verdict` serialises (:meth:`Verdict.to_json`) to exactly the ``gate.json`` keys the
gate has always written.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from optimizer.evaluation.harness import SuiteScores, TaskScores, mean_stderr
from optimizer.evaluation.suite import GREEDY_AGREEMENT, Suite, Threshold

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


def agreement(base: TaskScores, cand: TaskScores) -> tuple[TaskScores, TaskScores]:
    """``greedy_agreement``'s per-document scores: the baseline's (1 each) and the
    candidate's (1 where its continuation equals the baseline's) over the prompts both
    generated for; the documents' hashes are kept for :func:`judge`'s check."""
    keys = sorted(set(base.outputs) & set(cand.outputs))
    if not keys:
        raise ValueError(
            "greedy_agreement: no generations to compare (a baseline cached before the metric "
            "kept its outputs? clear the baseline cache)"
        )
    hashes = {k: base.doc_hashes.get(k) for k in keys}
    cand_hashes = {k: cand.doc_hashes.get(k) for k in keys}
    agree = {k: float(cand.outputs[k] == base.outputs[k]) for k in keys}
    return (
        TaskScores.from_docs(dict.fromkeys(keys, 1.0), hashes),
        TaskScores.from_docs(agree, cand_hashes),
    )


def decide(
    suite: Suite,
    baseline: SuiteScores,
    candidate: SuiteScores,
    on_inconclusive: Literal["fail", "pass"] = "fail",
) -> Verdict:
    metrics = []
    for t in suite.tasks:
        base, cand = baseline[t.key], candidate[t.key]
        if t.metric != GREEDY_AGREEMENT:
            metrics.append(judge(t.key, base, cand, suite.threshold_for(t.key)))
            continue
        base, cand = agreement(base, cand)
        m = judge(t.key, base, cand, suite.threshold_for(t.key))
        same = round(m.candidate * m.n)
        reason = f"{same} of {m.n} greedy continuations equal the baseline's; {m.reason}"
        metrics.append(m.model_copy(update={"reason": reason}))
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
