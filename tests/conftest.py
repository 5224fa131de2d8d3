import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import CALIBRATION, TINY_FP8_RECIPE, make_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory) -> Path:
    """A private cache for the builtin model: converted once per test session (~30 s)."""
    path = tmp_path_factory.mktemp("optimizer-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("OPTIMIZER_CACHE_DIR", str(path))
    yield path
    patch.undo()


@pytest.fixture
def write_recipe(tmp_path, tiny_llama):
    """Write a recipe YAML for the tiny Llama; returns its path."""

    def write(text: str | None = None, name: str = "recipe.yaml", raw: bool = False, **fmt) -> Path:
        """``text`` is a template with {model} and {calib} unless ``raw``."""
        if text is None:
            text = TINY_FP8_RECIPE
        path = tmp_path / name
        path.write_text(text if raw else text.format(model=tiny_llama, calib=CALIBRATION, **fmt))
        return path

    return write


#: The bad-input corpus: every module of malformed or hostile input (recipes, checkpoints,
#: reports, run directories, loading). Its size is printed at the end of every run.
CORPUS_MODULES = (
    "test_bad_input_corpus.py",
    "test_hostile_recipes.py",
    "test_hostile_inputs.py",
    "test_rundir_trust.py",
    "test_safe_loading.py",
)


def pytest_terminal_summary(terminalreporter):
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for outcome in counts:
        for report in terminalreporter.stats.get(outcome, []):
            # one report per case: its call, or the setup that failed or skipped it
            if Path(report.fspath).name in CORPUS_MODULES and report.when in ("setup", "call"):
                counts[outcome] += 1
    total = sum(counts.values())
    if total:
        terminalreporter.write_line(
            f"bad-input corpus: {total} cases ({counts['passed']} passed, "
            f"{counts['failed']} failed, {counts['skipped']} skipped)"
        )
