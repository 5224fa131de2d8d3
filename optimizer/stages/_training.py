"""What the training stages (``qat``, ``distill``) share: the recipe fields of
:mod:`optimizer.techniques.train`, the training data as an input, resumable checkpoints and
the loss-curve output. Not a stage itself (the leading underscore keeps it out of ``STAGES``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer.inputs import Input, checkpoint_input, reference_input
from optimizer.plan import Environment, ModelPlan
from optimizer.stages.base import Stage, StageProblem, StageResult
from optimizer.techniques.train import DistillationLoss, TrainingConfig

if TYPE_CHECKING:
    from optimizer.context import StageContext


class TrainingStage(Stage, TrainingConfig, DistillationLoss):
    """Fine-tunes the model handed over; the runner saves the result (``transforms_model``)."""

    transforms_model = True
    distributed = True
    imports = ("modelopt.torch.quantization", "modelopt.torch.distill")

    def model_copies(self, before: ModelPlan | None) -> float:
        return 2.0  # the saved model and a training checkpoint of it

    def plan(self, prev: ModelPlan, env: Environment) -> tuple[ModelPlan, list[StageProblem]]:
        plan, problems = super().plan(prev, env)
        problems += training_problems(self, prev, env)
        dims = prev.dims
        if dims is not None and dims.num_hidden_layers is not None:
            for i, pair in enumerate(self.layer_losses):
                layer = _layer_index(pair.student)
                if layer is not None and layer >= dims.num_hidden_layers:
                    problems.append(
                        (
                            f"layer_losses[{i}].student",
                            f"{pair.student}: the model has {dims.num_hidden_layers} layers "
                            f"(0-{dims.num_hidden_layers - 1})",
                        )
                    )
        if not self.has_teacher:
            loss_fields = set(DistillationLoss.model_fields) & self.model_fields_set
            if loss_fields:
                problems.append(
                    (
                        sorted(loss_fields)[0],
                        f"{', '.join(sorted(loss_fields))} "
                        f"{'applies' if len(loss_fields) == 1 else 'apply'} only when "
                        "distilling from a teacher (teacher: original)",
                    )
                )
        return plan, problems

    @property
    def has_teacher(self) -> bool:
        raise NotImplementedError

    def inputs(self, base_dir: Path) -> list[Input]:
        return [self.data.as_input(base_dir)]

    def teacher_path(self, ctx: StageContext) -> Path | None:
        """The teacher's checkpoint, or None (no teacher)."""
        raise NotImplementedError

    def load_teacher(self, ctx: StageContext):
        """The teacher model in the compute dtype, or None."""
        from optimizer import models

        path = self.teacher_path(ctx)
        if path is None:
            return None
        ctx.log.info("teacher: %s", path)
        return models.load_model(path, ctx.state.compute_dtype, ctx.state.trust_remote_code)

    def run(self, ctx: StageContext) -> StageResult:
        from optimizer import hardware
        from optimizer.techniques.train import train
        from optimizer.training_data import build_splits, load_documents

        model = ctx.model()
        docs = load_documents(self.data, ctx.recipe.base_dir)
        splits = build_splits(self.data, docs, ctx.tokenizer(), self.seq_len, self.seed)
        ctx.log.info(
            "training data: %d windows of %d tokens (%d held out) from %s",
            len(splits.train),
            splits.seq_len,
            len(splits.heldout),
            self.data.dataset,
        )
        teacher = self.load_teacher(ctx)
        metrics = train(
            model,
            self,
            splits,
            output_dir=ctx.checkpoint_dir(),
            teacher=teacher,
            distillation=self if teacher is not None else None,
            bf16_autocast=hardware.gpu_present() and ctx.state.compute_dtype == "bfloat16",
        )
        del teacher
        gathered = metrics.pop("gathered_checkpoint", None)
        if gathered is not None:  # FSDP2: carry on with the gathered, unsharded model
            from optimizer import models

            ctx.state.model = models.load_model(
                Path(gathered), ctx.state.compute_dtype, ctx.state.trust_remote_code
            )
        ctx.log.info(
            "trained %d steps (%d this run, %s tokens) in %.0f s: held-out loss %.4f -> %.4f",
            metrics["steps"],
            metrics["steps_this_run"],
            f"{metrics['tokens']:,}",
            metrics["train_seconds"],
            metrics["before"]["heldout_loss"],
            metrics["after"]["heldout_loss"],
        )
        out = ctx.new_output("training")
        write_training_report(out, self.name, metrics)
        return StageResult(outputs={"training": out}, metrics=metrics)


def training_problems(
    config: TrainingConfig, prev: ModelPlan, env: Environment
) -> list[StageProblem]:
    """What any stage that trains (``qat``, ``distill``, ``speculative``) checks: its data,
    FSDP on this machine and model, the window length."""
    problems: list[StageProblem] = []
    msg = config.data.problem(env.base_dir)
    if msg:
        problems.append(("data.dataset", msg))
    if config.fsdp and env.gpu is False:
        problems.append(
            (
                "fsdp",
                "fsdp: true needs a CUDA GPU per process (accelerate runs CPU processes as plain "
                "DDP); set fsdp: false, or validate for a GPU machine with --device gpu",
            )
        )
    if config.fsdp and prev.sparsity:
        problems.append(
            (
                "fsdp",
                f"the model is {prev.sparsity} sparse: training it with fsdp: true cannot "
                "keep its zeros yet; set fsdp: false",
            )
        )
    dims = prev.dims
    limit = dims.max_position_embeddings if dims and not dims.rope_scaling else None
    if limit and config.seq_len > limit:
        problems.append(
            (
                "seq_len",
                f"seq_len {config.seq_len} exceeds the model's max_position_embeddings ({limit})",
            )
        )
    return problems


def model_source_input(key: str, source: str, base_dir: Path) -> Input:
    """A second model a stage reads (a teacher, a draft): a local checkpoint by content,
    a builtin:/hub source by name."""
    from optimizer import models

    local = models.local_dir(source, base_dir)
    return checkpoint_input(key, local) if local is not None else reference_input(key, source)


def other_vocabulary(source: str, base_dir: Path, prev: ModelPlan) -> int | None:
    """The vocabulary size of ``source`` when it differs from the model's (None: the same,
    or unknown before the run)."""
    from optimizer import models

    theirs = (models.peek_config(source, base_dir) or {}).get("vocab_size")
    ours = prev.dims.vocab_size if prev.dims is not None else None
    return theirs if theirs and ours and theirs != ours else None


def _layer_index(module: str) -> int | None:
    """``model.layers.11`` (or ``model.layers.11.mlp``) -> 11."""
    parts = module.split(".")
    for a, b in zip(parts, parts[1:], strict=False):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


def write_training_report(directory: Path, stage: str, metrics: dict[str, Any]) -> None:
    """``loss.png`` (training and held-out loss per step) and ``metrics.json``."""
    from optimizer.evaluation.report import loss_curve_png

    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (directory / "loss.png").write_bytes(loss_curve_png(stage, metrics))
