"""ptq stage: every format by name, its ModelOpt config, and what it produces on a tiny Llama."""

import json
from pathlib import Path

import pytest
import torch

from optimizer.cli import main
from optimizer.context import ModelState, StageContext
from optimizer.formats import FORMATS
from optimizer.recipe import load_recipe
from optimizer.rundir import RunDirectory
from optimizer.trtllm import check_checkpoint

CPU_TRTLLM_FORMATS = [f for f, spec in FORMATS.items() if not spec.needs_gpu and spec.trtllm_algo]
GPU_FORMATS = [f for f, spec in FORMATS.items() if spec.needs_gpu]


def ptq_context(write_recipe, tmp_path, *overrides):
    recipe = load_recipe(write_recipe(), list(overrides))
    state = ModelState(Path(recipe.model.source), "bfloat16")
    return recipe.stages[0], StageContext(recipe, RunDirectory(tmp_path), 0, state)


def test_config_adds_kv_cache_and_exclusions_last(write_recipe, tmp_path):
    stage, _ = ptq_context(
        write_recipe, tmp_path, "stages.ptq.kv_cache=fp8", "stages.ptq.exclude=['*layers.0.mlp*']"
    )
    entries = stage.modelopt_config()["quant_cfg"]
    assert entries[-1] == {"quantizer_name": "*layers.0.mlp*", "enable": False}
    assert any("[kv]_bmm_quantizer" in str(e.get("quantizer_name")) for e in entries)
    import modelopt.torch.quantization as mtq

    assert mtq.FP8_DEFAULT_CFG["quant_cfg"][-1] != entries[-1]  # the preset itself is untouched


def test_group_size_and_algorithm_reach_the_modelopt_config(write_recipe, tmp_path):
    stage, _ = ptq_context(
        write_recipe,
        tmp_path,
        "stages.ptq.format=int4_awq",
        "stages.ptq.group_size=64",
        "stages.ptq.algorithm=awq_full",
    )
    cfg = stage.modelopt_config()
    weight = next(e for e in cfg["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer")
    assert weight["cfg"]["block_sizes"][-1] == 64
    assert cfg["algorithm"] == {"method": "awq_full"}


def test_fp8_calibrates_every_linear_except_excluded(write_recipe, tmp_path):
    stage, ctx = ptq_context(write_recipe, tmp_path, "stages.ptq.exclude=['*layers.0.mlp*']")
    result = stage.run(ctx)
    model = ctx.model()
    assert result.metrics["quantized_layers"] == 14 - 3
    down0 = model.model.layers[0].mlp.down_proj
    q1 = model.model.layers[1].self_attn.q_proj
    assert not down0.weight_quantizer.is_enabled
    assert q1.weight_quantizer.is_enabled and q1.input_quantizer.is_enabled
    # max calibration: the weight amax is the largest |w|, activation amax is positive
    assert torch.isclose(q1.weight_quantizer.amax.float(), q1.weight.abs().max().float(), rtol=1e-2)
    assert q1.input_quantizer.amax.item() > 0


def run_format(write_recipe, tmp_path, *overrides, export="trtllm_checkpoint"):
    run_dir = tmp_path / "run"
    sets = [x for o in overrides for x in ("--set", o)]
    if export == "hf_checkpoint":
        sets += ["--set", "stages.export.trtllm_checkpoint=null"]
    else:
        sets += ["--set", "stages.export.hf_checkpoint=false"]
    rc = main(["run", str(write_recipe()), "-o", str(run_dir), "-q", *sets])
    assert rc == 0
    return run_dir, json.loads((run_dir / "run.json").read_text())


@pytest.mark.parametrize("fmt", CPU_TRTLLM_FORMATS)
def test_cpu_format_exports_a_checkpoint_the_validator_accepts(fmt, write_recipe, tmp_path):
    run_dir, rec = run_format(write_recipe, tmp_path, f"stages.ptq.format={fmt}")
    ckpt = run_dir / "trtllm_checkpoint"
    config = json.loads((ckpt / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == FORMATS[fmt].trtllm_algo
    assert check_checkpoint(ckpt) == []
    assert main(["check", str(ckpt)]) == 0
    assert rec["stages"][0]["metrics"]["algorithm"] == FORMATS[fmt].algorithms[0]


@pytest.mark.parametrize(
    "overrides,algo,kv",
    [
        (
            [
                "stages.ptq.format=int4_awq",
                "stages.ptq.algorithm=awq_full",
                "stages.ptq.group_size=64",
            ],
            "W4A16_AWQ",
            None,
        ),
        (["stages.ptq.format=int8_sq", "stages.ptq.kv_cache=fp8"], "W8A8_SQ_PER_CHANNEL", "FP8"),
        (
            ["stages.ptq.format=null", "stages.ptq.modelopt_recipe=general/ptq/fp8_default-kv_fp8"],
            "FP8",
            "FP8",
        ),
    ],
)
def test_format_options_and_modelopt_recipes(overrides, algo, kv, write_recipe, tmp_path):
    run_dir, _ = run_format(write_recipe, tmp_path, *overrides)
    quant = json.loads((run_dir / "trtllm_checkpoint" / "config.json").read_text())["quantization"]
    assert (quant["quant_algo"], quant["kv_cache_quant_algo"]) == (algo, kv)
    if algo == "W4A16_AWQ":
        assert quant["group_size"] == 64
    assert check_checkpoint(run_dir / "trtllm_checkpoint") == []


def test_int8_weight_only_exports_the_unified_hf_checkpoint(write_recipe, tmp_path):
    run_dir, rec = run_format(
        write_recipe, tmp_path, "stages.ptq.format=int8_wo", export="hf_checkpoint"
    )
    hf = json.loads((run_dir / "hf_checkpoint" / "hf_quant_config.json").read_text())
    assert hf["quantization"]["quant_algo"] == "W8A16"
    assert "trtllm_checkpoint" not in rec["artifacts"]


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="NVFP4 fake-quant kernels need a CUDA GPU"
)
@pytest.mark.parametrize("fmt", GPU_FORMATS)
def test_gpu_format_on_a_gpu(fmt, write_recipe, tmp_path):
    export = "trtllm_checkpoint" if FORMATS[fmt].trtllm_algo else "hf_checkpoint"
    run_dir, rec = run_format(write_recipe, tmp_path, f"stages.ptq.format={fmt}", export=export)
    assert rec["status"] == "success"
    if export == "trtllm_checkpoint":
        assert check_checkpoint(run_dir / "trtllm_checkpoint") == []
    else:
        hf = json.loads((run_dir / "hf_checkpoint" / "hf_quant_config.json").read_text())
        assert hf["quantization"]["quant_algo"]
