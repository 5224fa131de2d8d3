"""What every stage is: a pydantic config (its recipe section) with ``plan()``, ``inputs()``
and ``run(ctx)``.

Stages are found by module name: ``optimizer/stages/<name>.py`` defines the stage called
``<name>`` (see optimizer/stages/__init__.py), so a new stage type is one module here and one
test file, with no edit elsewhere. Stages never look at each other: validation threads a
:class:`~optimizer.plan.ModelPlan` through them (``plan(prev, env) -> (plan, problems)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from optimizer.inputs import Input
from optimizer.plan import Environment, ModelPlan

if TYPE_CHECKING:
    from optimizer.context import StageContext

#: ``(key path relative to the stage's section, message)``; an empty path is the stage.
StageProblem = tuple[str, str]


@dataclass
class StageResult:
    """What a stage hands back to the runner.

    ``outputs`` maps an output key to the *temporary* directory the stage wrote (obtained from
    ``ctx.new_output(key)``); the runner hashes it and renames it into place. ``metrics`` is
    any JSON-serialisable summary worth keeping in ``run.json``.
    """

    outputs: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    #: Set by a gate that rejected the model: the run finishes (artifacts are written) and
    #: exits 3 with this message.
    gate_failure: str | None = None


class Stage(BaseModel):
    """Base of all stages. Subclasses declare their recipe fields as pydantic fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ClassVar[str]
    #: The stage changes the model; the runner saves it afterwards so later stages (and a
    #: resumed run) start from exactly this state.
    transforms_model: ClassVar[bool] = False
    #: The stage leaves the in-memory model unusable (ModelOpt's exporters pack weights in
    #: place); later stages reload the last saved state instead.
    invalidates_model: ClassVar[bool] = False
    #: The stage reads the recipe's ``calibration`` section (its data is then an input).
    needs_calibration: ClassVar[bool] = False
    #: Later stages read what this stage made (the model, its files). A stage that only
    #: judges (the gate) sets False: redoing it does not redo the stages after it.
    feeds_later: ClassVar[bool] = True
    #: The stage runs on every process of a ``torchrun`` / ``accelerate launch`` job (it
    #: trains with DDP or FSDP2). The other ranks run the stages up to the last such stage
    #: and stop; rank 0 alone runs the rest and writes the run directory.
    distributed: ClassVar[bool] = False
    #: Output keys that are user-facing artifacts (listed in ``run.json["artifacts"]``).
    artifact_keys: ClassVar[tuple[str, ...]] = ()
    #: Heavy libraries the stage's run imports (beyond torch and transformers): the runner
    #: imports them before the first stage and reports that time apart
    #: (``run.json["startup"]``), so each stage's seconds are its own work.
    imports: ClassVar[tuple[str, ...]] = ()

    def plan(self, prev: ModelPlan, env: Environment) -> tuple[ModelPlan, list[StageProblem]]:
        """The model after this stage, and the problems visible before any model loads.

        ``prev`` is the plan after the stages before this one. Subclasses extend it:
        ``plan, problems = super().plan(prev, env)``, then check and update ``plan``.
        """
        problems: list[StageProblem] = []
        if self.transforms_model and prev.exports is not None:
            problems.append(
                (
                    "",
                    f"'{self.name}' comes after 'export', so its changes would not reach the "
                    "exported artifacts; move it before export",
                )
            )
        if self.needs_calibration and not env.has_calibration:
            problems.append(
                (
                    "",
                    f"'{self.name}' needs calibration data: add a top-level `calibration:` "
                    "section (dataset, num_samples, seq_len)",
                )
            )
        return prev, problems

    def inputs(self, base_dir: Path) -> list[Input]:
        """Files, directories, package versions and images this stage reads besides its
        recipe section and the model; their content is part of its fingerprint, so editing
        one makes ``--resume`` redo this stage. (Calibration data is added by the runner
        for stages with ``needs_calibration``.)"""
        return []

    def preflight(self) -> None:
        """Checks of this machine to run before any model loads (raise StageError)."""

    def model_copies(self, before: ModelPlan | None) -> float:
        """How many model-sized files this stage writes, at least, given the model ``before``
        it (the free-space check before a run multiplies it by the model's weight bytes in
        the recipe's dtype): the saved model after a stage that changes it."""
        return 1.0 if self.transforms_model else 0.0

    def artifacts(self, outputs: dict[str, dict[str, str]]) -> dict[str, str]:
        """``run.json["artifacts"]`` entries for committed ``outputs`` ({key: {path, sha256}})."""
        return {k: v["path"] for k, v in outputs.items() if k in self.artifact_keys}

    def preview(self, run_dir: Path, plan: ModelPlan) -> str | None:
        """The external command this stage would run, for ``--dry-run`` (None if none)."""
        return None

    def describe(self) -> str:
        """One line for logs and ``--dry-run``."""
        fields = ", ".join(f"{k}={v}" for k, v in self.model_dump(exclude_defaults=True).items())
        return f"{self.name}({fields})"

    def run(self, ctx: StageContext) -> StageResult:  # pragma: no cover - abstract
        raise NotImplementedError


def quantizing_problems(prev: ModelPlan, *, per_layer_formats: bool = False) -> list[StageProblem]:
    """What every quantizing stage refuses: a model an earlier stage already quantized, and
    (for per-layer format mixes) a mixture-of-experts family ModelOpt cannot mix."""
    from optimizer import architectures

    problems: list[StageProblem] = []
    if prev.quantization is not None:
        problems.append(
            ("", f"the model is already quantized by an earlier stage ({prev.quantization.by})")
        )
    model_type = prev.dims.model_type if prev.dims is not None else None
    if per_layer_formats and (problem := architectures.moe_mixed_problem(model_type)):
        problems.append(("", problem))
    return problems
