"""Evaluation targets: what the factory accepts (a ModelOpt unified HF export is rebuilt from
its own files), and what it refuses before any evaluation starts."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from tiny import REPO

from optimizer.cli import main
from optimizer.errors import OptimizerError
from optimizer.evaluation import TARGETS, CheckpointCandidate, make_candidate
from optimizer.registry import UnknownName

REFUSAL = "is a ModelOpt unified checkpoint that cannot be gated"


@pytest.fixture
def unrebuildable(quantized_run, tmp_path):
    """The FP8 export relabelled with an algorithm the rebuild does not know."""
    export = shutil.copytree(quantized_run / "hf_checkpoint", tmp_path / "mxfp4")
    config = json.loads((export / "hf_quant_config.json").read_text())
    config["quantization"]["quant_algo"] = "W4A8_MXFP4_FP8"
    (export / "hf_quant_config.json").write_text(json.dumps(config))
    return export


def test_targets_are_registered_by_name():
    assert TARGETS.names() == ["checkpoint", "endpoint", "model"]
    assert TARGETS.get("checkpoint") is CheckpointCandidate
    with pytest.raises(UnknownName, match="did you mean 'checkpoint'"):
        make_candidate("chekpoint", REPO)


def test_factory_rebuilds_a_unified_export_and_refuses_what_it_cannot(
    tiny_llama, quantized_run, unrebuildable, tmp_path
):
    """The export is evaluated as rebuilt from its own files: no ModelOpt quantizers, the
    stored FP8 weights, and next-token predictions close to the pipeline's quantized model
    (the export unifies q/k/v input scales, so not identical)."""
    import torch

    from optimizer.evaluation import BaselineRef, Suite, SuiteTask

    suite = Suite(name="s", tasks=[SuiteTask(task="local_arc_easy")])
    ref = BaselineRef(path=tiny_llama, fingerprint="x", dtype="bfloat16", compute_dtype="float32")
    export = quantized_run / "hf_checkpoint"
    assert (export / "hf_quant_config.json").is_file()  # what ModelOpt's exporter writes
    rebuilt, _ = make_candidate("checkpoint", export).load(suite, ref)
    assert not any(hasattr(m, "input_quantizer") for m in rebuilt.modules())
    saved, _ = make_candidate("checkpoint", quantized_run / "stages" / "00-ptq" / "model").load(
        suite, ref
    )
    ids = torch.randint(3, 500, (4, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        agree = (rebuilt(ids).logits.argmax(-1) == saved(ids).logits.argmax(-1)).float().mean()
    assert agree > 0.85
    with pytest.raises(OptimizerError, match=REFUSAL + ": quant_algo W4A8_MXFP4_FP8 cannot"):
        make_candidate("checkpoint", unrebuildable)
    broken = shutil.copytree(export, tmp_path / "broken")
    (broken / "hf_quant_config.json").write_text("{not json")
    with pytest.raises(OptimizerError, match="hf_quant_config.json is not readable JSON"):
        make_candidate("checkpoint", broken)
    with pytest.raises(OptimizerError, match="not a checkpoint directory"):
        make_candidate("checkpoint", tmp_path)


def test_factory_accepts_plain_and_modelopt_state_checkpoints(tiny_llama, quantized_run):
    """A bf16 checkpoint and the PTQ stage's save (ModelOpt state) load; the latter as the
    quantized model, its fake-quant weights folded in."""
    from optimizer.evaluation import BaselineRef, Suite, SuiteTask

    suite = Suite(name="s", tasks=[SuiteTask(task="local_arc_easy")])
    ref = BaselineRef(path=tiny_llama, fingerprint="x", dtype="bfloat16", compute_dtype="float32")
    saved = quantized_run / "stages" / "00-ptq" / "model"
    assert (saved / "modelopt_state.pth").is_file()
    for path, quantizers in ((tiny_llama, 0), (saved, 14)):  # 7 linears x 2 layers
        model, tokenizer = make_candidate("checkpoint", path).load(suite, ref)
        active = [
            m
            for m in model.modules()
            if getattr(getattr(m, "input_quantizer", None), "is_enabled", False)
        ]
        assert len(active) == quantizers
        assert not any(m.weight_quantizer.is_enabled for m in active)  # folded
        assert next(model.parameters()).dtype.is_floating_point and tokenizer.eos_token


def test_optimize_gate_refuses_an_unrebuildable_export_before_anything_heavy(
    tiny_llama, unrebuildable, tmp_path
):
    """Exit 2 with the reason and no traceback, before torch is even imported: no baseline
    was evaluated (no cache entry), no run directory was written."""
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: s\nlimit: 10\ntasks:\n  - {task: local_arc_easy, metric: acc}\n")
    out, cache = tmp_path / "gate", tmp_path / "cache"
    args = [
        "gate",
        "--baseline",
        str(tiny_llama),
        "--candidate",
        str(unrebuildable),
        "--suite",
        str(suite),
        "-o",
        str(out),
    ]
    code = (
        f"import sys, optimizer.cli as c\nrc = c.main({args!r})\n"
        "heavy = [m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules]\n"
        "print('rc', rc, 'heavy', heavy)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OPTIMIZER_CACHE_DIR": str(cache)},
    )
    assert proc.stdout.strip().splitlines()[-1] == "rc 2 heavy []", proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: --candidate: {unrebuildable} {REFUSAL}")
    assert not cache.exists() and not out.exists()


def test_gate_stage_refuses_an_unrebuildable_export_before_the_baseline(
    tiny_llama, unrebuildable, tmp_path, monkeypatch, capsys
):
    from optimizer.evaluation import harness

    def never(*args, **kwargs):
        raise AssertionError("something was evaluated")

    monkeypatch.setattr(harness, "score_suite", never)
    monkeypatch.setenv("OPTIMIZER_CACHE_DIR", str(tmp_path / "cache"))
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: s\nlimit: 10\ntasks:\n  - {task: local_arc_easy, metric: acc}\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: g\nmodel: {{source: {tiny_llama}}}\nstages:\n"
        f"  - gate: {{suite: {suite}, candidate: {unrebuildable}}}\n"
    )
    assert main(["run", str(recipe), "-o", str(tmp_path / "run"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "stages[0].gate.candidate:" in err and REFUSAL in err  # refused by validation
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache" / "baselines").exists()


def test_tensorrt_llm_checkpoints_are_refused_up_front(tmp_path):
    """A TensorRT-LLM checkpoint the rebuild cannot read (here: no tensors, no sizes) is
    refused before any baseline work (real exports are rebuilt: tests/test_trtllm_rebuild.py)."""
    from optimizer.evaluation.candidates import checkpoint_problem

    ckpt = tmp_path / "trtllm"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(
        json.dumps({"architecture": "LlamaForCausalLM", "dtype": "bfloat16"})
    )
    assert "is a TensorRT-LLM checkpoint" in checkpoint_problem(ckpt)
    with pytest.raises(OptimizerError, match="TensorRT-LLM checkpoint"):
        make_candidate("checkpoint", ckpt)
    (ckpt / "config.json").write_text(json.dumps({"hidden_size": 8}))
    assert "has no model_type" in checkpoint_problem(ckpt)
