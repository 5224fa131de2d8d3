"""``optimize sweep``: a recipe's variants over a grid of settings, each a resumable run of
its own below one sweep directory, and the Pareto front of accuracy against size.

A grid axis is a ``--set`` key path with comma-separated values
(``stages.ptq.format=fp8,int4_awq``); the variants are the cartesian product of the axes,
each the recipe with one value per axis applied as ``--set`` overrides (after the user's own
``--set``s), by ``recipe.load_recipe`` itself. Every variant is validated as a full recipe
before anything runs or is written.

Layout of the sweep directory (``-o DIR``)::

    DIR/sweep.json              the grid, every variant's overrides, status, exit code, metrics
    DIR/sweep.md, sweep.html    the table of variants (front marked) and the plot
    DIR/variants/<slug>/        each variant's run directory (run.json, recipe.yaml, logs/ ...)

Each variant runs through the pipeline's ``Runner``, so its gate scores the baseline from
the baseline cache (``models.cache_dir()``): the variants share one source model, dtype and
suite, so the first gate evaluates the baseline and every later one reuses it.

``--resume`` skips a variant whose run finished (``success`` or ``gate_failed``) with the
same resolved recipe (run.json's ``recipe_sha256``) and the same declared stage inputs, and
continues any other with the runner's own resume (finished stages with unchanged inputs are
kept).
"""

from __future__ import annotations

import itertools
import logging
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from optimizer.errors import (
    EXIT_BAD_INPUT,
    EXIT_GATE_FAILED,
    EXIT_OK,
    EXIT_STAGE_FAILED,
    GateFailed,
    OptimizerError,
    RecipeError,
    StageFailed,
)
from optimizer.recipe import Recipe, load_recipe
from optimizer.registry import did_you_mean
from optimizer.run_record import RunRecord, now
from optimizer.rundir import RUN_JSON, SWEEP_JSON, RunDirectory, refuse_symlink, write_atomic
from optimizer.tradeoff import Column, TradeoffReport, as_number, write_tradeoff_report

if TYPE_CHECKING:
    from optimizer.pipeline import Capture

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
VARIANTS = "variants"
#: A grid larger than this is a typo, not a sweep (every variant is a full run).
MAX_VARIANTS = 256
#: ``--accuracy``: the mean of the gate's metrics (candidate scores), or one metric by name.
MEAN = "mean"
SizeAxis = Literal["exported_bytes", "effective_bits"]
SweepStatus = Literal["running", "success", "failed", "gate_failed", "interrupted"]
VariantStatus = Literal["pending", "running", "success", "failed", "gate_failed", "interrupted"]
#: Statuses of a variant's run that a resume keeps.
FINISHED = ("success", "gate_failed")
#: Bits per weight of an unquantized model stored in each dtype.
DTYPE_BITS = {"bfloat16": 16.0, "float16": 16.0, "float32": 32.0}


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Record(BaseModel):
    # sweep.json: unknown keys are kept, not refused (a newer minor release may add some).
    model_config = ConfigDict(extra="allow")


class Axis(_Data):
    """One grid axis: a ``--set`` key path and the values it takes (as typed, YAML)."""

    key: str
    values: list[str]

    def assignment(self, value: str) -> str:
        return f"{self.key}={value}"


class Variant(_Data):
    """One point of the grid: its directory name and the ``--set`` overrides that make it."""

    slug: str
    #: One ``KEY=VALUE`` per axis, in axis order.
    overrides: list[str]


