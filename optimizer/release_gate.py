"""``optimize gate``: gate an artifact that already exists (a checkpoint directory or a served
endpoint) against its baseline, into a run directory of its own.

The same ``evaluate_and_judge`` call as the gate stage; the run directory holds what a
recipe's gate writes (``report/``, ``run.json`` with one ``gate`` stage record,
``logs/run.log``). Every input is checked before anything is loaded or written: a bad suite,
a baseline that does not exist, or a candidate the gate cannot evaluate faithfully (a
ModelOpt unified HF export) ends with exit 2 and leaves no run directory behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from optimizer import evaluation, hardware, models
from optimizer.errors import GateFailed, OptimizerError, StageFailed
from optimizer.evaluation import Candidate, Suite
from optimizer.pipeline import (
    COMPUTE_PACKAGES,
    Capture,
    device_info,
    log_to_file,
    package_versions,
)
from optimizer.run_record import Output, RunError, RunRecord, StageRecord, now
from optimizer.rundir import RunDirectory, sha256_tree

log = logging.getLogger("optimizer.gate")


@dataclass(frozen=True)
class GateRequest:
    """What ``optimize gate`` was asked: the baseline source, the candidate (``candidate``
    directory or ``endpoint`` URL + ``endpoint_model``), the suite and its overrides."""

    baseline: str
    suite: str
    output: Path
    candidate: Path | None = None
    endpoint: str | None = None
    endpoint_model: str | None = None
    max_drop: dict[str, float] = field(default_factory=dict)
    limit: int | None = None
    on_inconclusive: str = "fail"
    dtype: str = "bfloat16"
    compute_dtype: str = "auto"
    force: bool = False


def _invocation(request: GateRequest, suite_file: Path) -> dict:
    """The request as run.json's ``recipe`` (the shape a one-stage recipe has)."""
    endpoint = (
        {"base_url": request.endpoint, "model": request.endpoint_model}
        if request.endpoint
        else None
    )
    return {
        "name": "gate",
        "description": None,
        "model": {
            "source": request.baseline,
            "dtype": request.dtype,
            "compute_dtype": request.compute_dtype,
            "trust_remote_code": False,
        },
        "calibration": None,
        "stages": [
            {
                "gate": {
                    "suite": str(suite_file),
                    "evaluate": "endpoint" if request.endpoint else "checkpoint",
                    "candidate": str(request.candidate) if request.candidate else None,
                    "endpoint": endpoint,
                    "max_drop": request.max_drop,
                    "limit": request.limit,
                    "on_inconclusive": request.on_inconclusive,
                }
            }
        ],
    }


def gate_artifact(request: GateRequest, *, capture: Capture = log_to_file) -> RunRecord:
    """Evaluate and judge; write ``request.output``. Raises OptimizerError (bad input, before
    anything is written), GateFailed (the verdict is written first) or StageFailed."""
    if request.endpoint and not request.endpoint_model:
        raise OptimizerError(
            "--endpoint needs --endpoint-model (the model name the server expects)"
        )
    if (request.candidate is None) == (request.endpoint is None):
        raise OptimizerError("gate exactly one of a candidate directory or an endpoint")
    # Every input is checked first, cheapest first: nothing is evaluated, loaded or written
    # before all of them are known to be usable.
    if request.candidate is not None:
        if not request.candidate.exists():
            raise OptimizerError(f"--candidate {request.candidate}: no such directory")
        if not request.candidate.is_dir():
            raise OptimizerError(f"--candidate {request.candidate}: not a directory")
    else:
        from optimizer.evaluation.endpoint import url_problem

        problem = url_problem(request.endpoint)
        if problem:
            raise OptimizerError(f"--endpoint {request.endpoint!r}: {problem}")
    suite_file = evaluation.resolve_suite(request.suite, Path.cwd())
    suite = evaluation.apply_overrides(
        evaluation.load_suite(suite_file), limit=request.limit, max_drop=request.max_drop
    )
    problem = models.check_source(request.baseline, Path.cwd())
    if problem:
        raise OptimizerError(f"--baseline: {problem}")
    if request.candidate is not None:
        try:  # refuses exports it cannot rebuild, engines, unreadable configs
            candidate = evaluation.make_candidate("checkpoint", request.candidate.resolve())
        except OptimizerError as e:
            raise OptimizerError(f"--candidate: {e}") from None
    else:  # probed (with the baseline's tokenizer) before the baseline is evaluated
        candidate = evaluation.make_candidate("endpoint", request.endpoint, request.endpoint_model)
    invocation = _invocation(request, suite_file)
    # The baseline and the candidate's own check (an endpoint's logprob probe) come before
    # the run directory is touched: bad input leaves an earlier run as it was.
    resolved = models.resolve_source(request.baseline, Path.cwd())
    device = device_info()
    device["compute_dtype"] = hardware.compute_dtype(
        request.dtype, request.compute_dtype, cuda=device["cuda"]
    )
    baseline = evaluation.BaselineRef(
        path=resolved.path,
        fingerprint=resolved.fingerprint,
        dtype=request.dtype,
        compute_dtype=device["compute_dtype"],
    )
    candidate.check(baseline, suite)

    run = RunDirectory(request.output)
    run.lock()
    try:
        run.check_files()  # no symbolic links where the gate writes
        if request.force:
            if run.run_json.exists():  # replaced even when unreadable; other dirs are not ours
                run.clear()
        else:
            previous = run.read()
            if previous is not None:
                raise OptimizerError(
                    f"{run.path} already holds a run (status: {previous.status}). Use --force "
                    "to replace it, or -o to choose another directory."
                )
        run.remove_temporaries()
        run.logs.mkdir(parents=True, exist_ok=True)
        with capture(run.logs / "run.log"):
            return _judge_into(run, request, invocation, suite, candidate, baseline, device)
    finally:
        run.unlock()


