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