class VariantMetrics(_Record):
    """What a variant's run.json says of accuracy and size (None where it does not)."""

    passed: bool | None = None
    failing: list[str] = Field(default_factory=list)
    #: The gate reused the baseline's cached scores (it did not evaluate the baseline).
    baseline_cached: bool | None = None
    #: Candidate score per gate metric, and the baseline's.
    scores: dict[str, float] = Field(default_factory=dict)
    baseline: dict[str, float] = Field(default_factory=dict)
    #: The sweep's accuracy (``--accuracy``) of the candidate, and of the baseline.
    accuracy: float | None = None
    baseline_accuracy: float | None = None
    #: Stored bits per weight of the quantized linears: a stage's measured ``effective_bits``
    #: (search, auto_quantize), else the format's (``formats.bits_per_weight``).
    effective_bits: float | None = None
    #: Bytes of the exported checkpoint's safetensors files (hf_checkpoint, else the
    #: TensorRT-LLM checkpoint).
    exported_bytes: int | None = None


class VariantRecord(Variant, _Record):
    model_config = ConfigDict(extra="allow")

    status: VariantStatus = "pending"
    #: What ``optimize run`` would have exited with (0, 1 stage failed, 2 bad input, 3 gate).
    exit_code: int | None = None
    run_dir: str
    recipe_sha256: str
    #: Finished in an earlier call with the same recipe: kept by ``--resume``, not run again.
    reused: bool = False
    seconds: float | None = None
    error: str | None = None
    metrics: VariantMetrics | None = None


class SweepRecord(_Record):
    """``sweep.json``."""

    schema_version: int = SCHEMA_VERSION
    name: str
    status: SweepStatus = "running"
    started_at: str = Field(default_factory=now)
    finished_at: str | None = None
    recipe_file: str | None = None
    #: The user's ``--set`` overrides, applied to every variant before the grid's.
    overrides: list[str] = Field(default_factory=list)
    grid: list[Axis]
    accuracy: str = MEAN
    size: SizeAxis = "exported_bytes"
    variants: list[VariantRecord]
    #: Slugs of the variants on the Pareto front of accuracy vs size.
    front: list[str] = Field(default_factory=list)
    report: dict[str, str] = Field(default_factory=dict)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


# --------------------------------------------------------------------------- the grid


def split_values(text: str) -> list[str]:
    """``a,b,[c,d]`` -> ``["a", "b", "[c,d]"]``: a comma inside brackets, braces or quotes
    belongs to its value (values are YAML, like ``--set``'s)."""
    values, current, depth, quote = [], "", 0, None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += ch
    return [*values, current.strip()]


def parse_axis(text: str) -> Axis:
    """``--grid KEY=V1,V2,...`` -> an :class:`Axis`; OptimizerError (exit 2) when malformed."""
    key, eq, raw = text.partition("=")
    key = key.strip()
    example = "e.g. --grid stages.ptq.format=fp8,int4_awq"
    if not eq or not key or any(not p for p in key.split(".")):
        raise OptimizerError(f"--grid {text!r}: expected KEY=VALUE,VALUE,..., {example}")
    values = split_values(raw)
    if values == [""]:
        raise OptimizerError(f"--grid {text!r}: no values after '=', {example}")
    if "" in values:
        raise OptimizerError(f"--grid {text!r}: an empty value (two commas, or one at an end)")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise OptimizerError(f"--grid {text!r}: {', '.join(repeated)} given more than once")
    return Axis(key=key, values=values)


def _slug_part(value: str) -> str:
    part = re.sub(r"[^A-Za-z0-9._]+", "_", value).strip("._")
    return part[:40] or "value"


