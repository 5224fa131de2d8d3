"""Evaluation suites (``evals/suites/*.yaml``): tasks, metrics, limits, shots, thresholds.

A suite is immutable; :func:`apply_overrides` makes the copy a gate or ``optimize gate``
asks for (another limit, other absolute-drop thresholds), and :meth:`Suite.settings` is the
one place that says which limit and number of shots a task is evaluated with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    model_validator,
)

from optimizer import batching
from optimizer.errors import OptimizerError

#: The metric that compares a candidate's greedy continuations with the baseline's on a
#: generative task, prompt by prompt (1 where the continuations are identical: the same first
#: ``max_gen_toks`` greedy tokens, or the same tokens up to a stop sequence). It needs no
#: logprobs; the baseline scores 1 by definition, see :mod:`optimizer.evaluation.verdict`.
GREEDY_AGREEMENT = "greedy_agreement"


class Threshold(BaseModel):
    """One rule per metric: an absolute drop, a relative drop, or a floor.

    The gate's metrics are accuracy-like scores in [0, 1] (acc, exact_match,
    greedy_agreement), so every bound lies in [0, 1] too, and NaN / infinity are refused: a
    NaN threshold would compare false with every drop and silently pass or fail everything.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_drop: float | None = Field(
        None, ge=0, le=1, allow_inf_nan=False, description="allowed baseline - candidate (absolute)"
    )
    max_relative_drop: float | None = Field(
        None, ge=0, lt=1, allow_inf_nan=False, description="allowed drop / baseline"
    )
    min_value: float | None = Field(
        None, ge=0, le=1, allow_inf_nan=False, description="the candidate must score at least this"
    )

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
    max_gen_toks: int | None = Field(
        None,
        gt=0,
        description="generative tasks: tokens generated per prompt (the task's own if unset); "
        "for greedy_agreement the N of 'the first N greedy tokens agree'",
    )

    @property
    def key(self) -> str:
        """The metric's name in scores, verdicts and thresholds: ``task/metric``."""
        return f"{self.task}/{self.metric}"


class TaskSettings(NamedTuple):
    """How a task is evaluated: documents (None: all) and few-shot examples (None: the
    task's default)."""

    limit: int | None
    num_fewshot: int | None


#: A suite's ``batch_size: auto`` where nothing is measured: a CPU, a model spread over devices.
DEFAULT_BATCH_SIZE = 16


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str | None = None
    limit: int | None = Field(None, gt=0, description="docs per task unless the task sets its own")
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: Annotated[int | Literal["auto"], PlainValidator(batching.parse)] = Field(
        "auto",
        description="rows per forward; auto: as many as fit in half the free GPU memory (the "
        "widest row's forward measured, at most 64), 16 on a CPU or a model spread over devices",
    )
    max_length: int = Field(2048, gt=0)
    tasks: list[SuiteTask] = Field(min_length=1)
    thresholds: dict[str, Threshold] = Field(
        default_factory=lambda: {"default": Threshold(max_drop=0.01)}
    )
    tasks_dir: str | None = Field(
        None,
        description="a directory of your own lm-eval task YAMLs (with their data), relative to "
        "the suite file; searched after the shipped tasks",
    )

    @model_validator(mode="after")
    def _known_threshold_keys(self):
        problem = unknown_threshold_key(self, self.thresholds)
        if problem:
            raise ValueError(f"thresholds: {problem}")
        return self

    @property
    def metric_keys(self) -> list[str]:
        """The ``task/metric`` keys a threshold may name (besides ``default``)."""
        return [t.key for t in self.tasks]

    def threshold_for(self, key: str) -> Threshold:
        return (
            self.thresholds.get(key) or self.thresholds.get("default") or Threshold(max_drop=0.01)
        )

    def settings(self, task: SuiteTask) -> TaskSettings:
        """The task's effective limit and shots: its own where set, else the suite's."""
        return TaskSettings(
            task.limit or self.limit,
            task.num_fewshot if task.num_fewshot is not None else self.num_fewshot,
        )


