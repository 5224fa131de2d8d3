"""``distill``: knowledge distillation from a teacher into the current model.

The student is the model as the stages before left it (after ``prune``, ``sparsify``, or the
source model alone); the teacher is the model as the recipe loaded it (``teacher: original``,
the default) or any model source (a local checkpoint, ``org/name`` on the hub, ``builtin:``).
Loss: ``kd_weight`` x logit KD at ``temperature`` + ``ce_weight`` x cross-entropy on the data
+ optional hidden-state ``layer_losses`` between named modules, through ModelOpt's
``KDTrainer`` (``QADTrainer`` if the student is quantized). Training fields as for ``qat``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from optimizer.inputs import Input
from optimizer.plan import Environment, ModelPlan
from optimizer.stages._training import TrainingStage, model_source_input, other_vocabulary
from optimizer.stages.base import StageProblem

if TYPE_CHECKING:
    from pathlib import Path

    from optimizer.context import StageContext

ORIGINAL = "original"


class Distill(TrainingStage):
    """Distil a teacher's next-token distribution into the current model."""

    name = "distill"
    teacher: str = Field(
        ORIGINAL,
        description="'original' (the model as the recipe loaded it) or a model source",
    )

    @property
    def has_teacher(self) -> bool:
        return True

    def plan(self, prev: ModelPlan, env: Environment) -> tuple[ModelPlan, list[StageProblem]]:
        from optimizer import models

        plan, problems = super().plan(prev, env)
        if self.teacher != ORIGINAL:
            msg = models.check_source(self.teacher, env.base_dir)
            if msg:
                problems.append(("teacher", f"{msg} (or 'original': the recipe's model)"))
            elif theirs := other_vocabulary(self.teacher, env.base_dir, prev):
                problems.append(
                    (
                        "teacher",
                        f"the teacher's vocabulary ({theirs} tokens) differs from the "
                        f"student's ({prev.dims.vocab_size}); logit distillation needs the "
                        "same tokenizer",
                    )
                )
        return plan, problems

    def inputs(self, base_dir: Path) -> list[Input]:
        inputs = super().inputs(base_dir)
        if self.teacher != ORIGINAL:
            inputs.append(model_source_input("teacher", self.teacher, base_dir))
        return inputs

    def teacher_path(self, ctx: StageContext) -> Path | None:
        from optimizer import models

        if self.teacher == ORIGINAL:
            return ctx.state.source_path
        return models.resolve_source(self.teacher, ctx.recipe.base_dir).path
