"""The run directory is a trust boundary (issue 15): no writes through symbolic links,
--force deletes only run directories of ours, run.json is validated before it is trusted,
unusable -o is refused at start, SIGTERM is an interrupt (143) and a killed run is stale."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
from tiny import CALIBRATION, run_killed_at

from optimizer.cli import main
from optimizer.pipeline import Runner
from optimizer.recipe import load_recipe
from optimizer.rundir import MARKER, RunDirectory, write_atomic

PTQ = "optimizer.stages.ptq:PTQ"


def recipe_file(directory, model):
    path = directory / "recipe.yaml"
    path.write_text(
        f"name: tiny\nmodel: {{source: {model}}}\n"
        f"calibration: {{dataset: {CALIBRATION}, num_samples: 2, seq_len: 32, batch_size: 8}}\n"
        "stages:\n  - ptq: {format: fp8}\n"
    )
    return path


def run_cli(recipe, run_dir, *extra) -> int:
    return main(["run", str(recipe), "-o", str(run_dir), "-q", *map(str, extra)])


def one_error(capsys) -> str:
    """stderr of a refused command: one error line, no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_llama):
    """A run SIGKILLed as ptq starts (status "running", lock holder gone), what ``report``
    and a plain run said about it, then its ``--resume`` to success."""
    base = tmp_path_factory.mktemp("trust")
    recipe = recipe_file(base, tiny_llama)
    run_dir = base / "run"
    proc = run_killed_at(recipe, run_dir, PTQ)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    killed = json.loads((run_dir / "run.json").read_text())
    report = subprocess.run(
        [sys.executable, "-m", "optimizer", "report", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    plain = subprocess.run(
        [sys.executable, "-m", "optimizer", "run", str(recipe), "-o", str(run_dir), "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "optimizer",
            "run",
            str(recipe),
            "-o",
            str(run_dir),
            "-q",
            "--resume",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert resumed.returncode == 0, resumed.stderr
    return {
        "recipe": recipe,
        "run_dir": run_dir,
        "killed": killed,
        "report": report,
        "plain": plain,
        "resumed": resumed,
    }


# ---------------------------------------------------------------- 5. stale and SIGTERM


def test_a_killed_run_is_reported_stale_and_resumed(finished_run):
    assert finished_run["killed"]["status"] == "running"
    report = finished_run["report"]
    assert "status: interrupted (stale" in report.stderr, report.stderr
    assert "Traceback" not in report.stderr
    plain = finished_run["plain"]
    assert plain.returncode == 2 and "status: interrupted (stale)" in plain.stderr, plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1, plain.stderr
    resumed = finished_run["resumed"]
    assert "previous run was interrupted (stale" in resumed.stderr
    run_dir = finished_run["run_dir"]
    rec = json.loads((run_dir / "run.json").read_text())
    assert rec["status"] == "success" and rec["stages"][0]["status"] == "success"
    assert "interrupted (stale" in (run_dir / "logs" / "run.log").read_text()
    assert (run_dir / MARKER).is_file()


SIGNAL_AT_STAGE = textwrap.dedent("""
    import os, signal, sys
    from optimizer.cli import main
    from optimizer.stages.ptq import PTQ

    def die(self, ctx):
        ctx.new_output("model")  # a half-written temporary, as a real stage leaves one
        os.kill(os.getpid(), getattr(signal, sys.argv[3]))
        raise AssertionError("not interrupted")

    PTQ.run = die
    # A job started in the background inherits SIGINT ignored; a terminal's Ctrl-C is not.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main(["run", sys.argv[1], "-o", sys.argv[2], "-q"]))
""")


@pytest.mark.parametrize(("sig", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_sigterm_is_an_interrupt_with_exit_143(tmp_path, tiny_llama, sig, code):
    recipe = recipe_file(tmp_path, tiny_llama)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", SIGNAL_AT_STAGE, str(recipe), str(run_dir), sig],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == code, proc.stderr
    assert "--resume" in proc.stderr and "Traceback" not in proc.stderr
    rec = json.loads((run_dir / "run.json").read_text())
    assert rec["status"] == "interrupted"
    assert rec["stages"][0]["status"] == "interrupted"
    assert not list(run_dir.glob(".tmp-*"))


# ---------------------------------------------------------------- 1. no writes through links


def test_lock_is_never_followed(write_recipe, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").symlink_to(victim)
    assert run_cli(write_recipe(), run_dir) == 2
    assert "symbolic link" in one_error(capsys)
    assert victim.read_text() == "precious"
    assert not (run_dir / "run.json").exists()


def test_run_log_is_never_followed(write_recipe, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "logs" / "run.log").symlink_to(victim)
    assert run_cli(write_recipe(), run_dir) == 2
    assert "symbolic link" in one_error(capsys)
    assert victim.read_text() == "precious"


def test_logs_directory_link_is_refused(write_recipe, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "logs").symlink_to(elsewhere)
    assert run_cli(write_recipe(), run_dir) == 2
    assert "symbolic link" in one_error(capsys)
    assert not list(elsewhere.iterdir())


@pytest.mark.parametrize("where", ["stages", "stages/00-ptq"])
def test_stage_directories_that_are_links_are_refused(write_recipe, tmp_path, capsys, where):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_dir = tmp_path / "run"
    (run_dir / where).parent.mkdir(parents=True)
    (run_dir / where).symlink_to(elsewhere)
    assert run_cli(write_recipe(), run_dir) == 2
    assert f"{run_dir / where} is a symbolic link" in one_error(capsys)
    assert not list(elsewhere.iterdir())


@pytest.mark.parametrize("name", ["run.json", "recipe.yaml"])
def test_run_files_that_are_links_are_refused(write_recipe, tmp_path, capsys, name):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / name).symlink_to(victim)
    assert run_cli(write_recipe(), run_dir) == 2
    assert "symbolic link" in one_error(capsys)
    assert victim.read_text() == "precious"
    assert (run_dir / name).is_symlink()


def test_atomic_write_never_follows_a_planted_temporary(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "run.json"
    (tmp_path / f".run.json.tmp-{os.getpid()}").symlink_to(victim)
    write_atomic(target, "new\n")
    assert victim.read_text() == "precious"
    assert target.read_text() == "new\n" and not target.is_symlink()


# ---------------------------------------------------------------- 2. --force: ours only


@pytest.mark.parametrize("content", ["{}", "not json", '{"schema_version": 2, "name": "x"}'])
def test_force_refuses_a_directory_that_is_not_ours(write_recipe, tmp_path, capsys, content):
    run_dir = tmp_path / "data"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(content)
    (run_dir / "thesis.tex").write_text("years of work")
    (run_dir / "results").mkdir()
    (run_dir / "results" / "table.csv").write_text("1,2")
    assert run_cli(write_recipe(), run_dir, "--force") == 2
    assert "not created by optimize" in one_error(capsys)
    assert (run_dir / "thesis.tex").read_text() == "years of work"
    assert (run_dir / "results" / "table.csv").is_file()
    assert (run_dir / "run.json").read_text() == content
    assert not (run_dir / MARKER).exists()


def test_force_replaces_a_run_of_ours(finished_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run["run_dir"], run_dir)
    (run_dir / "stages" / "leftover").write_text("old")
    rd = RunDirectory(run_dir, rank=0)
    assert rd.owned()
    rd.clear()
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([".lock", MARKER])


def test_a_legacy_run_without_marker_is_ours_only_when_nothing_foreign(finished_run, tmp_path):
    run_dir = tmp_path / "legacy"
    shutil.copytree(finished_run["run_dir"], run_dir)
    (run_dir / MARKER).unlink()
    rd = RunDirectory(run_dir, rank=0)
    assert rd.owned()  # run.json of ours, only what a run creates
    (run_dir / "notes.txt").write_text("mine")
    assert not rd.owned()


def test_plain_run_keeps_foreign_temporaries(write_recipe, tmp_path):
    run_dir = tmp_path / "data"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / ".tmp-cache").mkdir()
    (run_dir / ".tmp-cache" / "x").write_text("keep")
    (run_dir / ".checkpoints-00-foreign").mkdir()
    runner = Runner(load_recipe(write_recipe()), run_dir)
    runner.dir.lock()
    try:
        runner._prepare()
    finally:
        runner.dir.unlock()
    assert (run_dir / ".tmp-cache" / "x").read_text() == "keep"
    assert (run_dir / ".checkpoints-00-foreign").is_dir()
    assert not (run_dir / MARKER).exists()  # a non-empty foreign directory is not claimed


def test_a_fresh_directory_gets_the_marker_and_its_temporaries_are_ours(write_recipe, tmp_path):
    run_dir = tmp_path / "run"
    runner = Runner(load_recipe(write_recipe()), run_dir)
    runner.dir.lock()
    try:
        (run_dir / ".tmp-00-model").mkdir()
        runner._prepare()
    finally:
        runner.dir.unlock()
    assert (run_dir / MARKER).is_file()
    assert not (run_dir / ".tmp-00-model").exists()


# ---------------------------------------------------------------- 3. run.json validated


MALFORMED = {
    "not json": "{not json",
    "a list": "[1, 2]",
    "wrong types": json.dumps(
        {"schema_version": 2, "name": 5, "status": "running", "stages": "x", "artifacts": []}
    ),
    "bad stage": json.dumps(
        {"schema_version": 2, "name": "tiny", "stages": [{"index": "zero"}], "artifacts": {}}
    ),
    "artifacts a string": json.dumps({"schema_version": 2, "name": "tiny", "artifacts": "x"}),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_run_json_is_one_message(write_recipe, tmp_path, capsys, kind):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(MALFORMED[kind])
    assert run_cli(write_recipe(), run_dir, "--resume") == 2
    err = one_error(capsys)
    assert "run.json" in err
    if kind == "a list":
        assert "holds a JSON list, not a run record" in err
    assert main(["report", str(run_dir)]) == 2
    assert "run.json" in one_error(capsys)
    assert (run_dir / "run.json").read_text() == MALFORMED[kind]


def test_resume_refuses_outputs_outside_the_run_directory(finished_run, tmp_path, capsys):
    # A copy of the run: its run.json still names the original's outputs (outside the copy).
    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run["run_dir"], run_dir)
    assert run_cli(finished_run["recipe"], run_dir, "--resume") == 2
    assert "outside the run directory" in one_error(capsys)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "success"
    # A relative output path (a run of ours records absolute ones) is not trusted either.
    record = json.loads((run_dir / "run.json").read_text())
    record["stages"][0]["outputs"]["model"]["path"] = "../../elsewhere/model"
    record["artifacts"] = {}
    (run_dir / "run.json").write_text(json.dumps(record))
    assert run_cli(finished_run["recipe"], run_dir, "--resume") == 2
    assert "outside the run directory" in one_error(capsys)


def test_report_refuses_a_gate_outside_the_run_directory(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "gate.json").write_text("{}")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = {"schema_version": 2, "name": "x", "artifacts": {"gate": str(elsewhere / "gate.json")}}
    (run_dir / "run.json").write_text(json.dumps(record))
    assert main(["report", str(run_dir)]) == 2
    assert "outside the run directory" in one_error(capsys)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["gate.json"]


# ---------------------------------------------------------------- 4. unusable -o


def test_output_that_is_a_file_or_under_a_file(write_recipe, tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for out in (a_file, a_file / "run", a_file / "deeper" / "run"):
        assert run_cli(write_recipe(), out) == 2
        err = one_error(capsys)
        assert "file" in err and str(a_file) in err
    assert a_file.read_text() == "x"


def test_read_only_output_directory(write_recipe, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "ro"
    run_dir.mkdir()
    run_dir.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: make the check see what a user would
        real = os.access
        monkeypatch.setattr(
            "optimizer.rundir.os.access",
            lambda p, mode: False if os.fspath(p) == str(run_dir) else real(p, mode),
        )
    try:
        assert run_cli(write_recipe(), run_dir / "sub") == 2
        assert "not writable" in one_error(capsys)
        assert run_cli(write_recipe(), run_dir) == 2
        assert "not writable" in one_error(capsys)
    finally:
        run_dir.chmod(0o755)
    assert not list(run_dir.iterdir())