def expand(axes: Sequence[Axis], overrides: Sequence[str] = ()) -> list[Variant]:
    """The cartesian product of ``axes`` (the last axis varies fastest), each variant named
    by its values (``fp8-none``; made unique with a number where two names coincide).
    Refuses (exit 2) no axis, an axis given twice, an axis the ``--set`` overrides also set,
    and more than MAX_VARIANTS variants."""
    if not axes:
        raise OptimizerError("a sweep needs at least one --grid KEY=VALUE,VALUE,...")
    keys = [a.key for a in axes]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise OptimizerError(f"--grid {', '.join(twice)} given more than once; one axis per key")
    fixed = {o.partition("=")[0].strip() for o in overrides}
    both = [k for k in keys if k in fixed]
    if both:
        raise OptimizerError(
            f"{', '.join(both)} is both a --grid axis and a --set override; drop one of them"
        )
    count = 1
    for axis in axes:
        count *= len(axis.values)
    if count > MAX_VARIANTS:
        raise OptimizerError(
            f"the grid has {count} variants (the product of its axes' lengths); a sweep runs "
            f"at most {MAX_VARIANTS}, each a full run"
        )
    variants, seen = [], set()
    for combo in itertools.product(*(a.values for a in axes)):
        slug = base = "-".join(_slug_part(v) for v in combo)
        n = 2
        while slug.lower() in seen:  # (case-insensitive file systems)
            slug, n = f"{base}-{n}", n + 1
        seen.add(slug.lower())
        overrides_ = [a.assignment(v) for a, v in zip(axes, combo, strict=True)]
        variants.append(Variant(slug=slug, overrides=overrides_))
    return variants


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class SweepPlan:
    """A validated sweep: the grid, and every variant with its recipe."""

    recipe_file: str
    overrides: list[str]
    axes: list[Axis]
    variants: list[tuple[Variant, Recipe]]
    accuracy: str
    size: SizeAxis

    @property
    def name(self) -> str:
        return self.variants[0][1].name


def _grid_problem_text(error: OptimizerError, grid: Sequence[str]) -> list[str]:
    """An error of loading a variant, told as the grid's where a grid assignment is the
    cause: ``--grid KEY`` (not ``--set KEY=VALUE``), so that the variants an axis fails
    alike share one message."""
    if isinstance(error, RecipeError):
        texts = []
        for p in error.problems:
            text = str(p)
            for assignment in grid:
                if p.file == f"--set {assignment}":
                    text = f"--grid {assignment.partition('=')[0]}" + text[len(p.file) :]
            texts.append(text)
        return texts
    text = str(error)
    for assignment in grid:
        text = text.replace(f"--set {assignment!r}", f"--grid {assignment.partition('=')[0]}")
    return [text]


def _sweep_problems(recipe: Recipe, accuracy: str, size: SizeAxis) -> list[str]:
    """What a variant needs for the sweep to measure it: a gate (its accuracy), the metric
    ``--accuracy`` names, an export for ``--size exported_bytes``."""
    gates = [s for s in recipe.stages if s.name == "gate"]
    problems = []
    if not gates:
        problems.append(
            "a sweep compares its variants by their gate's accuracy; the recipe has no gate stage"
        )
    elif accuracy != MEAN:
        metrics = [t.key for t in gates[-1].effective_suite(recipe.base_dir).tasks]
        if accuracy not in metrics:
            problems.append(
                f"--accuracy {accuracy}: the gate's suite measures {', '.join(metrics)} "
                f"(or use {MEAN}){did_you_mean(accuracy, metrics)}"
            )
    plan = recipe.plans[-1] if recipe.plans else None
    if size == "exported_bytes" and (plan is None or plan.exports is None):
        problems.append(
            "--size exported_bytes measures the exported checkpoint, and the recipe exports "
            "none; add an export stage or use --size effective_bits"
        )
    return problems


