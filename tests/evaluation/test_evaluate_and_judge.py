"""``evaluate_and_judge``: the one call behind the gate stage, ``optimize gate`` and library use;
it passes the identical model and fails a damaged one."""

import json
import subprocess
import sys

import pytest

import optimizer.evaluation as evaluation
from optimizer.cli import main
from optimizer.evaluation import (
    BaselineRef,
    CheckpointCandidate,
    ModelCandidate,
    apply_overrides,
    evaluate_and_judge,
    load_suite,
)

KEY = "local_arc_easy/acc"


@pytest.fixture
def calls(monkeypatch):
    """Every evaluate_and_judge call, by whoever makes it: (candidate, judgement)."""
    seen = []
    original = evaluation.evaluate_and_judge

    def spy(suite, baseline, candidate, **kwargs):
        judgement = original(suite, baseline, candidate, **kwargs)
        seen.append((candidate, judgement))
        return judgement

    monkeypatch.setattr(evaluation, "evaluate_and_judge", spy)
    return seen


def baseline_of(path) -> BaselineRef:
    """The baseline as the pipeline and ``optimize gate`` describe it (same cache key)."""
    from optimizer import hardware, models

    resolved = models.resolve_source(str(path), path.parent)
    return BaselineRef(
        path=resolved.path,
        fingerprint=resolved.fingerprint,
        dtype="bfloat16",
        compute_dtype=hardware.compute_dtype("bfloat16", "auto", cuda=False),
    )


def test_identical_model_passes_and_a_zeroed_one_fails(tiny_llama, arc_suite, tmp_path):
    import torch

    from optimizer.models import load_model, load_tokenizer

    suite, baseline = load_suite(arc_suite), baseline_of(tiny_llama)
    tokenizer = load_tokenizer(tiny_llama)
    same = evaluate_and_judge(
        suite,
        baseline,
        ModelCandidate(load_model(tiny_llama, baseline.compute_dtype), tokenizer),
        cache_dir=tmp_path,
    )
    assert same.passed and not same.baseline_cached
    (m,) = same.verdict.metrics
    assert (m.verdict, m.n, m.delta, m.delta_stderr) == ("pass", 40, 0.0, 0.0)
    assert same.candidate[KEY].docs == same.baseline[KEY].docs
    assert same.baseline_cache_file is not None and same.baseline_cache_file.is_file()

    damaged = load_model(tiny_llama, baseline.compute_dtype)
    with torch.no_grad():
        for p in damaged.parameters():
            p.zero_()
    broken = evaluate_and_judge(
        suite, baseline, ModelCandidate(damaged, tokenizer), cache_dir=tmp_path
    )
    assert broken.baseline_cached  # the baseline is evaluated once
    assert broken.baseline == same.baseline
    (m,) = broken.verdict.metrics
    flips = sum(broken.candidate[KEY].docs[k] != v for k, v in broken.baseline[KEY].docs.items())
    # A random tiny model is near chance, so the damage is not *confidently* worse: the gate
    # fails it because it cannot show the drop is within 2 points (on_inconclusive: fail).
    assert flips >= 3 and m.delta_stderr > 0.02
    assert m.verdict in ("fail", "inconclusive") and m.delta - 1.645 * m.delta_stderr < -0.02
    assert not broken.passed and broken.verdict.failing == [KEY]
    relaxed = evaluate_and_judge(
        suite,
        baseline,
        ModelCandidate(damaged, tokenizer),
        cache_dir=tmp_path,
        on_inconclusive="pass",
    )
    assert relaxed.passed == (m.verdict == "inconclusive")


def gate_args(model, suite, out) -> list[str]:
    """``optimize gate`` of ``model`` against itself on ``suite`` into ``out``."""
    return [
        "gate",
        "--baseline",
        str(model),
        "--candidate",
        str(model),
        "--suite",
        str(suite),
        "-o",
        str(out),
        "-q",
    ]


