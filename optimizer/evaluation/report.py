"""Gate reports: ``gate.json`` (the machine-readable contract), and for people Markdown and a
self-contained HTML page with a plot.

All three are written from the typed :class:`~optimizer.evaluation.verdict.Verdict` and a
flat ``meta`` mapping (suite, what was evaluated, baseline, timings); ``gate.json`` holds
both, so ``optimize report RUN_DIR`` can regenerate the other two at any time.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer.evaluation.verdict import MetricVerdict, Verdict
from optimizer.report_pages import (
    FAIL_COLOR,
    PASS_COLOR,
    REFERENCE_COLOR,
    html_document,
    html_meta_table,
    html_table,
    img_tag,
    md_table,
    png_bytes,
    pyplot,
)

if TYPE_CHECKING:
    from optimizer.evaluation import Judgement

VERDICT_MARK = {"pass": "PASS", "fail": "FAIL", "inconclusive": "INCONCLUSIVE"}


def _fmt_threshold(m: MetricVerdict) -> str:
    t = m.threshold
    if "max_drop" in t:
        return f"drop ≤ {t['max_drop']:.3f}"
    if "max_relative_drop" in t:
        return f"drop ≤ {100 * t['max_relative_drop']:.1f} % ({m.allowed_drop or 0:.3f})"
    return f"≥ {t['min_value']:.3f}"


def _rows(gate: Verdict) -> list[list[str]]:
    rows = []
    for m in gate.metrics:
        lo, hi = m.delta_ci95
        rows.append(
            [
                m.metric,
                str(m.n),
                f"{m.baseline:.4f}",
                f"{m.candidate:.4f}",
                f"{m.delta:+.4f} [{lo:+.4f}, {hi:+.4f}]",
                _fmt_threshold(m),
                VERDICT_MARK[m.verdict],
            ]
        )
    return rows


HEADER = ["metric", "docs", "baseline", "candidate", "delta [95 % CI]", "threshold", "verdict"]


def plot_png(gate: Verdict) -> bytes:
    plt = pyplot()
    metrics = gate.metrics
    names = [m.metric.removeprefix("local_") for m in metrics]
    x = range(len(metrics))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(metrics)), 3.6), dpi=110)
    width = 0.38
    ax.bar(
        [i - width / 2 for i in x],
        [m.baseline for m in metrics],
        width,
        label="baseline",
        color=REFERENCE_COLOR,
    )
    ax.bar(
        [i + width / 2 for i in x],
        [m.candidate for m in metrics],
        width,
        label="candidate",
        color=[PASS_COLOR if m.verdict == "pass" else FAIL_COLOR for m in metrics],
        yerr=[1.96 * m.delta_stderr for m in metrics],
        capsize=3,
    )
    ax.set_xticks(list(x), names, rotation=15)
    ax.set_ylabel("score (accuracy, agreement)")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right")
    ax.set_title("baseline vs candidate (error bar: 95 % CI of the paired difference)", fontsize=9)
    return png_bytes(fig)


#: ``(stage name, its run.json metrics)`` of the training stages before the gate.
Training = list[tuple[str, dict[str, Any]]]


def training_stages(stages: list[tuple[str, dict[str, Any] | None]]) -> Training:
    """The stages among ``(name, metrics)`` that trained (their metrics hold a loss curve)."""
    return [(n, m) for n, m in stages if m and m.get("loss_curve")]


def loss_curve_png(stage: str, metrics: dict[str, Any]) -> bytes:
    """Training loss and held-out loss per optimizer step (one training stage's metrics)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=110)
    for key, label, style in (
        ("loss_curve", "training loss", "-"),
        ("eval_curve", "held-out loss", "o-"),
    ):
        points = metrics.get(key) or []
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label, ms=3)
    resumed = metrics.get("resumed_from_step") or 0
    if resumed:
        ax.axvline(resumed, color="#999", ls=":", lw=1, label=f"resumed at step {resumed}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"loss ({metrics.get('trainer', stage)})")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(
        f"{stage}: {metrics.get('steps', '?')} steps, {metrics.get('tokens', 0):,} tokens",
        fontsize=9,
    )
    return png_bytes(fig)


