"""Runs a recipe's stages in order inside a run directory, with resume.

Resume rule: a stage is skipped when the previous run recorded it as finished with the same
*fingerprint* — a hash of its recipe section, the model's identity and dtypes, the inputs it
declares (calibration data, suite and task files, images, see ``Stage.inputs``), the package
versions that compute it, and the fingerprint and committed outputs' sha256 of the last
earlier stage whose results later stages read — and its recorded outputs are still on disk
with the recorded sha256. Because
fingerprints chain, redoing a stage redoes every stage that builds on it; a stage that only
judges (the gate) is not part of the chain, so editing a gate suite redoes the gate alone.

The runner changes no process-wide state: the caller chooses where logs and stdout go
(``capture``; the CLI routes both into ``logs/run.log``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from optimizer import calibration, hardware, launch, models
from optimizer.context import ModelState, StageContext
from optimizer.errors import GateFailed, OptimizerError, StageError, StageFailed
from optimizer.inputs import Input, digests
from optimizer.recipe import Recipe
from optimizer.run_record import Output, RunError, RunRecord, StageRecord, now
from optimizer.rundir import RunDirectory, open_log, sha256_trees
from optimizer.stages.base import Stage

log = logging.getLogger(__name__)

VERSIONED_PACKAGES = (
    "optimizer",
    "nvidia-modelopt",
    "torch",
    "transformers",
    "accelerate",
    "datasets",
    "lm-eval",
    "pydantic",
)
#: Packages whose version changes what a stage computes (part of each stage's fingerprint).
COMPUTE_PACKAGES = ("nvidia-modelopt", "torch", "transformers")

#: ``capture(log_file)``: a context manager that sends the run's log records (and whatever
#: else the caller wants, such as stdout) to ``log_file`` while the stages run.
Capture = Callable[[Path], contextlib.AbstractContextManager]


@dataclass
class RunOutcome:
    run_dir: Path
    record: RunRecord


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if info["cuda"]:
        info["gpus"] = [
            {
                "name": torch.cuda.get_device_name(i),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
            }
            for i in range(torch.cuda.device_count())
        ]
    return info


#: Weight files by preference: a checkpoint that ships several formats is counted once.
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pth", "*.pt", "*.gguf")


def weight_bytes(model_dir: Path, dtype: str) -> int:
    """The model's weights in ``dtype`` (the free-space check): the size of one format of its
    weight files (the safetensors index's total when there is one: hub repos also ship
    ``consolidated.safetensors`` copies), scaled from the checkpoint's dtype."""
    total = 0
    index = model_dir / "model.safetensors.index.json"
    try:
        total = int(json.loads(index.read_text())["metadata"]["total_size"])
    except (OSError, ValueError, KeyError, TypeError):
        for pattern in WEIGHT_PATTERNS:
            total = sum(f.stat().st_size for f in model_dir.glob(pattern) if f.is_file())
            if total:
                break
    try:
        config = json.loads((model_dir / "config.json").read_text())
        stored = models.torch_dtype(config.get("dtype") or config.get("torch_dtype"))
        total = total * models.torch_dtype(dtype).itemsize // stored.itemsize
    except (OSError, ValueError, AttributeError, KeyError):
        pass  # no config.json dtype: the files' size as they are
    return total


def stage_inputs(stage: Stage, recipe: Recipe) -> list[Input]:
    """What ``stage`` reads besides its section and the model (calibration data included)."""
    inputs = list(stage.inputs(recipe.base_dir))
    if stage.needs_calibration and recipe.calibration is not None:
        inputs.append(calibration.as_input(recipe.calibration, recipe.base_dir))
    return inputs