def _judge_into(
    run: RunDirectory,
    request: GateRequest,
    invocation: dict,
    suite: Suite,
    candidate: Candidate,
    baseline: evaluation.BaselineRef,
    device: dict,
) -> RunRecord:
    versions = package_versions()
    blob = json.dumps(invocation, sort_keys=True, separators=(",", ":"))
    entry = StageRecord(index=0, name="gate")
    record = RunRecord(
        name="gate",
        recipe=invocation,
        recipe_sha256=hashlib.sha256(blob.encode()).hexdigest(),
        versions=versions,
        model={"source": request.baseline},
        stages=[entry],
    )
    run.write(record)
    t0 = time.time()
    try:
        record.device = device
        record.model = {
            "source": request.baseline,
            "path": str(baseline.path),
            "fingerprint": baseline.fingerprint,
        }
        identity = {
            "gate": invocation,
            "model": baseline.fingerprint,
            "compute_dtype": baseline.compute_dtype,
            "versions": {k: versions.get(k) for k in COMPUTE_PACKAGES},
        }
        entry.fingerprint = hashlib.sha256(
            json.dumps(identity, sort_keys=True).encode()
        ).hexdigest()
        entry.status, entry.started_at, entry.outputs, entry.metrics = "running", now(), {}, {}
        run.write(record)
        t0 = time.time()
        judgement = evaluation.evaluate_and_judge(
            suite,
            baseline,
            candidate,
            cache_dir=models.cache_dir(),
            on_inconclusive=request.on_inconclusive,
            log=log,
        )
        tmp = run.temp_output(0, "report")
        evaluated = str(request.candidate.resolve()) if request.candidate else "endpoint"
        evaluation.write_reports(
            tmp,
            judgement.verdict,
            evaluation.run_meta(judgement, evaluated=evaluated, recipe="gate"),
        )
        report = run.path / "report"
        run.commit(tmp, report)
    except (OptimizerError, KeyboardInterrupt) as e:
        entry.seconds = round(time.time() - t0, 3)
        if isinstance(e, KeyboardInterrupt):
            entry.status = record.status = "interrupted"
            record.error = RunError(message="interrupted by the user")
        else:
            entry.status, entry.error = "failed", str(e)
            record.status, record.error = "failed", RunError(message=str(e))
        _finish(run, record)
        raise
    except Exception as e:
        cause = f"{type(e).__name__}: {e}"
        entry.status, entry.error, entry.seconds = "failed", cause, round(time.time() - t0, 3)
        record.status, record.error = "failed", RunError(stage="gate", message=cause)
        log.debug("gate traceback:\n%s", traceback.format_exc())
        _finish(run, record)
        raise StageFailed("gate", cause) from e
    entry.status = "success"
    entry.seconds = round(time.time() - t0, 3)
    entry.outputs = {"report": Output(path=str(report), sha256=sha256_tree(report))}
    entry.metrics = judgement.summary()
    entry.finished_at = now()
    record.artifacts = {"gate": str(report / "gate.json"), "report": str(report / "report.html")}
    if not judgement.passed:
        message = (
            f"accuracy gate failed on {', '.join(judgement.verdict.failing)} "
            f"(see {run.path}/report/report.md)"
        )
        entry.gate_failure = message
        record.status, record.error = "gate_failed", RunError(stage="gate", message=message)
        _finish(run, record)
        raise GateFailed(message)
    record.status = "success"
    _finish(run, record)
    return record


def _finish(run: RunDirectory, record: RunRecord) -> None:
    record.finished_at = now()
    run.write(record)