def _training_rows(training: Training) -> list[list[str]]:
    rows = []
    for name, m in training:
        before, after = m.get("before") or {}, m.get("after") or {}
        rows.append(
            [
                name,
                str(m.get("trainer", "")),
                str(m.get("steps", "")),
                f"{m.get('tokens', 0):,}",
                f"{m.get('train_seconds', 0):.0f} s",
                f"{before.get('heldout_loss', float('nan')):.4f} -> {after.get('heldout_loss', float('nan')):.4f}",
            ]
        )
    return rows


TRAINING_HEADER = ["stage", "trainer", "steps", "tokens", "time", "held-out loss before -> after"]


def markdown(gate: Verdict, meta: dict[str, Any], training: Training = ()) -> str:
    status = "PASSED" if gate.passed else "FAILED"
    lines = [f"# Accuracy gate: {status}", ""]
    if gate.failing:
        lines += [f"Failing: {', '.join(gate.failing)}", ""]
    lines += md_table(HEADER, _rows(gate))
    lines += ["", f"Rule: {gate.rule}; inconclusive counts as {gate.on_inconclusive}.", ""]
    for m in gate.metrics:
        lines.append(f"- {m.metric}: {m.verdict} — {m.reason}")
    if training:
        lines += ["", "## Training", "", *md_table(TRAINING_HEADER, _training_rows(training))]
        lines += ["", "Loss curves: report.html, and each stage's training/loss.png."]
    lines += ["", "## Run", ""] + [f"- {k}: {v}" for k, v in meta.items()]
    return "\n".join(lines) + "\n"


def _training_html(training: Training) -> str:
    if not training:
        return ""
    plots = "".join(
        img_tag(loss_curve_png(name, m), f"{name} loss curve", img_class="loss")
        for name, m in training
    )
    table = html_table(TRAINING_HEADER, _training_rows(training), table_id="training")
    return f"<h2>Training</h2>{table}{plots}"


#: Verdict colours of the metrics table's last column.
VERDICT_CSS = """\
tr.fail td:last-child { color: #cf222e; font-weight: bold; }
tr.pass td:last-child { color: #1a7f37; font-weight: bold; }
tr.inconclusive td:last-child { color: #9a6700; font-weight: bold; }
"""


def html_page(gate: Verdict, meta: dict[str, Any], training: Training = ()) -> str:
    status = "PASSED" if gate.passed else "FAILED"
    color = "#1a7f37" if gate.passed else "#cf222e"
    table = html_table(
        HEADER, _rows(gate), table_id="metrics", row_classes=[m.verdict for m in gate.metrics]
    )
    plot = img_tag(plot_png(gate), "accuracy per task, baseline vs candidate", img_id="plot")
    reasons = "".join(
        f"<li><b>{html.escape(m.metric)}</b>: {html.escape(m.reason)}</li>" for m in gate.metrics
    )
    body = f"""<h1>Accuracy gate: <span id="status">{status}</span></h1>
{table}
{plot}
<p>Rule: {html.escape(gate.rule)}; inconclusive counts as {html.escape(gate.on_inconclusive)}.</p>
<ul>{reasons}</ul>
{_training_html(training)}
<h2>Run</h2>{html_meta_table(meta)}"""
    return html_document(
        f"Accuracy gate: {status}", body, f"h1 span {{ color: {color}; }}\n" + VERDICT_CSS
    )


def run_meta(judgement: Judgement, *, evaluated: str, recipe: str) -> dict[str, Any]:
    """The ``meta`` of ``gate.json`` and the reports' "Run" section."""
    return {
        "suite": judgement.suite,
        "evaluated": evaluated,
        "baseline_model": judgement.baseline_model,
        "baseline_cached": judgement.baseline_cached,
        "baseline_seconds": round(judgement.baseline_seconds, 1),
        "candidate_seconds": round(judgement.candidate_seconds, 1),
        "recipe": recipe,
    }


def write_reports(
    directory: Path, gate: Verdict, meta: dict[str, Any], training: Training = ()
) -> None:
    """``gate.json``, ``report.md`` and ``report.html`` into ``directory``; ``training``
    adds the training stages' losses and curves to the pages."""
    (directory / "gate.json").write_text(
        json.dumps({**gate.to_json(), "meta": meta}, indent=2) + "\n"
    )
    _write_pages(directory, gate, meta, training)


def _write_pages(
    directory: Path, gate: Verdict, meta: dict[str, Any], training: Training = ()
) -> None:
    (directory / "report.md").write_text(markdown(gate, meta, training))
    (directory / "report.html").write_text(html_page(gate, meta, training))


