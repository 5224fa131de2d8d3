"""``qat``: quantization-aware training (QAT), or distillation (QAD) with ``teacher: original``.

Comes after a quantizing stage (``ptq`` or ``auto_quantize``): it fine-tunes the quantized
model with fake-quant in the loop, through ModelOpt's ``QATTrainer`` (cross-entropy on the
training data) or ``QADTrainer`` (logit distillation from the unquantized model as the recipe
loaded it; usually recovers more). Fields: :class:`~optimizer.techniques.train.TrainingConfig`
(data, steps or epochs, learning rate and schedule, batch, sequence length, seed, frozen
parameters, checkpoint cadence) and, for QAD, :class:`~optimizer.techniques.train.DistillationLoss`.
A killed run resumes from the last checkpoint with ``--resume``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from optimizer.plan import Environment, ModelPlan
from optimizer.stages._training import TrainingStage
from optimizer.stages.base import StageProblem

if TYPE_CHECKING:
    from pathlib import Path

    from optimizer.context import StageContext


class QAT(TrainingStage):
    """Fine-tune a quantized model with fake quantization in the loop."""

    name = "qat"
    #: ``original``: distil from the model as the recipe loaded it (QAD).
    teacher: Literal["none", "original"] = "none"

    @property
    def has_teacher(self) -> bool:
        return self.teacher == "original"

    def plan(self, prev: ModelPlan, env: Environment) -> tuple[ModelPlan, list[StageProblem]]:
        plan, problems = super().plan(prev, env)
        if prev.quantization is None:
            problems.append(
                (
                    "",
                    "qat fine-tunes a quantized model: put a ptq (or auto_quantize) stage before "
                    "it (to train an unquantized model towards a teacher, use distill)",
                )
            )
        return plan, problems

    def teacher_path(self, ctx: StageContext) -> Path | None:
        return ctx.state.source_path if self.has_teacher else None