def unknown_threshold_key(suite: Suite, keys) -> str | None:
    """A message for the first of ``keys`` that names no ``task/metric`` of ``suite`` (and
    is not ``default``), with a did-you-mean and the known keys; None when all are known. A
    threshold for a metric the suite does not measure would never be applied: a typo in it
    would silently leave the default in force."""
    from optimizer.registry import did_you_mean

    known = suite.metric_keys
    for key in keys:
        if key != "default" and key not in known:
            hint = did_you_mean(str(key), [*known, "default"])
            return (
                f"{key!r} is not a metric of suite {suite.name!r}{hint} "
                f"(known: default, {', '.join(known)})"
            )
    return None


def override_problems(suite: Suite, max_drop: dict) -> list[tuple[str, str]]:
    """What is wrong with a gate's ``max_drop`` overrides for ``suite``: ``(key, message)``
    pairs (empty when none). Each value must be a finite drop in [0, 1] and each key
    ``default`` or one of the suite's ``task/metric``."""
    import math

    problems = []
    for key, value in max_drop.items():
        if key != "default" and key not in suite.metric_keys:
            problems.append((str(key), unknown_threshold_key(suite, [key]) or ""))
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append((str(key), f"must be a number in [0, 1], not {value!r}"))
        elif not math.isfinite(value) or not 0 <= value <= 1:
            problems.append(
                (
                    str(key),
                    f"must be an absolute drop in [0, 1] (metrics are accuracy-like scores), "
                    f"not {value!r}",
                )
            )
    return problems


def resolve_suite(ref: str, base_dir: Path) -> Path:
    """A suite reference: a path (see ``resources.local_path``) or, when no such file exists,
    a shipped suite's name (an unknown name: OptimizerError with a did-you-mean)."""
    from optimizer import resources

    path = resources.local_path(ref, base_dir)
    if path.exists() or not resources.is_name(ref):
        return path
    return resources.suite(ref)


def load_suite(path: Path) -> Suite:
    """Read a suite file; its ``tasks_dir`` becomes an absolute path (it must exist)."""
    import yaml

    try:
        suite = Suite.model_validate(yaml.safe_load(Path(path).read_text()))
    except FileNotFoundError:
        raise OptimizerError(f"suite file not found: {path}") from None
    except ValidationError as e:  # one line: the first problem, by key path
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise OptimizerError(
            f"invalid suite {path}: {where + ': ' if where else ''}{msg}"
        ) from None
    except Exception as e:  # yaml, or a hostile file: either way the suite file is wrong
        reason = " ".join(str(e).split()) or type(e).__name__
        raise OptimizerError(f"invalid suite {path}: {reason}") from None
    if suite.tasks_dir is not None:
        tasks_dir = (Path(path).parent / Path(suite.tasks_dir).expanduser()).resolve()
        if not tasks_dir.is_dir():
            raise OptimizerError(f"invalid suite {path}: tasks_dir {tasks_dir} is not a directory")
        suite = suite.model_copy(update={"tasks_dir": str(tasks_dir)})
    return suite


def apply_overrides(
    suite: Suite, *, limit: int | None = None, max_drop: dict[str, float] | None = None
) -> Suite:
    """``suite`` with a gate's overrides: ``limit`` documents for every task (tasks' own
    limits included), and absolute-drop thresholds by ``task/metric`` or ``default``
    replacing the suite's for those keys."""
    updates: dict = {}
    if limit is not None:
        if limit <= 0:
            raise OptimizerError(f"limit must be a positive number of documents, not {limit}")
        updates["limit"] = limit
        updates["tasks"] = [t.model_copy(update={"limit": None}) for t in suite.tasks]
    if max_drop:
        problems = override_problems(suite, max_drop)
        if problems:
            key, msg = problems[0]
            raise OptimizerError(f"max_drop {key}: {msg}")
        try:
            overrides = {k: Threshold(max_drop=v) for k, v in max_drop.items()}
        except ValidationError as e:
            raise OptimizerError(f"max_drop {max_drop}: {e.errors()[0]['msg']}") from None
        updates["thresholds"] = {**suite.thresholds, **overrides}
    return suite.model_copy(update=updates)