def read_gate(path: Path) -> tuple[Verdict, dict[str, Any]]:
    """A ``gate.json``: the verdict and its ``meta``. Raises ValueError (one line) for a file
    that is not a gate result."""
    from pydantic import ValidationError

    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"it holds {type(data).__name__}, not a JSON object")
    meta = data.pop("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise ValueError(f"meta is {type(meta).__name__}, not an object")
    try:
        return Verdict.model_validate(data), meta
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "(top level)"
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ValueError(f"{where}: {first['msg']}{more}") from None


def _gate_file(run_dir: Path, record: dict) -> Path:
    """run.json's ``artifacts.gate``, resolved (a relative path is relative to the run
    directory) and refused unless it lies inside the run directory: the report is written
    beside it, and ``optimize report`` writes nowhere else."""
    from optimizer.errors import OptimizerError

    artifacts = record.get("artifacts")
    if artifacts is None:
        artifacts = {}
    if not isinstance(artifacts, dict):
        raise OptimizerError(
            f"{run_dir}/run.json: artifacts is {type(artifacts).__name__}, not an object"
        )
    gate_file = artifacts.get("gate")
    if not gate_file:
        raise OptimizerError(
            f"{run_dir}: this run has no gate result (run a recipe with a gate stage)"
        )
    if not isinstance(gate_file, str) or any(ord(c) < 32 for c in gate_file):
        raise OptimizerError(f"{run_dir}/run.json: artifacts.gate {gate_file!r} is not a path")
    root = run_dir.resolve()
    path = (root / gate_file).resolve()  # an absolute gate_file replaces root
    if not path.is_relative_to(root):
        raise OptimizerError(
            f"{run_dir}/run.json: artifacts.gate {gate_file} lies outside the run directory; "
            "optimize report writes only inside it"
        )
    if not path.is_file():
        raise OptimizerError(
            f"{run_dir}/run.json: artifacts.gate {gate_file} does not exist (the run's gate "
            "result is missing)"
        )
    return path


def _curve(points: Any) -> bool:
    """A loss curve as run.json holds it (absent, or a list of [step, loss] pairs)."""
    if points is None:
        return True
    return isinstance(points, list) and all(
        isinstance(p, list | tuple)
        and len(p) == 2
        and all(isinstance(x, int | float) and not isinstance(x, bool) for x in p)
        for p in points
    )


def regenerate(run_dir: Path) -> Path:
    """Rewrite report.md / report.html of a run from its gate.json (``optimize report``)."""
    from optimizer.errors import OptimizerError

    run_json = run_dir / "run.json"
    try:
        record = json.loads(run_json.read_text())
    except (OSError, ValueError) as e:
        raise OptimizerError(f"{run_dir} has no readable run.json ({e})") from None
    if not isinstance(record, dict):
        raise OptimizerError(
            f"{run_json} does not describe a run (it holds {type(record).__name__})"
        )
    gate_path = _gate_file(run_dir, record)
    gate_file = str(gate_path)
    try:
        gate, meta = read_gate(gate_path)
    except (OSError, ValueError) as e:
        raise OptimizerError(f"{gate_file} is not a readable gate result ({e})") from None
    stages = record.get("stages")
    if not isinstance(stages, list):
        stages = []
    stages = [s for s in stages if isinstance(s, dict)]
    for s in stages:
        if not isinstance(s.get("outputs"), dict):
            s["outputs"] = {}
        if not isinstance(s.get("metrics"), dict | None):
            s["metrics"] = None
    # The training stages the gate judged: those before the stage that wrote the report.
    report_dir = str(Path(gate_file).parent)
    gate_index = next(
        (
            i
            for i, s in enumerate(stages)
            if any(
                isinstance(o, dict) and o.get("path") == report_dir
                for o in (s.get("outputs") or {}).values()
            )
        ),
        len(stages),
    )
    training = [
        (str(name), metrics)
        for name, metrics in training_stages(
            [(s.get("name", "?"), s.get("metrics")) for s in stages[:gate_index]]
        )
        if all(_curve(metrics.get(k)) for k in ("loss_curve", "eval_curve"))
    ]
    _write_pages(Path(gate_file).parent, gate, meta, training)
    return Path(gate_file).parent / "report.html"
