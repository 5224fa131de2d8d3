"""Formats are validated against the model and the machine before anything loads."""

import pytest

from optimizer.errors import RecipeError
from optimizer.formats import FORMAT_NAMES, FORMATS, KV_CACHE_FORMATS
from optimizer.recipe import load_recipe
from optimizer.registry import Registry, UnknownName
from optimizer.trtllm import facts

BUILTIN = """\
name: v
model: {{source: "builtin:smollm2-135m-instruct"}}
calibration: {{dataset: {calib}}}
stages:
  - ptq: {{format: {fmt}}}
  - export: {{trtllm_checkpoint: {{tp: {tp}}}, hf_checkpoint: true}}
"""


def problems(write_recipe, fmt="fp8", tp=1, device="cpu", overrides=()):
    path = write_recipe(BUILTIN, name="v.yaml", fmt=fmt, tp=tp)
    try:
        load_recipe(path, list(overrides), device=device)
    except RecipeError as e:
        return [str(p) for p in e.problems]
    return []


def test_gpu_formats_are_refused_on_a_cpu_machine(write_recipe):
    (msg,) = problems(write_recipe, "nvfp4", device="cpu")
    assert "stages[0].ptq: nvfp4 needs a CUDA GPU" in msg and "--device gpu" in msg
    assert problems(write_recipe, "nvfp4", device="gpu") == []
    (msg,) = problems(write_recipe, "fp8", device="cpu", overrides=["stages.ptq.kv_cache=nvfp4"])
    assert "kv_cache nvfp4 needs a CUDA GPU" in msg


def test_group_size_is_checked_against_the_model(write_recipe):
    (msg,) = problems(write_recipe, "int4_awq")
    assert "stages[0].ptq.format: int4_awq uses blocks of 128" in msg
    assert "hidden_size (q/k/v, gate/up inputs) = 576" in msg and "set group_size to 64" in msg
    assert problems(write_recipe, "int4_awq", overrides=["stages.ptq.group_size=64"]) == []


def test_algorithm_and_group_size_must_fit_the_format(write_recipe):
    (msg,) = problems(write_recipe, "fp8", overrides=["stages.ptq.algorithm=awq_lite"])
    assert "algorithm 'awq_lite' does not apply to fp8; choose one of: max, mse" in msg
    (msg,) = problems(write_recipe, "nvfp4", device="gpu", overrides=["stages.ptq.group_size=32"])
    assert "group_size is fixed for nvfp4 (16)" in msg


def test_formats_trtllm_cannot_build_are_steered_to_the_hf_checkpoint(write_recipe):
    for fmt in ("w4a16_nvfp4", "nvfp4_awq", "int8_wo"):
        (msg,) = problems(write_recipe, fmt, device="gpu")
        assert (
            "stages[1].export.trtllm_checkpoint:" in msg
            and "has no TensorRT-LLM 1.2 quant_algo" in msg
        )
        assert "hf_checkpoint: true" in msg
        assert (
            problems(
                write_recipe, fmt, device="gpu", overrides=["stages.export.trtllm_checkpoint=null"]
            )
            == []
        )


def test_trtllm_layout_limits(write_recipe):
    (msg,) = problems(write_recipe, "w4a8_awq", overrides=["stages.ptq.group_size=64"])
    assert "does not implement W4A8 AWQ with group_size 64" in msg
    (msg,) = problems(write_recipe, "fp8", tp=2)
    assert "tp=2 does not divide the model's 9 attention heads" in msg
    assert problems(write_recipe, "fp8", tp=3) == []


def test_unknown_modelopt_recipe(write_recipe):
    (msg,) = problems(
        write_recipe, "null", overrides=["stages.ptq.modelopt_recipe=general/ptq/nope"]
    )
    assert "no ModelOpt recipe named 'general/ptq/nope'" in msg
    (msg,) = problems(
        write_recipe, "fp8", overrides=["stages.ptq.modelopt_recipe=general/ptq/fp8_default-kv_fp8"]
    )
    assert "set exactly one of `format`" in msg


@pytest.mark.parametrize("bits,ok", [(6.0, True), (3.0, False)])
def test_auto_quantize_budget(write_recipe, bits, ok):
    path = write_recipe(
        BUILTIN.replace(
            "ptq: {{format: {fmt}}}",
            f"auto_quantize: {{{{effective_bits: {bits}, formats: [fp8, int4_awq], group_size: 64}}}}",
        ),
        name="aq.yaml",
        fmt="",
        tp=1,
    )
    if ok:
        assert load_recipe(path, device="cpu").stages[0].name == "auto_quantize"
    else:
        with pytest.raises(RecipeError, match="below 4.0"):
            load_recipe(path, device="cpu")


def test_formats_are_a_registry_consistent_with_the_trtllm_table():
    assert isinstance(FORMATS, Registry) and "fp8" in FORMATS and "fp9" not in FORMATS
    assert sorted(FORMAT_NAMES) == FORMATS.names() == list(FORMATS)
    assert FORMATS.get("int4_awq").trtllm_algo == "W4A16_AWQ"
    with pytest.raises(UnknownName, match="unknown format 'fp9'; did you mean 'fp8'"):
        FORMATS["fp9"]
    for name, spec in FORMATS.items():
        assert spec.name == name
        # A format either names a quant_algo TensorRT-LLM has, or says why it has none.
        assert spec.trtllm_algo in facts.QUANT_ALGOS or (
            spec.trtllm_algo is None and spec.trtllm_note
        )
    assert {kv.trtllm_algo for _, kv in KV_CACHE_FORMATS.items()} <= facts.KV_CACHE_QUANT_ALGOS


def test_per_layer_exclusions_are_refused_where_tensorrt_llm_quantizes_whole_blocks(
    write_recipe,
):
    (msg,) = problems(
        write_recipe, "fp8_pc_pt", overrides=["stages.ptq.exclude=['*layers.0.mlp*']"]
    )
    assert "stages[1].export.trtllm_checkpoint:" in msg
    assert "whole attention/MLP blocks for FP8_PER_CHANNEL_PER_TOKEN" in msg
    assert problems(write_recipe, "fp8_pc_pt") == []
    assert problems(write_recipe, "fp8", overrides=["stages.ptq.exclude=['*layers.0.mlp*']"]) == []