def test_stage_and_cli_go_through_evaluate_and_judge(
    tiny_llama, arc_suite, tmp_path, monkeypatch, calls
):
    monkeypatch.setenv("OPTIMIZER_CACHE_DIR", str(tmp_path / "cache"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: g\nmodel: {{source: {tiny_llama}}}\nstages:\n  - gate: {{suite: {arc_suite}}}\n"
    )
    assert main(["run", str(recipe), "-o", str(tmp_path / "run"), "-q"]) == 0
    out = tmp_path / "gate"
    assert main(gate_args(tiny_llama, arc_suite, out)) == 0
    (stage_candidate, by_stage), (cli_candidate, by_cli) = calls
    # The stage's first model is the source checkpoint; the CLI's is the --candidate dir.
    assert isinstance(stage_candidate, CheckpointCandidate) and stage_candidate.path == tiny_llama
    assert isinstance(cli_candidate, CheckpointCandidate) and cli_candidate.path == tiny_llama
    assert by_cli.baseline_cached and by_cli.baseline == by_stage.baseline  # one cache entry
    for run_dir, judgement in ((tmp_path / "run", by_stage), (out, by_cli)):
        gate = json.loads((run_dir / "report" / "gate.json").read_text())
        assert gate == {**judgement.verdict.to_json(), "meta": gate["meta"]}
        record = json.loads((run_dir / "run.json").read_text())
        assert record["stages"][0]["metrics"] == judgement.summary()
        assert record["status"] == "success"


def test_optimize_gate_run_json(tiny_llama, arc_suite, tmp_path, monkeypatch, capsys):
    """The run record of a gate run: today's keys, the report committed with its hash, and
    an existing run refused without --force."""
    from optimizer.rundir import sha256_tree

    monkeypatch.setenv("OPTIMIZER_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "gate"
    args = [*gate_args(tiny_llama, arc_suite, out), "--limit", "5", "--max-drop", "default=0.1"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    record = json.loads((out / "run.json").read_text())
    assert summary == {
        "status": "success",
        "run_json": str(out / "run.json"),
        "artifacts": record["artifacts"],
    }
    assert list(record) == [
        "schema_version",
        "name",
        "status",
        "started_at",
        "finished_at",
        "recipe_file",
        "overrides",
        "recipe",
        "recipe_sha256",
        "versions",
        "device",
        "startup",  # (the runner's import timing; None for optimize gate)
        "model",
        "stages",
        "artifacts",
        "error",
    ]
    assert record["startup"] is None
    assert (record["name"], record["recipe_file"], record["overrides"], record["error"]) == (
        "gate",
        None,
        [],
        None,
    )
    assert record["device"]["compute_dtype"] in ("float32", "bfloat16")
    assert set(record["model"]) == {"source", "path", "fingerprint"}
    gate = record["recipe"]["stages"][0]["gate"]
    assert (gate["limit"], gate["max_drop"], gate["candidate"]) == (
        5,
        {"default": 0.1},
        str(tiny_llama),
    )
    (stage,) = record["stages"]
    assert (stage["index"], stage["name"], stage["status"]) == (0, "gate", "success")
    report = out / "report"
    assert stage["outputs"] == {"report": {"path": str(report), "sha256": sha256_tree(report)}}
    assert stage["metrics"][KEY]["verdict"] == "pass" and stage["metrics"]["passed"] is True
    assert record["artifacts"] == {
        "gate": str(report / "gate.json"),
        "report": str(report / "report.html"),
    }
    metric = json.loads((report / "gate.json").read_text())["metrics"][0]
    assert (metric["n"], metric["threshold"]) == (5, {"max_drop": 0.1})
    assert (out / "logs" / "run.log").is_file()

    assert main(args) == 2  # an existing run: refused, left as it was
    assert "already holds a run" in capsys.readouterr().err
    assert json.loads((out / "run.json").read_text()) == record
    assert main([*args, "--force"]) == 0


def test_overrides_and_task_settings(arc_suite):
    from optimizer.errors import OptimizerError
    from optimizer.evaluation import SuiteTask, Threshold

    suite = load_suite(arc_suite).model_copy(
        update={"tasks": [SuiteTask(task="a", limit=7, num_fewshot=2), SuiteTask(task="b")]}
    )
    assert [tuple(suite.settings(t)) for t in suite.tasks] == [(7, 2), (40, None)]
    changed = apply_overrides(suite, limit=5, max_drop={"a/acc": 0.1})
    assert [tuple(changed.settings(t)) for t in changed.tasks] == [(5, 2), (5, None)]
    assert changed.threshold_for("a/acc") == Threshold(max_drop=0.1)
    assert changed.threshold_for("b/acc") == Threshold(max_drop=0.02)  # the suite's default
    assert apply_overrides(suite) == suite
    with pytest.raises(OptimizerError, match="positive"):
        apply_overrides(suite, limit=0)
    with pytest.raises(OptimizerError, match="max_drop"):
        apply_overrides(suite, max_drop={"default": -1})


def test_importing_the_package_imports_nothing_heavy():
    code = (
        "import sys, optimizer.evaluation, optimizer.stages.gate\n"
        "heavy = [m for m in ('torch', 'transformers', 'lm_eval', 'modelopt') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