def plan_sweep(
    recipe_file: str | Path,
    grid: Sequence[str],
    overrides: Sequence[str] = (),
    *,
    accuracy: str = MEAN,
    size: SizeAxis = "exported_bytes",
) -> SweepPlan:
    """Parse and expand the grid and validate every variant as a full recipe (and as
    something the sweep can measure). Raises OptimizerError (exit 2) naming each invalid
    variant; nothing is written."""
    axes = [parse_axis(g) for g in grid]
    variants = expand(axes, overrides)
    loaded: list[tuple[Variant, Recipe]] = []
    problems: dict[str, list[str]] = {}  # problem -> the variants that have it
    by_sha: dict[str, str] = {}
    for variant in variants:
        try:
            recipe = load_recipe(recipe_file, [*overrides, *variant.overrides])
        except OptimizerError as e:
            found = _grid_problem_text(e, variant.overrides)
        else:
            found = _sweep_problems(recipe, accuracy, size)
            same = by_sha.setdefault(recipe.sha256(), variant.slug)
            if same != variant.slug:
                found.append(f"the same recipe as variant {same} (values that mean the same)")
            loaded.append((variant, recipe))
        for text in found:
            problems.setdefault(text, []).append(f"{variant.slug} ({', '.join(variant.overrides)})")
    if problems:
        bad = len({v for names in problems.values() for v in names})
        lines = [f"{bad} of {len(variants)} sweep variant(s) invalid; nothing was run:"]
        for text, names in problems.items():
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            who = "every variant" if len(names) == len(variants) else f"variant {names[0]}{more}"
            lines.append(f"  {who}: {text}")
        raise OptimizerError("\n".join(lines))
    return SweepPlan(str(recipe_file), list(overrides), axes, loaded, accuracy, size)


# --------------------------------------------------------------------------- measuring


def nominal_bits(recipe: Recipe) -> float | None:
    """Bits per weight the recipe's final plan stores its quantized linears in (one format:
    ``formats.bits_per_weight``; unquantized: the dtype's), None for a mix or a ModelOpt
    recipe (the stage that chose the mix reports ``effective_bits`` itself)."""
    from optimizer.formats import bits_per_weight

    quant = recipe.plans[-1].quantization if recipe.plans else None
    if quant is None:
        return DTYPE_BITS.get(recipe.model.dtype)
    if len(quant.formats) == 1:
        return bits_per_weight(quant.formats[0].format, quant.formats[0].group_size)
    return None


def exported_bytes(record: RunRecord, run_dir: Path) -> int | None:
    """Bytes of the safetensors files of the run's exported checkpoint (inside its run
    directory only; links are not followed)."""
    root = run_dir.resolve()
    for key in ("hf_checkpoint", "trtllm_checkpoint"):
        path = record.artifacts.get(key)
        if not path:
            continue
        p = Path(path)
        if p.is_symlink() or not p.resolve().is_relative_to(root) or not p.is_dir():
            return None
        return sum(
            f.stat().st_size for f in p.rglob("*.safetensors") if f.is_file() and not f.is_symlink()
        )
    return None


def _accuracy(scores: dict[str, float], accuracy: str) -> float | None:
    if accuracy == MEAN:
        return statistics.fmean(scores.values()) if scores else None
    return scores.get(accuracy)


def measure(record: RunRecord, run_dir: Path, recipe: Recipe, accuracy: str) -> VariantMetrics:
    """A variant's accuracy and size, from its run.json (the last gate's metrics, a stage's
    ``effective_bits``) and its exported files."""
    metrics = VariantMetrics(exported_bytes=exported_bytes(record, run_dir))
    gates = [s for s in record.stages if s.name == "gate" and s.metrics]
    if gates:
        gate = gates[-1].metrics or {}
        per_metric = {k: v for k, v in gate.items() if isinstance(v, dict) and "candidate" in v}
        metrics.passed = gate.get("passed") if isinstance(gate.get("passed"), bool) else None
        failing = gate.get("failing")
        metrics.failing = [str(f) for f in failing] if isinstance(failing, list) else []
        cached = gate.get("baseline_cached")
        metrics.baseline_cached = cached if isinstance(cached, bool) else None
        for name, values in per_metric.items():
            if (c := as_number(values.get("candidate"))) is not None:
                metrics.scores[name] = c
            if (b := as_number(values.get("baseline"))) is not None:
                metrics.baseline[name] = b
        metrics.accuracy = _accuracy(metrics.scores, accuracy)
        metrics.baseline_accuracy = _accuracy(metrics.baseline, accuracy)
    measured = [
        bits
        for s in record.stages
        if (bits := as_number((s.metrics or {}).get("effective_bits"))) is not None
    ]
    metrics.effective_bits = measured[-1] if measured else nominal_bits(recipe)
    return metrics


