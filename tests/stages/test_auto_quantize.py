"""auto_quantize: per-layer mixed precision under a bits budget, exported as MIXED_PRECISION."""

import json

from tiny import run_tiny_recipe

from optimizer.trtllm import check_checkpoint


def test_mixed_precision_under_budget(tiny_llama, tmp_path):
    stages = ["auto_quantize: {effective_bits: 7.0, formats: [fp8, int4_awq]}", "export: {}"]
    assert (
        run_tiny_recipe(tmp_path, tiny_llama, stages, num_samples=8, seq_len=64, batch_size=4) == 0
    )
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    metrics = rec["stages"][0]["metrics"]
    assert metrics["effective_bits"] <= 7.0
    chosen = metrics["formats_chosen"]
    assert any("FP8" in k for k in chosen) and any("INT4_AWQ" in k for k in chosen)  # really mixed
    ckpt = tmp_path / "run" / "trtllm_checkpoint"
    assert (
        json.loads((ckpt / "config.json").read_text())["quantization"]["quant_algo"]
        == "MIXED_PRECISION"
    )
    layers = json.loads((ckpt / "quant_cfg.json").read_text())["quantized_layers"]
    assert {v["quant_algo"] for v in layers.values()} <= {"FP8", "W4A16_AWQ"}
    assert check_checkpoint(ckpt) == []


def test_infeasible_budget_is_bad_input(tiny_llama, tmp_path, capsys):
    stages = ["auto_quantize: {effective_bits: 4.5, formats: [fp8, int4_awq]}", "export: {}"]
    assert run_tiny_recipe(tmp_path, tiny_llama, stages, num_samples=4, batch_size=4) == 2
    err = capsys.readouterr().err
    assert (
        "stage 'auto_quantize': effective_bits 4.5:" in err
        and "infeasible" in err
        and "Raise the budget" in err
    )


def test_mixed_precision_checks_each_layers_own_awq_group_size(tmp_path):
    """ModelOpt's MIXED_PRECISION checkpoint declares group_size per layer (quant_cfg.json)
    and none at the top: a hidden size of 192 is fine for group 64 (TensorRT-LLM pads to
    multiples of 64) but not for the default 128 the validator would otherwise assume."""
    from tiny import make_tiny_llama

    model = make_tiny_llama(tmp_path / "m", hidden=192, intermediate=384, heads=4, kv_heads=2)
    stages = [
        "auto_quantize: {effective_bits: 7.0, formats: [fp8, int4_awq], group_size: 64}",
        "export: {}",
    ]
    assert run_tiny_recipe(tmp_path, model, stages, num_samples=8, seq_len=64, batch_size=4) == 0
    ckpt = tmp_path / "run" / "trtllm_checkpoint"
    layers = json.loads((ckpt / "quant_cfg.json").read_text())["quantized_layers"]
    assert {v.get("group_size") for v in layers.values() if v["quant_algo"] == "W4A16_AWQ"} == {64}
    assert "group_size" not in json.loads((ckpt / "config.json").read_text())["quantization"]
    assert check_checkpoint(ckpt) == []
