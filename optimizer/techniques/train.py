"""Fine-tuning with transformers' ``Trainer`` through ModelOpt's trainer classes: QAT, QAD and
knowledge distillation as one function, usable without the runner.

Which trainer runs follows from the inputs, not from a flag:

| student quantized | teacher | trainer | loss |
|---|---|---|---|
| yes | none | ``QATTrainer`` | cross-entropy with fake-quant in the loop (QAT) |
| yes | a model | ``QADTrainer`` | logit distillation from the teacher (QAD) |
| no | a model | ``KDTrainer`` | logit distillation (after pruning, sparsity, or alone) |
| a draft head (``techniques.speculative``) | none | ``ModelOptHFTrainer`` | ModelOpt's EAGLE-3 / Medusa loss; the draft head alone trains |

ModelOpt's trainers bring mixed precision, gradient checkpointing, DDP and FSDP2 from
transformers/accelerate, and save ModelOpt state with every checkpoint. Its KD loss is logit
KD only; :class:`_LossTerms` adds what recipes ask beyond it (a cross-entropy share and
hidden-state losses between named layers) in one override, because ModelOpt's HF trainer has
no hook for them (its ``mtd.convert`` route does, but does not work with HF Trainer's loop).

Checkpoints go to ``output_dir`` every ``save_every`` steps (model with ModelOpt state,
optimizer, scheduler, RNG and data position); a call that finds one there resumes from it, so
a killed run continues where it stopped and ends where an uninterrupted run ends.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from optimizer import launch
from optimizer.errors import OptimizerError
from optimizer.registry import did_you_mean
from optimizer.training_data import Splits, TrainingData

log = logging.getLogger(__name__)

#: Where the evaluation before training is kept, so a resumed run reports it too.
BEFORE_FILE = "eval_before.json"
#: Where an FSDP2-trained model is gathered into one checkpoint (inside ``output_dir``).
GATHERED_DIR = "gathered"


# Upper bounds of the training settings: far above any real run, low enough that a typo
# (`steps: 1e9`, `learning_rate: 10`) or a hostile recipe is refused at validation instead
# of allocating, looping or diverging for hours. Floats are also refused when NaN or
# infinite (allow_inf_nan=False): NaN compares false with every bound.
MAX_STEPS = 10_000_000  # optimizer steps (also log_every / eval_every / save_every)
MAX_EPOCHS = 1_000.0
MAX_LEARNING_RATE = 1.0  # fine-tuning rates are ~1e-6..1e-3; above 1 every optimizer diverges
MAX_WEIGHT_DECAY = 10.0
MAX_GRAD_NORM = 1e6
MAX_BATCH_SIZE = 4_096  # windows per step per process (and gradient_accumulation)
MAX_SEQ_LEN = 1_048_576  # 2**20 tokens per window
MAX_TEMPERATURE = 100.0  # KD softmax temperature (usual: 1..10)
MAX_LOSS_WEIGHT = 1_000.0
MAX_SEED = 2**32 - 1  # numpy's seed range


class LayerLoss(BaseModel):
    """A hidden-state loss between a student module and a teacher module of the same width."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    student: str = Field(description="module name in the student, e.g. model.layers.11")
    teacher: str = Field(description="module name in the teacher, e.g. model.layers.23")
    weight: Annotated[float, Field(gt=0, le=MAX_LOSS_WEIGHT, allow_inf_nan=False)] = 1.0
    loss: Literal["mse", "cosine"] = "mse"


