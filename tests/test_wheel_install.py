"""A non-editable install works: build a wheel of the checkout, install it into a fresh venv
outside the checkout, and run the shipped quickstart by name from a directory elsewhere.

The new venv sees the test interpreter's already-installed dependencies through one ``.pth``
line naming that interpreter's site-packages. Python adds such a line to ``sys.path`` but does
not process the ``.pth`` files inside the directory it names, so the dev venv's editable
``optimizer`` (an ``__editable__*.pth`` finder there) stays inactive; the test checks that too.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from tiny import REPO

pytestmark = pytest.mark.slow

RESOURCES = REPO / "optimizer" / "resources"


def _run(cmd, *, timeout=300, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _shipped_files() -> set[str]:
    return {
        p.relative_to(REPO).as_posix()
        for p in RESOURCES.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def _build_wheel(tmp: Path) -> Path:
    """The wheel of the checkout's files, built from a copy so that no ``build/`` (whose stale
    files setuptools would ship) or ``*.egg-info`` is read from or left in the checkout."""
    # pyproject.toml, README.md (the long description) and the package are every build input.
    assert not any((REPO / f).exists() for f in ("setup.py", "setup.cfg", "MANIFEST.in"))
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(
        REPO / "optimizer", src / "optimizer", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    dist = tmp / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["-q", "-w", str(dist), str(src)]
    )
    (wheel,) = dist.glob("optimizer-*.whl")
    return wheel


def _fresh_venv(tmp: Path, wheel: Path, env: dict) -> tuple[Path, Path]:
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = Path(_run([str(python), "-c", code], env=env).stdout.strip())
    assert purelib.is_relative_to(venv)
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    # The dependencies' site-packages (inside the checkout when make made .venv there) is
    # fine; the checkout itself, where the source package lives, must not be on the path.
    assert deps and not any(Path(p).resolve() == REPO.resolve() for p in deps)
    (purelib / "_test_interpreter_deps.pth").write_text("".join(f"{p}\n" for p in deps))
    _run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q"]
        + ["--target", str(purelib), str(wheel)]
    )
    return python, purelib


def test_wheel_install_runs_the_shipped_quickstart_by_name(builtin_cache, tmp_path):
    t0 = time.time()
    wheel = _build_wheel(tmp_path)

    # The wheel holds every resource file as a plain file: YAMLs, the tasks' loader.py and
    # utils.py helpers, the template without suffix, the data, the READMEs with licences.
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = _shipped_files()
    assert len(expected) > 50 and expected <= names, sorted(expected - names)
    for must in (
        "optimizer/resources/__init__.py",
        "optimizer/resources/recipes/quickstart.yaml",
        "optimizer/resources/suites/quick.yaml",
        "optimizer/resources/evals/README.md",
        "optimizer/resources/evals/tasks/local_arc_easy.yaml",
        "optimizer/resources/evals/tasks/_local_mmlu_template_yaml",
        "optimizer/resources/evals/tasks/loader.py",
        "optimizer/resources/evals/tasks/utils.py",
        "optimizer/resources/evals/data/arc_easy.jsonl",
        "optimizer/resources/evals/data/MANIFEST.json",
        "optimizer/resources/calibration/python-docs.jsonl",
        "optimizer/resources/calibration/README.md",
    ):
        assert must in names, must
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]

    # A scrubbed environment: no PYTHONPATH, no venv of the caller, the shared builtin cache.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH")
    }
    env.update(
        OPTIMIZER_CACHE_DIR=str(builtin_cache),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    python, purelib = _fresh_venv(tmp_path, wheel, env)
    work = tmp_path / "work"  # outside the checkout
    work.mkdir()

    probe = (
        "import json, sys, optimizer, optimizer.resources as r, optimizer.evaluation as e\n"
        "print(json.dumps({'file': optimizer.__file__, 'tasks': str(e.LOCAL_TASKS),\n"
        "  'suite': str(r.suite('quick')), 'calibration': str(r.calibration_set('python-docs')),\n"
        "  'recipe': str(r.recipe('quickstart')), 'path': sys.path,\n"
        "  'editable': [m for m in sys.modules if '__editable__' in m]\n"
        "    + [str(f) for f in sys.meta_path if '__editable__' in getattr(f, '__module__', '')]}))"
    )
    seen = json.loads(_run([str(python), "-c", probe], cwd=work, env=env).stdout)
    for key in ("file", "tasks", "suite", "calibration", "recipe"):
        assert Path(seen[key]).is_relative_to(purelib), (key, seen[key])
    assert seen["editable"] == [], "the dev venv's editable optimizer leaked in"
    # the checkout (where the source package is importable from) is not on the path
    assert str(REPO.resolve()) not in [str(Path(p).resolve()) for p in seen["path"] if p]
    assert any(p in seen["path"] for p in site.getsitepackages())  # the dependencies

    proc = _run([str(python), "-m", "optimizer", "validate", "quickstart"], cwd=work, env=env)
    assert proc.stdout.startswith("ok: quickstart (quickstart: ptq -> export -> gate)")

    run_dir = tmp_path / "run"
    overrides = [
        "calibration.num_samples=8",
        "stages.gate.limit=100",
        "stages.gate.max_drop.default=0.2",  # 100 documents: a smoke gate, not a verdict
    ]
    cmd = [str(python), "-m", "optimizer", "run", "quickstart", "-o", str(run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    _run(cmd, cwd=work, env=env, timeout=1200)

    rec = json.loads((run_dir / "run.json").read_text())
    assert rec["status"] == "success"
    assert rec["recipe"]["calibration"]["dataset"] == "python-docs"
    assert rec["recipe"]["stages"][-1]["gate"]["suite"] == "quick"
    assert rec["versions"]["optimizer"] == "0.1.0"
    ckpt = run_dir / "trtllm_checkpoint"
    config = json.loads((ckpt / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == "FP8"
    assert (ckpt / "rank0.safetensors").stat().st_size > 100e6
    assert (run_dir / "hf_checkpoint" / "hf_quant_config.json").is_file()
    for key in ("trtllm_checkpoint", "hf_checkpoint", "gate", "report"):
        assert Path(rec["artifacts"][key]).exists(), key
    # The suite's task came from package data: the only local_arc_easy that interpreter has.
    gate = json.loads((run_dir / "report" / "gate.json").read_text())
    assert gate["passed"] is True, gate["metrics"]
    assert [(m["metric"], m["n"]) for m in gate["metrics"]] == [("local_arc_easy/acc", 100)]
    assert "local_arc_easy/acc" in (run_dir / "report" / "report.md").read_text()
    # nothing ran from the checkout's source package (its venv may live in the checkout)
    assert str(REPO / "optimizer") not in (run_dir / "logs" / "run.log").read_text()
    print(f"wheel build + install + validate + run: {time.time() - t0:.0f} s")
