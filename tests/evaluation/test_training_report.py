"""The gate reports' Training section: the table in report.md, one loss-curve PNG per training
stage in report.html, and ``optimize report`` regenerating both from run.json."""

import base64
import json
import re

import pytest

from optimizer.cli import main
from optimizer.evaluation import Suite, SuiteScores, TaskScores
from optimizer.evaluation.report import (
    html_page,
    loss_curve_png,
    markdown,
    regenerate,
    training_stages,
    write_reports,
)
from optimizer.evaluation.verdict import decide

PNG = b"\x89PNG\r\n\x1a\n"


def scores(values):
    return TaskScores.from_docs({f"t:{i}": float(v) for i, v in enumerate(values)})


@pytest.fixture
def verdict():
    suite = Suite(name="s", tasks=[{"task": "t", "metric": "acc"}])
    return decide(
        suite,
        SuiteScores({"t/acc": scores([1, 1, 0, 1] * 10)}),
        SuiteScores({"t/acc": scores([1, 1, 0, 1] * 10)}),
    )


def metrics(trainer="QATTrainer", steps=40, resumed=0, heldout=(3.91234, 2.71828)):
    """What ``train`` returns (and the runner records in run.json), plausible numbers."""
    return {
        "trainer": trainer,
        "steps": steps,
        "resumed_from_step": resumed,
        "steps_this_run": steps - resumed,
        "world_size": 1,
        "tokens": steps * 4 * 64,
        "train_seconds": 12.4,
        "train_loss_mean": 3.1,
        "before": {"heldout_loss": heldout[0], "train_loss": 3.8},
        "after": {"heldout_loss": heldout[1], "train_loss": 2.6},
        "loss_curve": [[s, round(4.0 - 0.03 * s, 5)] for s in range(1, steps + 1)],
        "eval_curve": [[s, round(3.9 - 0.03 * s, 5)] for s in range(8, steps + 1, 8)],
        "data": {"train_windows": 100, "heldout_windows": 8, "seq_len": 64},
    }


META = {"suite": "tiny", "evaluated": "stages/03-export/model", "recipe": "r.yaml"}


def test_markdown_has_a_training_table_with_the_numbers(verdict):
    training = [("qat", metrics()), ("distill", metrics("KDTrainer", steps=12))]
    md = markdown(verdict, META, training)
    lines = md.splitlines()
    i = lines.index("## Training")
    header = next(line for line in lines[i:] if line.startswith("| stage"))
    assert "held-out loss before -> after" in header
    rows = [line for line in lines[i:] if line.startswith("| qat") or line.startswith("| distill")]
    assert rows[0] == "| qat | QATTrainer | 40 | 10,240 | 12 s | 3.9123 -> 2.7183 |"
    assert rows[1] == "| distill | KDTrainer | 12 | 3,072 | 12 s | 3.9123 -> 2.7183 |"
    # The Training section sits between the verdict and the Run section.
    assert md.index("# Accuracy gate") < md.index("## Training") < md.index("## Run")
    assert "loss.png" in md


def test_markdown_without_training_has_no_training_section(verdict):
    assert "## Training" not in markdown(verdict, META)
    assert "## Training" not in markdown(verdict, META, [])
    assert "Training" not in html_page(verdict, META)


def test_html_embeds_one_loss_png_per_training_stage(verdict):
    training = [("qat", metrics()), ("distill", metrics("KDTrainer", steps=12, resumed=6))]
    page = html_page(verdict, META, training)
    images = re.findall(
        r'<img class="loss" alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page
    )
    assert [alt for alt, _ in images] == ["qat loss curve", "distill loss curve"]
    for _, data in images:
        assert base64.b64decode(data).startswith(PNG)
    assert '<table id="training">' in page
    assert "<td>3.9123 -&gt; 2.7183</td>" in page  # escaped in the HTML table
    assert page.count('<img id="plot"') == 1  # the gate plot is still there, once


def test_loss_curve_png(tmp_path):
    assert loss_curve_png("qat", metrics()).startswith(PNG)
    # Resumed, or with only one of the curves: still a picture.
    assert loss_curve_png("qat", metrics(resumed=20)).startswith(PNG)
    assert loss_curve_png("qat", {**metrics(), "eval_curve": []}).startswith(PNG)


def test_training_stages_keeps_only_stages_with_a_loss_curve():
    qat = metrics()
    stages = [
        ("ptq", {"format": "fp8"}),
        ("qat", qat),
        ("export", None),
        ("distill", {**metrics(), "loss_curve": []}),
        ("gate", {"passed": True}),
    ]
    assert training_stages(stages) == [("qat", qat)]
    assert training_stages([]) == []


def run_dir_with_training(tmp_path, verdict, stage_metrics):
    """A run directory as the runner leaves it: run.json with stage metrics and the gate's
    artifacts (its gate.json written by write_reports, without the training section)."""
    run_dir = tmp_path / "run"
    report = run_dir / "stages" / "03-gate" / "report"
    report.mkdir(parents=True)
    write_reports(report, verdict, META)
    record = {
        "schema_version": 2,
        "name": "tiny",
        "status": "success",
        "stages": [
            {"index": 0, "name": "ptq", "status": "success", "metrics": {"format": "fp8"}},
            {"index": 1, "name": "qat", "status": "success", "metrics": stage_metrics},
            {"index": 2, "name": "export", "status": "success"},
            {
                "index": 3,
                "name": "gate",
                "status": "success",
                "metrics": {"passed": True},
                "outputs": {"report": {"path": str(report), "sha256": "0" * 64}},
            },
        ],
        "artifacts": {
            "gate": str(report / "gate.json"),
            "report": str(report / "report.html"),
        },
    }
    (run_dir / "run.json").write_text(json.dumps(record))
    return run_dir, report


def test_regenerate_adds_the_training_section_from_run_json(tmp_path, verdict):
    run_dir, report = run_dir_with_training(tmp_path, verdict, metrics())
    assert "## Training" not in (report / "report.md").read_text()
    gate_before = (report / "gate.json").read_text()

    assert regenerate(run_dir) == report / "report.html"
    md = (report / "report.md").read_text()
    assert "## Training" in md and "| qat | QATTrainer | 40 |" in md
    assert "3.9123 -> 2.7183" in md
    page = (report / "report.html").read_text()
    assert page.count('<img class="loss"') == 1
    assert (report / "gate.json").read_text() == gate_before  # the contract is not rewritten


def test_optimize_report_regenerates_with_training(tmp_path, verdict, capsys):
    run_dir, report = run_dir_with_training(tmp_path, verdict, metrics())
    assert main(["report", str(run_dir)]) == 0
    assert str(report / "report.html") in capsys.readouterr().out
    assert "## Training" in (report / "report.md").read_text()


def test_regenerate_without_a_gate_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "run.json").write_text(json.dumps({"name": "x", "stages": [], "artifacts": {}}))
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "this run has no gate result" in err and "Traceback" not in err


def test_regenerate_lists_only_training_before_the_gate(tmp_path, verdict):
    run_dir, report = run_dir_with_training(tmp_path, verdict, metrics())
    record = json.loads((run_dir / "run.json").read_text())
    # ptq -> gate -> qat (a valid recipe): the gate judged the model before training.
    ptq, qat, _, gate = record["stages"]
    record["stages"] = [ptq, {**gate, "index": 1}, {**qat, "index": 2}]
    (run_dir / "run.json").write_text(json.dumps(record))
    regenerate(run_dir)
    assert "## Training" not in (report / "report.md").read_text()
