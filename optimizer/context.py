"""What a running stage sees: the recipe, the run directory, and the model handed over from
the previous stage (loaded lazily from its saved checkpoint after a resume)."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimizer import batching, calibration, launch, models
from optimizer.plan import ModelPlan
from optimizer.recipe import Recipe
from optimizer.rundir import RunDirectory

log = logging.getLogger(__name__)


@dataclass
class ModelState:
    """The model as it stands between stages.

    ``checkpoint`` is always a directory that reproduces the current state exactly (the
    source checkpoint, or the last transforming stage's save with ModelOpt state); ``model`` is
    the same state in memory when it has been loaded.
    """

    checkpoint: Path
    #: The recipe's dtype: what every saved and exported artifact is stored in.
    dtype: str
    trust_remote_code: bool = False
    #: What the model computes in while in memory (optimizer.hardware.compute_dtype);
    #: defaults to ``dtype``.
    compute_dtype: str = ""
    #: The recipe's unmodified model (what the gate compares against) and its identity.
    source_path: Path | None = None
    source_fingerprint: str = ""
    model: Any = None
    tokenizer: Any = None
    calibration_tokens: Any = None
    #: The recipe's ``model.max_memory`` in bytes (``{"gpu": ..., "cpu": ...}``), or None:
    #: where the stages' loads place the weights (see models.placement).
    max_memory: dict[str, int] | None = None

    def __post_init__(self) -> None:
        self.compute_dtype = self.compute_dtype or self.dtype

    def drop_model(self) -> None:
        """Forget the model in memory (the next :meth:`StageContext.model` loads
        ``checkpoint``) and give back what it held (optimizer.hardware.release_memory); the
        caller drops its own references first."""
        from optimizer.hardware import release_memory

        if self.model is not None:
            self.model = None
            release_memory()


@dataclass
class StageContext:
    recipe: Recipe
    directory: RunDirectory
    index: int
    state: ModelState
    #: The plan before this stage (what validation knew of the model), when validated.
    plan: ModelPlan | None = None
    temp_outputs: dict[str, Path] = field(default_factory=dict)
    #: This stage's fingerprint (what its resumable checkpoints are valid for).
    fingerprint: str = ""
    #: ``(name, metrics)`` of the stages before this one that have metrics (for reports).
    earlier_metrics: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: The run's artifacts so far (``run.json["artifacts"]``: key -> path), e.g. the
    #: ``hf_checkpoint`` an earlier export wrote.
    artifacts: dict[str, str] = field(default_factory=dict)
    #: The calibration batch size :meth:`forward_loop` chose (a ``batching.Choice``).
    calibration_choice: Any = None

    @property
    def run_dir(self) -> Path:
        return self.directory.path

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"optimizer.stages.{self.recipe.stages[self.index].name}")

    def model(self):
        if self.state.model is None:
            log.info("loading model from %s", self.state.checkpoint)
            self.state.model = models.load_model(
                self.state.checkpoint,
                self.state.compute_dtype,
                self.state.trust_remote_code,
                max_memory=self.state.max_memory,
            )
        return self.state.model

    def tokenizer(self):
        if self.state.tokenizer is None:
            self.state.tokenizer = models.load_tokenizer(
                self.state.checkpoint, self.state.trust_remote_code
            )
        return self.state.tokenizer

    def calibration_tokens(self):
        """``[num_samples, seq_len]`` tokens from the recipe's calibration section (cached)."""
        spec = self.recipe.calibration
        if spec is None:  # stage.check() refuses such recipes; this guards direct API use
            raise RuntimeError("this stage needs a calibration section")
        if self.state.calibration_tokens is None:
            texts = calibration.load_texts(spec, self.recipe.base_dir)
            self.state.calibration_tokens = calibration.tokenize(spec, texts, self.tokenizer())
            log.info(
                "calibration: %d samples x %d tokens from %s",
                spec.num_samples,
                spec.seq_len,
                spec.dataset,
            )
        return self.state.calibration_tokens

    def forward_loop(self, *, measured: bool = True):
        """ModelOpt's calibration loop over the recipe's windows. With ``batch_size: auto``
        one window's forward is measured first, on the model as it is now: call this before
        the quantizers are inserted (``quantize(model, cfg, ctx.forward_loop())`` does).
        ``measured=False`` (a stage that calibrates a copy of the model while the original
        stays resident), or a ``model.max_memory`` cap (the user's budget, not the free
        memory): the fixed size of :meth:`calibration_batch_size`."""
        assert self.recipe.calibration is not None
        tokens = self.calibration_tokens()
        if measured and self.state.max_memory is None:
            choice = calibration.choose_batch_size(
                self.model(), tokens, self.recipe.calibration.batch_size
            )
        else:
            why = "under model.max_memory" if measured else "a copy of the model calibrates"
            size = self.calibration_batch_size()
            choice = batching.Choice(size, measured=False, reason=why)
        self.calibration_choice = choice
        log.info("calibration: %s", choice.describe())
        return calibration.forward_loop(tokens, choice.batch_size)

    def calibration_batch_size(self) -> int:
        """Windows per batch for the stages that batch calibration data for more than a
        forward (gradients, full logits): the recipe's number, 8 for ``auto``."""
        assert self.recipe.calibration is not None
        return batching.fixed(self.recipe.calibration.batch_size, calibration.DEFAULT_BATCH_SIZE)

    def checkpoint_dir(self) -> Path:
        """A directory for the stage's own checkpoints that survives a killed run: kept while
        the stage's fingerprint is unchanged (a resumed stage continues from it), emptied when
        it changed, removed by the runner once the stage commits. Rank 0 prepares it; every
        rank gets the same path (only the Trainer's main process writes there)."""
        path = self.directory.checkpoints(self.index, self.recipe.stages[self.index].name)
        marker = path / "FINGERPRINT"
        # The number of processes is part of it: data order, RNG files and steps follow it.
        valid_for = f"{self.fingerprint} world_size={launch.world_size()}"
        if self.directory.writer and path.is_symlink():
            path.unlink()  # the run directory is a trust boundary: never write through a link
        stale = not marker.is_file() or marker.read_text() != valid_for
        if self.directory.writer and stale:
            if path.exists():
                log.info("discarding checkpoints of a different %s configuration", path.name)
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True, exist_ok=True)
            marker.write_text(valid_for)
        return path

    def new_output(self, key: str) -> Path:
        """A fresh temporary directory for output ``key``; the runner renames it into place
        only after the stage succeeds, so a crash never leaves a half-written artifact."""
        tmp = self.directory.temp_output(self.index, key)
        self.temp_outputs[key] = tmp
        return tmp
