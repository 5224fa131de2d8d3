"""Loading stays safe: a modelopt_state.pth that would run code on unpickling is refused
without running it; remote code runs only when the recipe asks; a Hugging Face token in the
environment never reaches logs, run.json, reports or stdout."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
from tiny import CALIBRATION, REPO

from optimizer import models
from optimizer.errors import OptimizerError


class _Payload:
    """Unpickling this would create ``path`` (what a hostile checkpoint would do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_code_running_modelopt_state_is_refused_unrun(tiny_llama, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama, model_dir)
    canary = tmp_path / "pwned"
    with open(model_dir / models.MODELOPT_STATE, "wb") as fh:
        pickle.dump({"modelopt_state_dict": [], "payload": _Payload(canary)}, fh)
    with pytest.raises(
        OptimizerError, match=r"refused to load modelopt_state.pth: it is not plain"
    ):
        models.load_model(model_dir, "float32")
    assert not canary.exists()


def test_remote_code_only_when_the_recipe_sets_it(tiny_llama, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    models.load_model(tiny_llama, "float32")
    models.load_model(tiny_llama, "float32", trust_remote_code=True)
    assert seen == [False, True]


def test_a_hub_token_never_reaches_the_run_directory_or_the_console(tiny_llama, tmp_path):
    canary = "hf_CANARYtoken0123456789abcdefXYZ"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: canary\nmodel: {{source: {tiny_llama}}}\n"
        f"calibration: {{dataset: {CALIBRATION}, num_samples: 2, seq_len: 32}}\n"
        "stages:\n  - ptq: {format: fp8}\n"
        "  - export: {trtllm_checkpoint: {tp: 1, pp: 1}, hf_checkpoint: true}\n"
    )
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_TOKEN": canary, "HUGGING_FACE_HUB_TOKEN": canary}
    proc = subprocess.run(
        [sys.executable, "-m", "optimizer", "run", str(recipe), "-o", str(run_dir)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert canary not in proc.stdout and canary not in proc.stderr
    leaked = [
        str(p.relative_to(run_dir))
        for p in run_dir.rglob("*")
        if p.is_file() and canary.encode() in p.read_bytes()
    ]
    assert leaked == []
    assert json.loads((run_dir / "run.json").read_text())["status"] == "success"