# --------------------------------------------------------------------------- running


def _finished(previous: RunRecord | None, recipe: Recipe) -> bool:
    """Whether a variant's previous run is finished and still holds for ``recipe``: a
    finished status, the same resolved recipe, and every stage's declared inputs (suite and
    task files, calibration data, lm-eval's version) as they were. (What else a stage's
    fingerprint covers -- the model's content, the compute packages -- only the runner's
    resume checks.)"""
    from optimizer.inputs import digests
    from optimizer.pipeline import stage_inputs

    if previous is None or previous.status not in FINISHED:
        return False
    if previous.recipe_sha256 != recipe.sha256() or len(previous.stages) != len(recipe.stages):
        return False
    return all(
        old.inputs is None or old.inputs == digests(stage_inputs(stage, recipe))
        for stage, old in zip(recipe.stages, previous.stages, strict=True)
    )


@dataclass
class SweepOutcome:
    directory: Path
    record: SweepRecord
    exit_code: int


class Sweep:
    """Runs a :class:`SweepPlan` into a sweep directory (see the module docstring)."""

    def __init__(
        self,
        plan: SweepPlan,
        directory: Path,
        *,
        resume: bool = False,
        force: bool = False,
        capture: Capture | None = None,
    ):
        self.plan = plan
        # A sweep is one process: its directory is written as rank 0's whatever RANK says.
        self.dir = RunDirectory(directory, rank=0)
        self.resume = resume
        self.force = force
        self.capture = capture

    @property
    def sweep_json(self) -> Path:
        return self.dir.path / SWEEP_JSON

    def variant_dir(self, slug: str) -> Path:
        return self.dir.path / VARIANTS / slug

    def run(self) -> SweepOutcome:
        from optimizer import launch

        if launch.world_size() > 1:
            raise OptimizerError(
                "optimize sweep runs its variants one after another in one process; start it "
                "without torchrun / accelerate launch"
            )
        self.dir.lock()
        try:
            previous = self._prepare()
            record = SweepRecord(
                name=self.plan.name,
                recipe_file=self.plan.recipe_file,
                overrides=self.plan.overrides,
                grid=self.plan.axes,
                accuracy=self.plan.accuracy,
                size=self.plan.size,
                variants=[
                    VariantRecord(
                        **variant.model_dump(),
                        run_dir=str(self.variant_dir(variant.slug)),
                        recipe_sha256=recipe.sha256(),
                    )
                    for variant, recipe in self.plan.variants
                ],
            )
            self._save(record)
            try:
                for i, (variant, recipe) in enumerate(self.plan.variants):
                    self._variant(i, record, recipe, previous.get(variant.slug))
            except KeyboardInterrupt:
                record.status = "interrupted"
                raise
            finally:
                record.finished_at = now()
                self._save(record)
            code = self._finish(record)
            self._save(record)
        finally:
            self.dir.unlock()
        return SweepOutcome(self.dir.path, record, code)

    def _save(self, record: SweepRecord) -> None:
        write_atomic(self.sweep_json, record.to_json())

    def _prepare(self) -> dict[str, RunRecord | None]:
        """Check the directory (ours, no links where the sweep writes, a sweep and not a
        run) and read the variants' previous runs; OptimizerError (exit 2) otherwise."""
        path = self.dir.path
        for p in (self.sweep_json, path / VARIANTS):
            refuse_symlink(p)
        if self.force and (self.sweep_json.exists() or (path / RUN_JSON).exists()):
            self.dir.clear()  # refused for a directory that is not ours
        elif (path / RUN_JSON).exists():
            raise OptimizerError(
                f"{path} holds a run ({RUN_JSON}) of optimize run, not a sweep; choose another "
                "directory with -o"
            )
        elif self.sweep_json.exists() and not self.resume:
            raise OptimizerError(
                f"{path} already holds a sweep. Use --resume to continue it (finished variants "
                "with the same recipe are kept), --force to start over (deletes it), or -o to "
                "choose another directory."
            )
        elif self.sweep_json.exists():
            try:
                old = SweepRecord.model_validate_json(self.sweep_json.read_text(encoding="utf-8"))
                if old.schema_version != SCHEMA_VERSION:
                    raise ValueError(f"schema_version {old.schema_version}, not {SCHEMA_VERSION}")
            except (OSError, ValueError) as e:  # (a ValidationError is a ValueError)
                first = e.errors()[0]["msg"] if isinstance(e, ValidationError) else e
                raise OptimizerError(
                    f"{self.sweep_json} is not a sweep record ({first}); cannot resume from "
                    "it. Use --force (on a directory of ours) or another -o"
                ) from None
        previous: dict[str, RunRecord | None] = {}
        for variant, _ in self.plan.variants:
            where = self.variant_dir(variant.slug)
            refuse_symlink(where)
            previous[variant.slug] = (
                RunDirectory(where, rank=0).read() if self.resume and where.is_dir() else None
            )
        return previous

    def _variant(
        self, i: int, record: SweepRecord, recipe: Recipe, previous: RunRecord | None
    ) -> None:
        from optimizer.pipeline import log_to_file, run_recipe

        entry = record.variants[i]
        where = self.variant_dir(entry.slug)
        n = f"[{i + 1}/{len(record.variants)}] variant {entry.slug}"
        if _finished(previous, recipe):
            entry.status, entry.reused, entry.seconds = previous.status, True, 0.0
            entry.exit_code = EXIT_OK if previous.status == "success" else EXIT_GATE_FAILED
            entry.metrics = measure(previous, where, recipe, record.accuracy)
            log.info("%s: kept (finished earlier with the same recipe: %s)", n, previous.status)
            return
        log.info("%s: %s", n, ", ".join(entry.overrides))
        entry.status = "running"
        self._save(record)
        try:
            run_recipe(
                recipe,
                where,
                resume=self.resume,
                recipe_file=record.recipe_file,
                overrides=[*record.overrides, *entry.overrides],
                capture=self.capture or log_to_file,
            )
            entry.exit_code = EXIT_OK
        except GateFailed as e:
            entry.exit_code, entry.error = EXIT_GATE_FAILED, str(e)
        except StageFailed as e:
            entry.exit_code, entry.error = EXIT_STAGE_FAILED, str(e)
        except OptimizerError as e:
            entry.exit_code, entry.error = EXIT_BAD_INPUT, str(e)
        except KeyboardInterrupt:
            entry.status = "interrupted"
            raise
        done = RunDirectory(where, rank=0).read() if (where / RUN_JSON).is_file() else None
        if done is None or entry.exit_code == EXIT_BAD_INPUT:
            entry.status = "failed"  # (refused before or while running: no finished run)
        else:
            entry.status = done.status if done.status != "running" else "failed"
        if done is not None:
            entry.seconds = round(sum(s.seconds or 0.0 for s in done.stages), 3)
            entry.metrics = measure(done, where, recipe, record.accuracy)
        log.info("%s: %s%s", n, entry.status, f" ({entry.error})" if entry.error else "")

    def _finish(self, record: SweepRecord) -> int:
        """The front, the report, the sweep's status; returns the exit code."""
        report = write_report(self.dir.path, record)
        record.front = [record.variants[i].slug for i in report.front]
        record.report = {"markdown": str(report.markdown), "html": str(report.html)}
        if any(v.status not in FINISHED for v in record.variants):
            record.status, code = "failed", EXIT_STAGE_FAILED
        elif not any(v.status == "success" for v in record.variants):
            record.status, code = "gate_failed", EXIT_GATE_FAILED
        else:
            record.status, code = "success", EXIT_OK
        return code