def stage_fingerprint(
    stage: Stage,
    recipe: Recipe,
    model_fp: str,
    input_digests: dict[str, str],
    upstream: str,
    versions: dict[str, str | None],
    compute_dtype: str | None = None,
) -> str:
    inputs = {
        "stage": stage.name,
        "config": stage.model_dump(mode="json"),
        "model": model_fp,
        "dtype": recipe.model.dtype,
        # Calibration in float32 gives (slightly) other scales than in bf16.
        "compute_dtype": compute_dtype or recipe.model.dtype,
        "calibration": recipe.calibration.model_dump(mode="json")
        if stage.needs_calibration and recipe.calibration
        else None,
        "inputs": input_digests,
        "upstream": upstream,
        "versions": {k: versions.get(k) for k in COMPUTE_PACKAGES},
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def chain(fingerprint: str, entry: StageRecord) -> str:
    """What a stage hands to the fingerprints of the stages after it."""
    outputs = {k: v.sha256 for k, v in (entry.outputs or {}).items()}
    blob = json.dumps([fingerprint, outputs], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@contextlib.contextmanager
def log_to_file(path: Path):
    """The library default for ``capture``: this package's own log records into ``path``
    (its logger only; the root logger, stdout and other libraries are left alone)."""
    stream = open_log(path)  # never through a symbolic link
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logger = logging.getLogger("optimizer")
    level = logger.level
    logger.setLevel(logging.DEBUG)  # our records reach the file whatever the root level is
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()
        stream.close()


class Runner:
    def __init__(
        self,
        recipe: Recipe,
        run_dir: Path,
        *,
        resume: bool = False,
        force: bool = False,
        recipe_file: str | None = None,
        overrides: list[str] | None = None,
        capture: Capture = log_to_file,
    ):
        self.recipe = recipe
        self.dir = RunDirectory(run_dir)
        self.resume = resume
        self.force = force
        self.recipe_file = recipe_file
        self.overrides = overrides or []
        self.capture = capture
        self.record = RunRecord(name=recipe.name)
        #: The previous run said "running" but its process was gone (killed): interrupted.
        self.stale_previous = False

    # ------------------------------------------------------------------ set-up

    def _prepare(self) -> RunRecord | None:
        if self.dir.writer:
            self.dir.check_files()  # no symbolic links where the run writes
        if self.force:
            # A previous run of ours is replaced even when its run.json is unreadable; a
            # directory that is not ours (no marker, foreign files) is refused, nothing deleted.
            if self.dir.run_json.exists() or self.dir.run_json.is_symlink():
                self.dir.clear()
            previous = None
        else:
            previous = self.dir.read() if self.dir.writer else None
        stale = False
        if previous is not None and previous.status == "running" and self.dir.writer:
            # We hold the lock now, so the process that wrote "running" is gone (killed).
            stale = self.stale_previous = True
            previous.status = "interrupted"
            if self.resume:  # (without --resume the refusal below says it)
                log.warning(
                    "%s: the previous run was interrupted (stale: run.json said running, but "
                    "no process holds its lock; it was killed); resuming it",
                    self.dir.path,
                )
        if previous is not None and self.resume and self.dir.writer:
            outside = self.dir.outside(previous)
            if outside:
                raise OptimizerError(
                    f"{self.dir.run_json} records outputs outside the run directory "
                    f"({', '.join(outside[:3])}); a resume never loads from there. Use --force "
                    "to start over, or another -o"
                )
        if launch.world_size() > 1:
            # Rank 0's view of the previous run is every rank's: rank 0 overwrites run.json
            # right after this, and ranks must skip and redo the same stages.
            launch.join_process_group()
            previous = launch.from_rank0(previous)
        if previous is not None and not self.resume:  # (every rank: they all stop)
            status = f"{previous.status} (stale)" if stale else previous.status
            raise OptimizerError(
                f"{self.dir.path} already holds a run (status: {status}). Use "
                "--resume to continue it (finished, unchanged stages are kept), --force to "
                "start over (deletes it), or -o to choose another directory."
            )
        self.dir.remove_temporaries()
        # Training checkpoints of stages this recipe no longer has at that place are dead.
        self.dir.drop_checkpoints(
            keep={self.dir.checkpoints(i, st.name).name for i, st in enumerate(self.recipe.stages)}
        )
        # Every rank writes its own log file (run.log on rank 0, run.rankN.log elsewhere).
        self.dir.logs.mkdir(parents=True, exist_ok=True)
        self.dir.write_text("recipe.yaml", self.recipe.to_yaml())
        return previous

    def _save(self) -> None:
        self.dir.write(self.record)

    # ------------------------------------------------------------------ run

    def run(self) -> RunOutcome:
        self.dir.lock()
        try:
            previous = self._prepare()
            log_file = self.dir.logs / (
                "run.log" if self.dir.writer else f"run.rank{self.dir.rank}.log"
            )
            with self.capture(log_file):
                self._run_stages(previous)
        finally:
            self.dir.unlock()
        return RunOutcome(self.dir.path, self.record)

    def _run_stages(self, previous: RunRecord | None) -> None:
        recipe = self.recipe
        versions = package_versions()
        log.info("run %s in %s%s", recipe.name, self.dir.path, " (resume)" if previous else "")
        if self.stale_previous:
            log.info("the previous run was interrupted (stale: killed while running); resuming it")
        self.record = RunRecord(
            name=recipe.name,
            recipe_file=self.recipe_file,
            overrides=self.overrides,
            recipe=recipe.resolved(),
            recipe_sha256=recipe.sha256(),
            versions=versions,
            model={"source": recipe.model.source},
            stages=[StageRecord(index=i, name=s.name) for i, s in enumerate(recipe.stages)],
        )
        self._save()
        try:
            self._preflight(previous)
            self.record.startup = self._import_libraries(previous)
            device = device_info()
            compute = hardware.compute_dtype(
                recipe.model.dtype, recipe.model.compute_dtype, cuda=device["cuda"]
            )
            device["compute_dtype"] = compute
            self.record.device = device
            if compute != recipe.model.dtype:
                log.info(
                    "computing in %s: %s; saved and exported artifacts stay %s "
                    "(set model.compute_dtype to choose)",
                    compute,
                    f"this CPU has no native {recipe.model.dtype} math (no AVX512-BF16/AMX), "
                    "so it would be emulated several times slower"
                    if recipe.model.compute_dtype == "auto"
                    else "model.compute_dtype says so",
                    recipe.model.dtype,
                )
            resolved = models.resolve_source(recipe.model.source, recipe.base_dir)
            if self.dir.writer:
                self._check_free_space(resolved.path, previous)
            self.record.model = {
                "source": resolved.source,
                "path": str(resolved.path),
                "fingerprint": resolved.fingerprint,
            }
            state = ModelState(
                resolved.path,
                recipe.model.dtype,
                recipe.model.trust_remote_code,
                source_path=resolved.path,
                source_fingerprint=resolved.fingerprint,
                compute_dtype=compute,
                # placement only: no fingerprint or baseline key depends on it
                max_memory=recipe.model.max_memory.as_bytes() if recipe.model.max_memory else None,
            )
            prev_stages = previous.stages if previous else []
            upstream = ""
            last_distributed = max(
                (i for i, s in enumerate(recipe.stages) if s.distributed), default=-1
            )
            for i, stage in enumerate(recipe.stages):
                if not self.dir.writer and i > last_distributed:
                    log.info(
                        "rank %d: no multi-process stage from here on; rank 0 runs the rest",
                        self.dir.rank,
                    )
                    break
                entry = self.record.stages[i]
                entry.inputs = digests(stage_inputs(stage, recipe))
                fp = stage_fingerprint(
                    stage, recipe, resolved.fingerprint, entry.inputs, upstream, versions, compute
                )
                entry.fingerprint = fp
                old = prev_stages[i] if i < len(prev_stages) else None
                if self._reusable(old, stage, entry):
                    self._reuse(i, stage, old, state)
                else:
                    self._run_one(i, stage, state)
                if i == last_distributed:
                    # (rank 0 has committed it; rank 0 alone runs the rest)
                    launch.leave_process_group()
                if stage.feeds_later:
                    # Later stages build on what this one made: its inputs and its outputs
                    # as committed (a redone stage whose output differs redoes them too).
                    upstream = chain(fp, entry)
            failures = [s.gate_failure for s in self.record.stages if s.gate_failure]
            if failures:
                self.record.status = "gate_failed"
                self.record.error = RunError(stage="gate", message="; ".join(failures))
                raise GateFailed("; ".join(failures))
            self.record.status = "success"
            self.dir.drop_checkpoints()
        except KeyboardInterrupt as e:
            self.record.status = "interrupted"
            self.record.error = RunError(message=str(e) or "interrupted by the user")
            raise
        except GateFailed:
            raise
        except StageFailed as e:
            self.record.status = "failed"
            self.record.error = RunError(stage=e.stage, message=e.cause)
            raise
        except OptimizerError as e:
            self.record.status = "failed"
            self.record.error = RunError(message=str(e))
            raise
        finally:
            self.record.finished_at = now()
            self._save()
        log.info("run %s finished: %s", recipe.name, self.dir.run_json)

    def _stages_to_run(self, previous: RunRecord | None) -> list[tuple[int, Stage]]:
        """The stages this call will run (a resume keeps finished ones, unless changed)."""
        done = {s.index for s in (previous.stages if previous else []) if s.finished}
        return [(i, s) for i, s in enumerate(self.recipe.stages) if not (self.resume and i in done)]

    def _preflight(self, previous: RunRecord | None) -> None:
        """Machine checks of stages that will run, before the model is even resolved: their
        own (``Stage.preflight``), then the hub for the hub datasets they read."""
        pending = self._stages_to_run(previous)
        hub = [
            (stage.name, item.ref.split(":")[1])
            for _, stage in pending
            for item in stage_inputs(stage, self.recipe)
            if item.kind == "reference" and item.ref.startswith("hub:")
        ]
        if hub:
            reason = models.hub_unreachable_reason()
            if reason:
                what = ", ".join(f"'{name}' (stage {stage})" for stage, name in hub)
                raise OptimizerError(
                    f"hub dataset {what} cannot be loaded: {reason}. Point it at a local "
                    ".jsonl/.txt file or a shipped dataset by name"
                )
        for i, stage in pending:
            try:
                stage.preflight()
            except StageError as e:
                self.record.stages[i].status = "failed"
                self.record.stages[i].error = str(e)
                raise StageFailed(stage.name, str(e)) from None

    def _import_libraries(self, previous: RunRecord | None) -> dict[str, Any]:
        """Import what the pending stages run on (torch, transformers, their ``imports``) and
        time it: the fixed cost of a job, reported apart from the stages' own seconds."""
        import importlib

        wanted = ["torch", "transformers"]
        for _, stage in self._stages_to_run(previous):
            wanted += [m for m in stage.imports if m not in wanted]
        seconds: dict[str, float | None] = {}
        t0 = time.time()
        for module in wanted:
            t = time.time()
            try:
                importlib.import_module(module)
            except ImportError:  # the stage that needs it says so, with its own message
                seconds[module] = None
                continue
            seconds[module] = round(time.time() - t, 3)
        total = round(time.time() - t0, 3)
        log.info(
            "imports: %.1f s (%s)",
            total,
            ", ".join(f"{m} {s:.1f} s" for m, s in seconds.items() if s is not None),
        )
        return {"seconds": total, "imports": seconds}

    def _check_free_space(self, model_dir: Path, previous: RunRecord | None) -> None:
        """Refuse a run whose outputs cannot fit: the stages' model-sized files
        (``Stage.model_copies``) times the model's weight files, a lower bound (a float32 run
        of a bf16 checkpoint writes twice that) checked before the model loads."""
        weights = weight_bytes(model_dir, self.recipe.model.dtype)
        plans = self.recipe.plans
        copies = sum(
            stage.model_copies(plans[i] if i < len(plans) else None)
            for i, stage in self._stages_to_run(previous)
        )
        need = int(weights * copies)
        free = shutil.disk_usage(self.dir.path).free
        if need > free:
            gb = 1e9
            raise OptimizerError(
                f"{self.dir.path}: {free / gb:.2f} GB free, but the stages write at least "
                f"{need / gb:.2f} GB ({copies:g} model-sized outputs of {weights / gb:.2f} GB "
                "each); free space or choose another -o"
            )

    def _reusable(self, old: StageRecord | None, stage: Stage, entry: StageRecord) -> bool:
        if not self.resume or old is None or old.name != stage.name or not old.finished:
            return False
        if old.fingerprint != entry.fingerprint:
            changed = [k for k, v in (entry.inputs or {}).items() if (old.inputs or {}).get(k) != v]
            why = (
                ", ".join(changed)
                if old.inputs is not None and changed
                else "its recipe section, the model, a package version or an earlier stage"
            )
            log.info("stage %s: %s changed; redoing it", stage.name, why)
            return False
        recorded = [(Path(o.path), o.sha256) for o in (old.outputs or {}).values()]
        present = [(p, digest) for p, digest in recorded if p.exists()]
        now_digests = sha256_trees([p for p, _ in present])
        changed = [p for p, _ in recorded if not p.exists()] + [
            p for (p, digest), now in zip(present, now_digests, strict=True) if now != digest
        ]
        if changed:
            log.info(
                "stage %s: recorded output %s changed on disk; redoing it", stage.name, changed[0]
            )
            return False
        return True

    def _reuse(self, i: int, stage: Stage, old: StageRecord, state: ModelState) -> None:
        entry = self.record.stages[i]
        entry.status = "skipped"
        entry.reason = "resumed: finished earlier with the same inputs"
        entry.seconds = 0.0
        entry.outputs = old.outputs or {}
        entry.metrics = old.metrics or {}
        entry.gate_failure = old.gate_failure
        log.info(
            "[%d/%d] %s: skipped (finished earlier with the same inputs)",
            i + 1,
            len(self.recipe.stages),
            stage.name,
        )
        self._publish_artifacts(stage, entry)
        if stage.transforms_model:
            state.checkpoint = Path(entry.outputs["model"].path)
        if stage.transforms_model or stage.invalidates_model:
            state.drop_model()  # later stages load exactly the saved state
        self._save()

    def _run_one(self, i: int, stage: Stage, state: ModelState) -> None:
        entry = self.record.stages[i]
        entry.status = "running"
        entry.started_at = now()
        entry.outputs, entry.metrics, entry.reason = {}, {}, None
        self._save()
        log.info("[%d/%d] %s: %s", i + 1, len(self.recipe.stages), stage.name, stage.describe())
        plan = self.recipe.plans[i] if len(self.recipe.plans) > i else None
        ctx = StageContext(
            self.recipe,
            self.dir,
            i,
            state,
            plan=plan,
            fingerprint=entry.fingerprint or "",
            earlier_metrics=[(s.name, s.metrics) for s in self.record.stages[:i] if s.metrics],
            artifacts=dict(self.record.artifacts),
        )
        t0 = time.time()
        try:
            result = stage.run(ctx)
            if stage.transforms_model and self.dir.writer:
                # (Other ranks keep the model in memory; they never commit a save.)
                self._save_model(ctx)
                result.outputs["model"] = ctx.temp_outputs["model"]
            outputs = self._commit(i, stage, result.outputs)
            self.dir.drop_checkpoints(i)
        except BaseException as e:
            for tmp in ctx.temp_outputs.values():
                shutil.rmtree(tmp, ignore_errors=True)
            entry.seconds = round(time.time() - t0, 3)
            if isinstance(e, KeyboardInterrupt):
                entry.status = "interrupted"
                raise
            entry.status = "failed"
            if isinstance(e, OptimizerError):
                entry.error = str(e)
                raise OptimizerError(f"stage '{stage.name}': {e}") from None
            cause = str(e) if isinstance(e, StageError) else f"{type(e).__name__}: {e}"
            entry.error = cause
            log.debug("stage %s traceback:\n%s", stage.name, traceback.format_exc())
            raise StageFailed(stage.name, cause) from e
        entry.status = "success"
        entry.seconds = round(time.time() - t0, 3)
        entry.outputs = outputs
        entry.metrics = result.metrics
        entry.finished_at = now()
        if result.gate_failure:
            entry.gate_failure = result.gate_failure.replace("{run_dir}", str(self.dir.path))
        self._publish_artifacts(stage, entry)
        if stage.transforms_model and "model" in outputs:
            state.checkpoint = Path(outputs["model"].path)
        if stage.invalidates_model:
            state.drop_model()
        log.info(
            "[%d/%d] %s: done in %.1f s", i + 1, len(self.recipe.stages), stage.name, entry.seconds
        )
        self._save()

    def _save_model(self, ctx: StageContext) -> None:
        """Hand-over checkpoint: weights + ModelOpt state, restorable exactly by load_model."""
        model = ctx.model()
        out = ctx.new_output("model")
        models.enable_modelopt_checkpointing()
        rounded = models.save_in_dtype(model, out, ctx.state.dtype, ctx.state.compute_dtype)
        ctx.tokenizer().save_pretrained(out)
        if rounded:
            # Rounded to the artifact dtype: later stages reload the saved state, exactly as
            # a resumed run does.
            del model
            ctx.state.drop_model()

    def _commit(self, i: int, stage: Stage, outputs: dict[str, Path]) -> dict[str, Output]:
        finals = {}
        for key, tmp in outputs.items():
            if key in stage.artifact_keys:
                final = self.dir.path / key
            else:
                final = self.dir.stage_dir(i, stage.name) / key
            self.dir.commit(tmp, final)
            finals[key] = final
        # Other ranks do not commit; rank 0's record is the one written.
        digests = sha256_trees(list(finals.values())) if self.dir.writer else [""] * len(finals)
        return {
            key: Output(path=str(final), sha256=digest)
            for (key, final), digest in zip(finals.items(), digests, strict=True)
        }

    def _publish_artifacts(self, stage: Stage, entry: StageRecord) -> None:
        self.record.artifacts.update(stage.artifacts(entry.output_paths()))


def run_recipe(recipe: Recipe, run_dir: Path, **kwargs: Any) -> RunOutcome:
    return Runner(recipe, run_dir, **kwargs).run()


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / recipe.name
