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
        ],  # exactly the README's quickstart (16 calibration samples were measurably too few:
        # the gate then found ARC-Easy 4 points down, as it should)
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
    gate = json.loads((run_dir / "report" / "gate.json").read_text())
    assert gate["passed"] is True, gate["metrics"]
    assert {m["metric"] for m in gate["metrics"]} == {
        "local_hellaswag/acc_norm",
        "local_arc_easy/acc",
    }
    assert all(m["n"] == 200 for m in gate["metrics"])
    assert rec["artifacts"]["gate"] == str(run_dir / "report" / "gate.json")


def test_gate_fails_a_damaged_model_with_exit_3(builtin_cache, tmp_path):
    """Corrupted weights (half the layers' MLP output zeroed) must fail the gate by name."""
    import shutil

    from safetensors.torch import load_file, save_file

    from optimizer.models import resolve_source

    source = resolve_source("builtin:smollm2-135m-instruct", REPO).path
    damaged = tmp_path / "damaged"
    shutil.copytree(source, damaged)
    weights = load_file(damaged / "model.safetensors")
    for i in range(0, 30, 2):
        weights[f"model.layers.{i}.mlp.down_proj.weight"].zero_()
    save_file(weights, damaged / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "gate"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "optimizer",
            "gate",
            "--baseline",
            "builtin:smollm2-135m-instruct",
            "--candidate",
            str(damaged),
            "--suite",
            str(REPO / "evals" / "suites" / "quick.yaml"),
            "--limit",
            "60",
            "--max-drop",
            "default=0.02",
            "-o",
            str(out),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    gate = json.loads((out / "report" / "gate.json").read_text())
    assert gate["passed"] is False and "local_hellaswag/acc_norm" in gate["failing"]
    assert "accuracy gate failed on" in proc.stderr and "local_hellaswag/acc_norm" in proc.stderr
    report = (out / "report" / "report.md").read_text()
    assert "Failing:" in report and "local_hellaswag/acc_norm" in report and "FAIL" in report