class DistillationLoss(BaseModel):
    """How the student learns from the teacher (ignored without one)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Softmax temperature of the logit KD loss.
    temperature: Annotated[float, Field(gt=0, le=MAX_TEMPERATURE, allow_inf_nan=False)] = 1.0
    #: Weight of the logit KD loss.
    kd_weight: Annotated[float, Field(ge=0, le=MAX_LOSS_WEIGHT, allow_inf_nan=False)] = 1.0
    #: Weight of the ordinary next-token cross-entropy on the data.
    ce_weight: Annotated[float, Field(ge=0, le=MAX_LOSS_WEIGHT, allow_inf_nan=False)] = 0.0
    #: Optional intermediate-layer losses.
    layer_losses: list[LayerLoss] = Field(default_factory=list)

    @model_validator(mode="after")
    def _some_loss(self) -> DistillationLoss:
        if self.kd_weight == 0 and self.ce_weight == 0 and not self.layer_losses:
            raise ValueError("kd_weight and ce_weight are both 0 and there are no layer_losses")
        return self


class TrainingConfig(BaseModel):
    """The training fields of a ``qat`` / ``distill`` recipe section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: TrainingData = Field(default_factory=TrainingData)
    #: Optimizer steps (each ``batch_size x gradient_accumulation`` windows per process).
    steps: Annotated[int, Field(gt=0, le=MAX_STEPS)] | None = None
    #: Passes over the training windows (instead of ``steps``).
    epochs: Annotated[float, Field(gt=0, le=MAX_EPOCHS, allow_inf_nan=False)] | None = None
    learning_rate: Annotated[float, Field(gt=0, le=MAX_LEARNING_RATE, allow_inf_nan=False)] = 1e-5
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    #: Share of the steps spent warming the learning rate up from 0.
    warmup_ratio: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.1
    weight_decay: Annotated[float, Field(ge=0, le=MAX_WEIGHT_DECAY, allow_inf_nan=False)] = 0.0
    max_grad_norm: Annotated[float, Field(gt=0, le=MAX_GRAD_NORM, allow_inf_nan=False)] = 1.0
    batch_size: Annotated[int, Field(gt=0, le=MAX_BATCH_SIZE)] = 8
    gradient_accumulation: Annotated[int, Field(gt=0, le=MAX_BATCH_SIZE)] = 1
    seq_len: Annotated[int, Field(gt=1, le=MAX_SEQ_LEN)] = 512
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = 0
    #: fnmatch patterns of parameter names to keep frozen (e.g. ``"*embed_tokens*"``).
    frozen: list[str] = Field(default_factory=list)
    gradient_checkpointing: bool = False
    #: Shard parameters, gradients and optimizer state over the processes of a multi-process
    #: launch with FSDP2 (for models whose training state does not fit one GPU); else each
    #: process holds a full copy (DDP).
    fsdp: bool = False
    #: Log the training loss every this many steps.
    log_every: Annotated[int, Field(gt=0, le=MAX_STEPS)] = 10
    #: Evaluate the held-out loss every this many steps (default: 5 times per run).
    eval_every: Annotated[int, Field(gt=0, le=MAX_STEPS)] | None = None
    #: Checkpoint every this many steps (default: 10 times per run), for resume.
    save_every: Annotated[int, Field(gt=0, le=MAX_STEPS)] | None = None

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainingConfig:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("set steps or epochs, not both")
        return self

    def total_steps(self, train_windows: int, world_size: int = 1) -> int:
        if self.steps is not None:
            return self.steps
        per_step = self.batch_size * self.gradient_accumulation * world_size
        return max(1, math.ceil(math.ceil(train_windows / per_step) * (self.epochs or 1.0)))


