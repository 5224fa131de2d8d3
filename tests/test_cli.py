"""The `optimize` command as users and jobs see it: exit codes, messages, no tracebacks."""

import json
import subprocess
import sys

import pytest

from optimizer.cli import main


def optimize(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "optimizer", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def test_help_is_fast_and_imports_no_torch():
    code = (
        "import sys, optimizer.cli as c\n"
        "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "run" in proc.stdout and "validate" in proc.stdout and "exit codes" in proc.stdout


def test_validate_does_not_import_torch(write_recipe):
    path = write_recipe()
    code = (
        f"import sys, optimizer.cli as c\nrc = c.main(['validate', {str(path)!r}])\n"
        "assert rc == 0\nassert 'torch' not in sys.modules, 'validate imported torch'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_validate_misspelt_key_exits_2_with_one_readable_message(write_recipe):
    text = write_recipe().read_text().replace("num_samples: 8", "num_sampels: 8")
    bad = write_recipe(text, name="bad.yaml", raw=True)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "num_sampels" in t)
    proc = optimize("validate", bad)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[0] == (
        f"error: {bad}:{line}: calibration.num_sampels: unknown key 'num_sampels'; did you mean 'num_samples'?"
    )


def test_validate_reports_every_file(write_recipe, capsys):
    good = write_recipe()
    bad = write_recipe("name: [\n", name="broken.yaml", raw=True)
    assert main(["validate", str(good), str(bad)]) == 2
    out, err = capsys.readouterr()
    assert f"ok: {good}" in out
    assert f"error: {bad}:" in err and "1 of 2 recipe(s) invalid" in err


def test_run_with_missing_recipe_exits_2(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err


def test_bad_flag_exits_2():
    proc = optimize("run", "--no-such-flag")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_dry_run_prints_plan_and_writes_nothing(write_recipe, tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert (
        main(
            [
                "run",
                str(write_recipe()),
                "-o",
                str(out_dir),
                "--dry-run",
                "--set",
                "stages.ptq.kv_cache=fp8",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "kv_cache: fp8" in out and "[1/2] ptq(format=fp8, kv_cache=fp8)" in out
    assert not out_dir.exists()


@pytest.mark.parametrize("flags", [["--resume", "--force"]])
def test_contradicting_flags(write_recipe, tmp_path, flags, capsys):
    assert main(["run", str(write_recipe()), "-o", str(tmp_path / "r"), *flags]) == 2
    assert "contradict" in capsys.readouterr().err


def test_run_prints_machine_readable_summary(write_recipe, tmp_path):
    proc = optimize("run", write_recipe(), "-o", tmp_path / "run", "-q")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["status"] == "success"
    assert set(summary["artifacts"]) == {"trtllm_checkpoint", "hf_checkpoint"}
    # a fresh process pays the imports once, before the stages: not inside ptq's seconds
    seconds = summary["seconds"]
    assert set(seconds) == {"startup", "00-ptq", "01-export"}
    assert seconds["startup"] > seconds["00-ptq"], seconds
    assert "[1/2]" not in proc.stderr  # quiet: no progress chatter
