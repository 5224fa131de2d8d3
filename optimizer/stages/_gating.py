"""What the ``gate`` and ``search`` stages share (not a stage: the underscore keeps it out of
``STAGES``): the accuracy criteria of a recipe section (suite, thresholds, limit), the
inputs they read, and the baseline a run compares against."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from optimizer.errors import OptimizerError
from optimizer.inputs import Input, dir_input, file_input, package_input

if TYPE_CHECKING:
    from optimizer.context import ModelState
    from optimizer.evaluation import BaselineRef, Suite


class GateCriteria(BaseModel):
    """The accuracy criteria: a suite and the recipe's overrides of it."""

    suite: str = Field(
        description="suite YAML (tasks, metrics, limits, thresholds), relative to the recipe"
    )
    max_drop: dict[str, float] = Field(
        default_factory=dict,
        description="absolute-drop thresholds overriding the suite's, by 'task/metric' or 'default'",
    )
    limit: int | None = Field(None, gt=0, description="documents per task, overriding the suite")
    on_inconclusive: Literal["fail", "pass"] = "fail"

    def suite_path(self, base_dir: Path) -> Path:
        """The suite file: a path (absolute, or relative to the recipe, then the cwd) or, when
        no such file exists, a shipped suite by name (``quick``: optimizer/resources/suites)."""
        from optimizer.evaluation import resolve_suite

        return resolve_suite(self.suite, base_dir)

    def suite_problems(self, base_dir: Path) -> list[tuple[str, str]]:
        from optimizer.evaluation import load_suite

        try:
            load_suite(self.suite_path(base_dir))
        except OptimizerError as e:
            return [("suite", str(e))]
        return []

    def effective_suite(self, base_dir: Path) -> Suite:
        """The suite with this section's limit and thresholds applied."""
        from optimizer.evaluation import apply_overrides, load_suite

        return apply_overrides(
            load_suite(self.suite_path(base_dir)), limit=self.limit, max_drop=self.max_drop
        )

    def suite_inputs(self, base_dir: Path) -> list[Input]:
        """The suite file, the shipped tasks and data, lm-eval, and the suite's own tasks."""
        from optimizer.evaluation import LOCAL_TASKS, load_suite
        from optimizer.evaluation.harness import task_data_dir

        suite_file = self.suite_path(base_dir)
        inputs = [
            file_input("suite", suite_file),
            dir_input("tasks", LOCAL_TASKS),
            dir_input("task_data", task_data_dir()),
            package_input("lm-eval"),
        ]
        tasks_dir = load_suite(suite_file).tasks_dir  # validated with the recipe
        if tasks_dir is not None:
            inputs.append(dir_input("suite_tasks", Path(tasks_dir)))
        return inputs


def baseline_of(state: ModelState) -> BaselineRef:
    """The run's baseline: the recipe's source model, in the run's dtypes."""
    from optimizer.evaluation import BaselineRef

    assert state.source_path is not None
    return BaselineRef(
        path=state.source_path,
        fingerprint=state.source_fingerprint,
        dtype=state.dtype,
        compute_dtype=state.compute_dtype,
        trust_remote_code=state.trust_remote_code,
    )