def run_sweep(plan: SweepPlan, directory: Path, **kwargs) -> SweepOutcome:
    return Sweep(plan, directory, **kwargs).run()


def default_sweep_dir(plan: SweepPlan) -> Path:
    return Path("runs") / f"{plan.name}-sweep"


# --------------------------------------------------------------------------- report


def _axis_header(key: str) -> str:
    return key.removeprefix("stages.")


def report_rows(record: SweepRecord) -> list[dict]:
    """One flat row per variant for the trade-off report."""
    rows = []
    for v in record.variants:
        m = v.metrics or VariantMetrics()
        row = {
            "variant": v.slug,
            **{
                _axis_header(a.key): o.partition("=")[2]
                for a, o in zip(record.grid, v.overrides, strict=True)
            },
            "status": v.status + (" (kept)" if v.reused else ""),
            "passed": m.passed,
            "gate": {True: "pass", False: "fail"}.get(m.passed, "–"),
            "accuracy": m.accuracy,
            "effective_bits": m.effective_bits,
            "exported_mb": m.exported_bytes / 1e6 if m.exported_bytes is not None else None,
            **{f"metric:{k}": s for k, s in m.scores.items()},
        }
        rows.append(row)
    return rows


def write_report(directory: Path, record: SweepRecord) -> TradeoffReport:
    """``sweep.md`` and ``sweep.html`` (optimizer.tradeoff) for the variants so far."""
    rows = report_rows(record)
    metric_names = list(
        dict.fromkeys(k for v in record.variants for k in (v.metrics or VariantMetrics()).scores)
    )
    if record.accuracy != MEAN:
        accuracy = record.accuracy
    elif len(metric_names) == 1:
        accuracy = metric_names[0]
    else:
        accuracy = f"mean of {len(metric_names)} gate metrics"
    if record.size == "exported_bytes":
        x_key, x_label = "exported_mb", "exported checkpoint (MB)"
    else:
        x_key, x_label = "effective_bits", "effective bits per weight"
    columns = [
        Column("variant", "variant"),
        *(Column(_axis_header(a.key), _axis_header(a.key)) for a in record.grid),
        Column("status", "status"),
        Column("gate", "gate"),
        Column("accuracy", "accuracy", "{:.4f}"),
        Column("effective_bits", "effective bits", "{:.3f}"),
        Column("exported_mb", "exported MB", "{:.2f}"),
        *(Column(f"metric:{k}", k, "{:.4f}") for k in metric_names),
    ]
    baselines = [
        v.metrics.baseline_accuracy
        for v in record.variants
        if v.metrics is not None and v.metrics.baseline_accuracy is not None
    ]
    passed = [r for r in rows if r["passed"]]
    sized = [r for r in passed if r.get(x_key) is not None]
    if sized:
        verdict = f"Smallest variant that passed its gate: {min(sized, key=lambda r: r[x_key])['variant']}."
    elif passed:
        verdict = (
            f"Passed their gate (size not measured): {', '.join(r['variant'] for r in passed)}."
        )
    else:
        verdict = "No variant passed its gate."
    notes = [
        f"{len(rows)} variant(s) of {record.name} over "
        + " x ".join(f"{a.key} ({', '.join(a.values)})" for a in record.grid)
        + f"; accuracy: {accuracy}; size: {x_label}.",
        verdict,
    ]
    evaluated = sum(
        1 for v in record.variants if v.metrics is not None and v.metrics.baseline_cached is False
    )
    meta = {
        "recipe": record.recipe_file,
        "overrides": " ".join(record.overrides) or "none",
        "baseline accuracy": f"{baselines[0]:.4f}" if baselines else "–",
        "gates that evaluated the baseline": evaluated,
        "started": record.started_at,
        "finished": record.finished_at,
    }
    return write_tradeoff_report(
        directory,
        f"Sweep {record.name}: accuracy vs size",
        rows,
        x_key,
        "accuracy",
        columns=columns,
        x_label=x_label,
        y_label=f"accuracy ({accuracy})",
        label_key="variant",
        pass_key="passed",
        reference_y=baselines[0] if baselines else None,
        notes=notes,
        meta=meta,
        stem="sweep",
    )
