"""ptq stage: the ModelOpt config it builds and what calibration does to a tiny Llama."""

from pathlib import Path

import torch

from optimizer.context import ModelState, StageContext
from optimizer.recipe import load_recipe


def ptq_context(write_recipe, tmp_path, *overrides):
    recipe = load_recipe(write_recipe(), list(overrides))
    state = ModelState(Path(recipe.model.source), "bfloat16")
    return recipe.stages[0], StageContext(recipe, tmp_path, 0, state)


def test_config_adds_kv_cache_and_exclusions_last(write_recipe, tmp_path):
    stage, _ = ptq_context(
        write_recipe, tmp_path, "stages.ptq.kv_cache=fp8", "stages.ptq.exclude=['*layers.0.mlp*']"
    )
    cfg = stage.quant_config()
    entries = cfg["quant_cfg"]
    assert entries[-1] == {"quantizer_name": "*layers.0.mlp*", "enable": False}
    assert any("[kv]_bmm_quantizer" in str(e.get("quantizer_name")) for e in entries)
    import modelopt.torch.quantization as mtq

    assert mtq.FP8_DEFAULT_CFG["quant_cfg"][-1] != entries[-1]  # the preset itself is untouched


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
