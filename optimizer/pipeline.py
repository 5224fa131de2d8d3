"""Runs a recipe's stages in order inside a run directory, with resume.

Resume rule: a stage is skipped when the previous run recorded it as finished with the same
*fingerprint* — a hash of its recipe section, the model's identity, the calibration inputs
it reads, the package versions that compute it, and the fingerprint of the stage before it —
and its recorded outputs are still on disk with the recorded sha256. Because fingerprints
chain, redoing one stage redoes every stage after it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import platform
import shutil
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from optimizer import calibration, hardware, models
from optimizer.context import ModelState, StageContext
from optimizer.errors import GateFailed, OptimizerError, StageError, StageFailed
from optimizer.recipe import Recipe
from optimizer.rundir import SCHEMA_VERSION, RunDirectory, replace_dir, sha256_tree, write_atomic
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


@dataclass
class RunOutcome:
    run_dir: Path
    record: dict[str, Any]


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


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


def stage_fingerprint(
    stage: Stage,
    recipe: Recipe,
    model_fp: str,
    calib_fp: str | None,
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
        "calibration": (
            [recipe.calibration.model_dump(mode="json"), calib_fp]
            if stage.needs_calibration and recipe.calibration
            else None
        ),
        "upstream": upstream,
        "versions": {k: versions.get(k) for k in COMPUTE_PACKAGES},
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


class _StdoutToLog(io.TextIOBase):
    """ModelOpt reports with print(); route it to the log so stdout stays machine-readable."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger
        self.buf = ""

    def write(self, s: str) -> int:
        self.buf += s
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            if line.strip():
                self.logger.info(line.rstrip())
        return len(s)


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
    ):
        self.recipe = recipe
        self.dir = RunDirectory(run_dir)
        self.resume = resume
        self.force = force
        self.recipe_file = recipe_file
        self.overrides = overrides or []
        self.record: dict[str, Any] = {}

    # ------------------------------------------------------------------ set-up

    def _prepare(self) -> dict[str, Any] | None:
        previous = self.dir.read()
        if previous is not None and not (self.resume or self.force):
            raise OptimizerError(
                f"{self.dir.path} already holds a run (status: {previous.get('status')}). Use "
                "--resume to continue it (finished, unchanged stages are kept), --force to "
                "start over (deletes it), or -o to choose another directory."
            )
        if self.force and previous is not None:
            self.dir.clear()
            previous = None
        self.dir.remove_temporaries()
        self.dir.logs.mkdir(parents=True, exist_ok=True)
        write_atomic(self.dir.path / "recipe.yaml", self.recipe.to_yaml())
        return previous

    def _save(self) -> None:
        self.dir.write(self.record)

    # ------------------------------------------------------------------ run

    def run(self) -> RunOutcome:
        self.dir.lock()
        handler = None
        try:
            previous = self._prepare()
            handler = _attach_file_log(self.dir.logs / "run.log")
            self._run_stages(previous)
        finally:
            if handler is not None:
                logging.getLogger().removeHandler(handler)
                handler.close()
            self.dir.unlock()
        return RunOutcome(self.dir.path, self.record)

    def _run_stages(self, previous: dict[str, Any] | None) -> None:
        recipe = self.recipe
        versions = package_versions()
        log.info("run %s in %s%s", recipe.name, self.dir.path, " (resume)" if previous else "")
        self.record = {
            "schema_version": SCHEMA_VERSION,
            "name": recipe.name,
            "status": "running",
            "started_at": now(),
            "finished_at": None,
            "recipe_file": self.recipe_file,
            "overrides": self.overrides,
            "recipe": recipe.resolved(),
            "recipe_sha256": recipe.sha256(),
            "versions": versions,
            "device": None,
            "model": {"source": recipe.model.source},
            "stages": [
                {"index": i, "name": s.name, "status": "pending"}
                for i, s in enumerate(recipe.stages)
            ],
            "artifacts": {},
            "error": None,
        }
        self._save()
        try:
            self._preflight(previous)
            self.record["device"] = device_info()
            compute = hardware.compute_dtype(
                recipe.model.dtype, recipe.model.compute_dtype, cuda=self.record["device"]["cuda"]
            )
            self.record["device"]["compute_dtype"] = compute
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
            self.record["model"] = {
                "source": resolved.source,
                "path": str(resolved.path),
                "fingerprint": resolved.fingerprint,
            }
            calib_fp = (
                calibration.fingerprint(recipe.calibration, recipe.base_dir)
                if recipe.calibration
                else None
            )
            state = ModelState(
                resolved.path,
                recipe.model.dtype,
                recipe.model.trust_remote_code,
                source_path=resolved.path,
                source_fingerprint=resolved.fingerprint,
                compute_dtype=compute,
            )
            prev_stages = (previous or {}).get("stages", [])
            upstream = ""
            reusing = True
            for i, stage in enumerate(recipe.stages):
                fp = stage_fingerprint(
                    stage, recipe, resolved.fingerprint, calib_fp, upstream, versions, compute
                )
                upstream = fp
                entry = self.record["stages"][i]
                entry["fingerprint"] = fp
                old = prev_stages[i] if i < len(prev_stages) else None
                if reusing and self._reusable(old, stage, fp):
                    self._reuse(i, stage, old, state)
                    continue
                reusing = False
                self._run_one(i, stage, state)
            failures = [s["gate_failure"] for s in self.record["stages"] if s.get("gate_failure")]
            if failures:
                self.record["status"] = "gate_failed"
                self.record["error"] = {"stage": "gate", "message": "; ".join(failures)}
                raise GateFailed("; ".join(failures))
            self.record["status"] = "success"
        except KeyboardInterrupt:
            self.record["status"] = "interrupted"
            self.record["error"] = {"message": "interrupted by the user"}
            raise
        except GateFailed:
            raise
        except StageFailed as e:
            self.record["status"] = "failed"
            self.record["error"] = {"stage": e.stage, "message": e.cause}
            raise
        except OptimizerError as e:
            self.record["status"] = "failed"
            self.record["error"] = {"message": str(e)}
            raise
        finally:
            self.record["finished_at"] = now()
            self._save()
        log.info("run %s finished: %s", recipe.name, self.dir.run_json)

    def _preflight(self, previous: dict[str, Any] | None) -> None:
        """Machine checks of stages that will run, before the model is even resolved."""
        done = {
            s.get("index")
            for s in (previous or {}).get("stages", [])
            if s.get("status") in ("success", "skipped")
        }
        for i, stage in enumerate(self.recipe.stages):
            if self.resume and i in done:
                continue
            try:
                stage.preflight()
            except StageError as e:
                entry = self.record["stages"][i]
                entry.update(status="failed", error=str(e))
                raise StageFailed(stage.name, str(e)) from None

    def _reusable(self, old: dict | None, stage: Stage, fp: str) -> bool:
        if not self.resume or not old or old.get("name") != stage.name:
            return False
        if old.get("status") not in ("success", "skipped") or old.get("fingerprint") != fp:
            return False
        for out in (old.get("outputs") or {}).values():
            p = Path(out["path"])
            if not p.exists() or sha256_tree(p) != out["sha256"]:
                log.info("stage %s: recorded output %s changed on disk; redoing it", stage.name, p)
                return False
        return True

    def _reuse(self, i: int, stage: Stage, old: dict, state: ModelState) -> None:
        entry = self.record["stages"][i]
        entry.update(
            status="skipped",
            reason="resumed: finished earlier with the same inputs",
            seconds=0.0,
            outputs=old.get("outputs", {}),
            metrics=old.get("metrics", {}),
        )
        if old.get("gate_failure"):
            entry["gate_failure"] = old["gate_failure"]
        log.info(
            "[%d/%d] %s: skipped (finished earlier with the same inputs)",
            i + 1,
            len(self.recipe.stages),
            stage.name,
        )
        self._publish_artifacts(stage, entry["outputs"])
        if stage.transforms_model:
            state.checkpoint = Path(entry["outputs"]["model"]["path"])
            state.model = None  # later stages load exactly the saved state
        self._save()

    def _run_one(self, i: int, stage: Stage, state: ModelState) -> None:
        entry = self.record["stages"][i]
        entry.update(status="running", started_at=now(), outputs={}, metrics={})
        entry.pop("reason", None)
        self._save()
        log.info("[%d/%d] %s: %s", i + 1, len(self.recipe.stages), stage.name, stage.describe())
        ctx = StageContext(self.recipe, self.dir.path, i, state)
        t0 = time.time()
        stage_log = logging.getLogger(f"optimizer.stages.{stage.name}")
        try:
            with contextlib.redirect_stdout(_StdoutToLog(stage_log)):
                result = stage.run(ctx)
                if stage.transforms_model:
                    self._save_model(ctx)
                    result.outputs["model"] = ctx.temp_outputs["model"]
            outputs = self._commit(i, stage, result.outputs)
        except BaseException as e:
            for tmp in ctx.temp_outputs.values():
                shutil.rmtree(tmp, ignore_errors=True)
            entry["seconds"] = round(time.time() - t0, 3)
            if isinstance(e, KeyboardInterrupt):
                entry["status"] = "interrupted"
                raise
            entry["status"] = "failed"
            if isinstance(e, OptimizerError):
                entry["error"] = str(e)
                raise OptimizerError(f"stage '{stage.name}': {e}") from None
            cause = str(e) if isinstance(e, StageError) else f"{type(e).__name__}: {e}"
            entry["error"] = cause
            log.debug("stage %s traceback:\n%s", stage.name, traceback.format_exc())
            raise StageFailed(stage.name, cause) from e
        entry.update(
            status="success",
            seconds=round(time.time() - t0, 3),
            outputs=outputs,
            metrics=result.metrics,
            finished_at=now(),
        )
        if result.gate_failure:
            entry["gate_failure"] = result.gate_failure.replace("{run_dir}", str(self.dir.path))
        self._publish_artifacts(stage, outputs)
        if stage.transforms_model:
            state.checkpoint = Path(outputs["model"]["path"])
        if stage.invalidates_model:
            state.model = None
        log.info(
            "[%d/%d] %s: done in %.1f s",
            i + 1,
            len(self.recipe.stages),
            stage.name,
            entry["seconds"],
        )
        self._save()

    def _save_model(self, ctx: StageContext) -> None:
        """Hand-over checkpoint: weights + ModelOpt state, restorable exactly by load_model."""
        model = ctx.model()
        out = ctx.new_output("model")
        models.enable_modelopt_checkpointing()
        if models.save_in_dtype(model, out, ctx.state.dtype, ctx.state.compute_dtype):
            # Rounded to the artifact dtype: later stages reload the saved state, exactly as
            # a resumed run does.
            ctx.state.model = None
        ctx.tokenizer().save_pretrained(out)

    def _commit(self, i: int, stage: Stage, outputs: dict[str, Path]) -> dict[str, dict[str, str]]:
        committed = {}
        for key, tmp in outputs.items():
            if key in stage.artifact_keys:
                final = self.dir.path / key
            else:
                final = self.dir.stage_dir(i, stage.name) / key
            replace_dir(tmp, final)
            committed[key] = {"path": str(final), "sha256": sha256_tree(final)}
        return committed

    def _publish_artifacts(self, stage: Stage, outputs: dict[str, dict[str, str]]) -> None:
        self.record["artifacts"].update(stage.artifacts(outputs))


class _FileLogFilter(logging.Filter):
    """Everything of ours down to DEBUG; other libraries from INFO up (their DEBUG is noise)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("optimizer") or record.levelno >= logging.INFO


def _attach_file_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.addFilter(_FileLogFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def run_recipe(recipe: Recipe, run_dir: Path, **kwargs: Any) -> RunOutcome:
    return Runner(recipe, run_dir, **kwargs).run()


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / recipe.name