def train(
    model,
    config: TrainingConfig,
    splits: Splits,
    *,
    output_dir: Path,
    teacher=None,
    distillation: DistillationLoss | None = None,
    bf16_autocast: bool = False,
) -> dict[str, Any]:
    """Fine-tune ``model`` in place; return the metrics (loss curves, before/after, tokens).

    ``output_dir`` holds the Trainer's checkpoints; if one is there, training resumes from it.
    The model trains with float32 master weights (a bf16 model is cast up for the duration
    and back afterwards: Adam updates of 1e-5 are lost in bf16's 8-bit mantissa);
    ``bf16_autocast`` computes in bf16 on the GPU.
    """
    import torch
    from modelopt.torch.opt.plugins.transformers import ModelOptTrainerArguments
    from modelopt.torch.quantization.utils import is_quantized
    from transformers import TrainingArguments

    from optimizer.techniques import speculative

    distillation = distillation or DistillationLoss()
    quantized = is_quantized(model)
    # A model with a draft head trains that head alone (the base is frozen at conversion).
    draft = speculative.draft_head_method(model)
    if draft is not None and teacher is not None:
        raise OptimizerError(f"a {draft} draft head trains on the base's own outputs: no teacher")
    if teacher is None and not quantized and draft is None:
        raise OptimizerError(
            "nothing to train towards: the model is not quantized (QAT), has no draft head "
            "and there is no teacher"
        )
    splits = speculative.training_splits(model, splits)
    _check_frozen(model, config.frozen)
    if teacher is not None:
        _check_layers(model, teacher, distillation.layer_losses)
        _check_layer_widths(model, teacher, distillation.layer_losses)

    cuda = torch.cuda.is_available()
    world = launch.world_size()
    if config.fsdp and not cuda:
        raise OptimizerError(
            "fsdp: true needs CUDA GPUs (accelerate runs CPU processes as plain DDP); set "
            "fsdp: false here, or run on GPUs under torchrun / accelerate launch"
        )
    total = config.total_steps(len(splits.train), world)
    if config.fsdp and world == 1:
        log.warning("fsdp: true in a single process shards nothing; launch with torchrun")
    output_dir.mkdir(parents=True, exist_ok=True)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=total,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=int(config.warmup_ratio * total),
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.seed,
        gradient_checkpointing=config.gradient_checkpointing,
        # FSDP2, wrapping each decoder layer (transformers reads the model's _no_split_modules)
        fsdp="full_shard auto_wrap" if config.fsdp else "",
        fsdp_config={"version": 2} if config.fsdp else None,
        bf16=bool(bf16_autocast and cuda),
        use_cpu=not cuda,
        logging_steps=config.log_every,
        logging_first_step=True,
        eval_strategy="steps",
        eval_steps=config.eval_every or max(1, total // 5),
        save_strategy="steps",
        save_steps=config.save_every or max(1, total // 10),
        save_total_limit=2,
        report_to="none",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
    )
    if draft is not None:
        # The draft models' outputs (caches, per-step accuracies, lists of head logits) are
        # not logits the Trainer could gather; evaluation needs the loss only.
        args.prediction_loss_only = True

    restore_dtypes = _float32_master_weights(model)
    # A 2:4-sparse model (after sparsify) keeps its zeros: they are its masks.
    keep_zeros, unhook = _keep_zeros(model, fsdp=config.fsdp)
    if teacher is not None and not cuda:
        teacher.float()  # CPU autocast is off: both compute in float32
    if draft is not None:
        from modelopt.torch.opt.plugins.transformers import ModelOptHFTrainer as trainer_cls
    else:
        trainer_cls = _trainer_class(quantized=quantized, teacher=teacher is not None)
    kwargs: dict[str, Any] = {
        "model": model,
        "args": args,
        "train_dataset": splits.train,
        "eval_dataset": {
            "heldout": splits.heldout,
            "train": splits.train.head(len(splits.heldout)),
        },
        "trainer_args": ModelOptTrainerArguments(frozen_params=list(config.frozen) or None),
        "callbacks": [_progress_callback(total), *keep_zeros],
    }
    if teacher is not None:
        kwargs["distill_args"] = {
            "teacher_model": teacher,
            "temperature": distillation.temperature,
        }
    trainer = trainer_cls(**kwargs)
    if teacher is not None or draft is not None:
        # ModelOpt's KD and draft losses are per-micro-batch means that ignore
        # num_items_in_batch; with this False the Trainer divides them by the accumulation
        # steps as it must (and passes no num_items_in_batch into the model's forward).
        trainer.model_accepts_loss_kwargs = False
    _quiet_metric_dicts(trainer)
    if teacher is not None:
        trainer.setup_loss_terms(distillation, teacher)

    launch.barrier()  # rank 0 prepared output_dir (ctx.checkpoint_dir); all ranks now read it
    last = last_complete_checkpoint(output_dir)
    before_file = output_dir / BEFORE_FILE
    if last is not None and before_file.is_file():
        before = json.loads(before_file.read_text())
        log.info("resuming training from %s", Path(last).name)
    else:
        last = None
        with _collector_frozen():
            before = _evaluate(trainer)
        if trainer.args.should_save:
            before_file.write_text(json.dumps(before))
    resumed_from = int(Path(last).name.split("-")[-1]) if last else 0

    t0 = time.time()
    with _collector_frozen():
        trainer.train(resume_from_checkpoint=last)
        seconds = time.time() - t0
        after = _evaluate(trainer)
        if draft is not None:
            draft_summary = speculative.draft_metrics(model, splits.heldout, config.batch_size)
    restore_dtypes(model)
    sparse_layers = unhook()
    gathered = _save_gathered(trainer, output_dir / GATHERED_DIR) if config.fsdp else None

    steps_done = trainer.state.global_step
    tokens_per_step = config.batch_size * config.gradient_accumulation * world * splits.seq_len
    history = trainer.state.log_history
    return {
        "trainer": trainer_cls.__name__,
        "steps": steps_done,
        "resumed_from_step": resumed_from,
        "steps_this_run": steps_done - resumed_from,
        "world_size": world,
        "tokens": steps_done * tokens_per_step,
        "train_seconds": round(seconds, 1),  # this run's (after a resume: the rest)
        "before": before,
        "after": after,
        "loss_curve": [
            [h["step"], round(h["loss"], 5)] for h in history if "loss" in h and "step" in h
        ],
        # (by step: the evaluation after training repeats the last periodic one)
        "eval_curve": [
            [step, round(loss, 5)]
            for step, loss in {
                h["step"]: h["eval_heldout_loss"] for h in history if "eval_heldout_loss" in h
            }.items()
        ],
        "data": splits.summary(),
        **({"sparse_layers": sparse_layers} if sparse_layers else {}),
        **({"draft_head": draft_summary} if draft is not None else {}),
        # FSDP2: the live model is sharded; the trained model is this checkpoint instead.
        **({"gathered_checkpoint": gathered} if gathered else {}),
    }


def last_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest ``checkpoint-N`` the Trainer finished writing (``trainer_state.json`` is
    its last file), or None. Newer, half-written ones (a kill during a save) are deleted:
    resuming from one would fail on a truncated file, or restart at step 0 with step-N
    weights. Only rank 0 deletes."""
    import shutil

    if not output_dir.is_dir():
        return None
    found = sorted(
        (int(p.name.split("-")[1]), p)
        for p in output_dir.glob("checkpoint-*")
        if p.name.split("-")[1].isdigit()
    )
    for _, path in reversed(found):
        if (path / "trainer_state.json").is_file():
            return str(path)
        if launch.rank() == 0:
            log.info("dropping %s: written only in part (killed during a save)", path.name)
            shutil.rmtree(path, ignore_errors=True)
    return None


def _float32_master_weights(model):
    """Cast ``model`` to float32 for training; return the function that puts every tensor
    back in exactly the dtype it had (a bf16 load keeps rotary frequencies and
    keep-in-fp32 modules in float32, which a blanket ``.to(bf16)`` would round). The config's
    ``dtype`` follows: code that builds tensors from it (ModelOpt's EAGLE attention mask) would
    otherwise mix bf16 with the float32 weights."""
    import itertools

    import torch

    before = {
        name: t.dtype
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
    }
    config = getattr(model, "config", None)
    configs = [
        c
        for c in (config, getattr(config, "text_config", None))
        if c is not None and getattr(c, "dtype", None) is not None
    ]
    config_dtypes = [c.dtype for c in configs]
    model.float()
    for c in configs:
        c.dtype = torch.float32

    def restore(trained) -> None:
        for name, t in itertools.chain(trained.named_parameters(), trained.named_buffers()):
            dtype = before.get(name)
            if dtype is not None and t.dtype != dtype:
                t.data = t.data.to(dtype)
        for c, dtype in zip(configs, config_dtypes, strict=True):
            c.dtype = dtype

    return restore


def _keep_zeros(model, *, fsdp: bool):
    """Keep the zeros of every 2:4-sparse linear layer through training, as ModelOpt's sparse
    modules (``weight * mask``) would: pruned weights get no gradient (so clipping and Adam's
    moments see none), and a callback re-applies the masks after each optimizer step in case
    an optimizer moves a weight without gradient. Returns ``([callback] or [], unhook)``;
    ``unhook()`` removes the gradient hooks and returns the number of layers kept sparse."""
    import torch
    from transformers import TrainerCallback

    from optimizer.techniques.sparsify import sparse_masks

    modules = dict(model.named_modules())
    pairs = [(modules[name].weight, ~keep) for name, keep in sparse_masks(model).items()]
    if pairs and fsdp:  # FSDP2 replaces the parameters with shards the masks do not match
        raise OptimizerError("a 2:4-sparse model cannot train with fsdp: true yet; set fsdp: false")
    handles = [p.register_hook(lambda g, m=m: g.masked_fill(m, 0)) for p, m in pairs]

    class KeepZeros(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            with torch.no_grad():
                for p, pruned in pairs:
                    p.masked_fill_(pruned, 0)

    def unhook() -> int:
        for h in handles:
            h.remove()
        return len(pairs)

    if pairs:
        log.info("keeping the 2:4 zeros of %d sparse linear layers", len(pairs))
    return ([KeepZeros()] if pairs else []), unhook


def _save_gathered(trainer, directory: Path) -> str:
    """After FSDP2 training every process holds a shard of the model: gather the full
    weights into ``directory`` (ModelOpt's ``save_model`` switches to a full state dict and
    writes ModelOpt state; every rank takes part, rank 0 writes)."""
    trainer.save_model(str(directory))
    launch.barrier()
    return str(directory)


@contextlib.contextmanager
def _collector_frozen():
    """ModelOpt's QAT trainer runs ``gc.collect()`` before every step and every eval batch:
    0.7 s here with torch and transformers loaded, more than a training step of a 135M model
    on an H200. Objects that exist before training never become garbage during it, so they
    are moved out of the collector's sight for the duration (``gc.freeze``)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _evaluate(trainer) -> dict[str, float]:
    """Held-out and training-sample losses, rounded (what ``before``/``after`` report)."""
    metrics = trainer.evaluate()
    keep = ("eval_heldout_loss", "eval_train_loss", "eval_heldout_ce_loss", "eval_train_ce_loss")
    return {k.removeprefix("eval_"): round(float(metrics[k]), 5) for k in keep if k in metrics}


def _check_frozen(model, patterns: list[str]) -> None:
    import fnmatch

    names = [n for n, _ in model.named_parameters()]
    for p in patterns:
        if not any(fnmatch.fnmatch(n, p) for n in names):
            raise OptimizerError(
                f"frozen pattern {p!r} matches no parameter (parameters look like {names[0]!r})"
            )


def _check_layers(model, teacher, layers: list[LayerLoss]) -> None:
    for which, module in (("student", model), ("teacher", teacher)):
        names = dict(module.named_modules())
        for pair in layers:
            name = getattr(pair, which)
            if name not in names:
                raise OptimizerError(
                    f"layer_losses: the {which} has no module {name!r}"
                    f"{did_you_mean(name, list(names))}"
                )


def _check_layer_widths(model, teacher, layers: list[LayerLoss]) -> None:
    """Pairs of different widths (a student pruned in hidden_size against the unpruned
    teacher), found with one two-token forward before training rather than at step 1."""
    import torch

    if not layers:
        return
    widths: dict[tuple[str, str], int] = {}
    handles = []
    for which, module in (("student", model), ("teacher", teacher)):
        names = dict(module.named_modules())
        for pair in layers:
            name = getattr(pair, which)

            def hook(mod, args, output, key=(which, name)):
                out = output[0] if isinstance(output, tuple) else output
                widths[key] = out.shape[-1]

            handles.append(names[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            for module in (model, teacher):
                ids = torch.tensor([[0, 0]], device=next(module.parameters()).device)
                module(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    for pair in layers:
        s, t = widths.get(("student", pair.student)), widths.get(("teacher", pair.teacher))
        if s is not None and t is not None and s != t:
            raise OptimizerError(
                f"layer_losses: {pair.student} outputs {s} channels and the teacher's "
                f"{pair.teacher} {t}; a layer loss pairs modules of the same width (after "
                "pruning hidden_size, distil on logits only: drop layer_losses)"
            )


def _progress_callback(total: int):
    """Training progress into the optimizer log (console and run.log): step, loss, lr."""
    from transformers import TrainerCallback

    class LogToLogger(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            if "loss" in logs:
                log.info(
                    "step %d/%d: loss %.4f, lr %.2e",
                    state.global_step,
                    total,
                    logs["loss"],
                    logs.get("learning_rate", 0.0),
                )
            elif "eval_heldout_loss" in logs:
                log.info(
                    "step %d/%d: held-out loss %.4f",
                    state.global_step,
                    total,
                    logs["eval_heldout_loss"],
                )

    return LogToLogger()


def _quiet_metric_dicts(trainer) -> None:
    """Keep the Trainer's progress bars but not its raw metric dicts on stdout (one per log
    step and per eval set): the progress callback logs one readable line instead."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class BarsOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(BarsOnly())


def _trainer_class(*, quantized: bool, teacher: bool):
    from modelopt.torch.distill.plugins.huggingface import KDTrainer
    from modelopt.torch.quantization.plugins.transformers_trainer import QADTrainer, QATTrainer

    if not teacher:
        return QATTrainer
    base = QADTrainer if quantized else KDTrainer
    return type(base.__name__, (_LossTerms, base), {})


class _LossTerms:
    """Recipe loss terms on top of ModelOpt's logit KD: ``kd_weight * KD + ce_weight * CE +
    sum(weight * layer loss)``. Layer outputs are caught with forward hooks on the unwrapped
    student and teacher modules (so DDP/FSDP wrapping does not change the names)."""

    def setup_loss_terms(self, loss: DistillationLoss, teacher) -> None:
        self._loss = loss
        self._caught: dict[tuple[str, int], Any] = {}
        student = self.accelerator.unwrap_model(self.model)
        for i, pair in enumerate(loss.layer_losses):
            for which, model, name in (("s", student, pair.student), ("t", teacher, pair.teacher)):
                module = dict(model.named_modules())[name]
                module.register_forward_hook(self._catcher((which, i)))

    def _catcher(self, key):
        def hook(module, args, output):
            self._caught[key] = output[0] if isinstance(output, tuple) else output

        return hook

    def _standard_kd_loss(self, outputs, labels, **kwargs):
        import torch.nn.functional as F

        cfg = self._loss
        loss = cfg.kd_weight * super()._standard_kd_loss(outputs, labels, **kwargs)
        if cfg.ce_weight and labels is not None:
            logits = outputs.logits[..., :-1, :].float()
            ce = F.cross_entropy(logits.flatten(0, 1), labels[..., 1:].flatten(), ignore_index=-100)
            loss = loss + cfg.ce_weight * ce
        for i, pair in enumerate(cfg.layer_losses):
            s, t = self._caught.pop(("s", i)), self._caught.pop(("t", i)).detach()
            if s.shape != t.shape:
                raise OptimizerError(
                    f"layer_losses: {pair.student} {tuple(s.shape)} and teacher {pair.teacher} "
                    f"{tuple(t.shape)} differ in shape; pair modules of the same width"
                )
            s, t = s.float(), t.float()
            if pair.loss == "mse":
                term = F.mse_loss(s, t)
            else:
                term = (1 - F.cosine_similarity(s, t, dim=-1)).mean()
            loss = loss + pair.weight * term
        return loss
