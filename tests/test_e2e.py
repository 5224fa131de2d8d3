"""End to end on the real builtin model (SmolLM2-135M-Instruct), as the README quickstart runs it."""

import json
import subprocess
import sys

import pytest
from tiny import REPO

pytestmark = pytest.mark.slow


def test_quickstart_recipe_on_the_builtin_model(builtin_cache, tmp_path):
    run_dir = tmp_path / "quickstart"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "optimizer",
            "run",
            str(REPO / "recipes" / "quickstart.yaml"),
            "-o",
            str(run_dir),
            "--set",
            "calibration.num_samples=16",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((run_dir / "run.json").read_text())
    assert rec["status"] == "success"
    assert rec["model"]["source"] == "builtin:smollm2-135m-instruct"
    ckpt = run_dir / "trtllm_checkpoint"
    assert rec["artifacts"]["trtllm_checkpoint"] == str(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == "FP8"
    assert (ckpt / "rank0.safetensors").stat().st_size > 100e6
    assert config["rotary_base"] == 100000.0  # SmolLM2's rope_theta, which ModelOpt alone drops
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    ptq = rec["stages"][0]
    assert ptq["metrics"]["quantized_layers"] == 30 * 7
    hf = json.loads((run_dir / "hf_checkpoint" / "config.json").read_text())
    assert hf["quantization_config"]["quant_method"] == "modelopt"
