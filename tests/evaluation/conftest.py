from pathlib import Path

import pytest
from tiny import run_tiny_recipe


@pytest.fixture(scope="session")
def quantized_run(tiny_llama, tmp_path_factory) -> Path:
    """A real FP8 run of the tiny Llama: ``stages/00-ptq/model`` (saved with ModelOpt state)
    and ``hf_checkpoint`` (ModelOpt's unified HF export). Seconds."""
    directory = tmp_path_factory.mktemp("fp8")
    stages = ["ptq: {format: fp8}", "export: {trtllm_checkpoint: null, hf_checkpoint: true}"]
    assert run_tiny_recipe(directory, tiny_llama, stages) == 0
    return directory / "run"


@pytest.fixture
def arc_suite(tmp_path) -> Path:
    """40 ARC-Easy documents, a 2-point threshold."""
    path = tmp_path / "suite.yaml"
    path.write_text(
        "name: tiny\nlimit: 40\ntasks:\n  - {task: local_arc_easy, metric: acc}\n"
        "thresholds:\n  default: {max_drop: 0.02}\n"
    )
    return path
