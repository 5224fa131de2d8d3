"""The TensorRT-LLM checkpoint validator (`optimize check`) on good and deliberately broken
checkpoints."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file
from tiny import run_tiny_recipe

from optimizer import trtllm
from optimizer.cli import main


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory, tiny_llama):
    base = tmp_path_factory.mktemp("ckpt")
    assert (
        run_tiny_recipe(base, tiny_llama, ["ptq: {format: fp8, kv_cache: fp8}", "export: {}"]) == 0
    )
    return base / "run" / "trtllm_checkpoint"


def broken(src, dst, edit_config=None, edit_tensors=None):
    shutil.copytree(src, dst)
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(dst / "rank0.safetensors")
        edit_tensors(tensors)
        save_file(tensors, dst / "rank0.safetensors")
    return [str(p) for p in trtllm.check_checkpoint(dst)]


def test_good_checkpoint_passes(fp8_checkpoint, capsys):
    assert trtllm.check_checkpoint(fp8_checkpoint) == []
    assert main(["check", str(fp8_checkpoint)]) == 0
    assert "ok:" in capsys.readouterr().out


def test_unknown_quantization_key(fp8_checkpoint, tmp_path):
    found = broken(
        fp8_checkpoint, tmp_path / "c", lambda c: c["quantization"].update(fp8_scales="x")
    )
    assert found == [
        "quantization.fp8_scales is not a key TensorRT-LLM accepts (it rejects unknown keys)"
    ]


def test_missing_activation_scaling_factor_on_an_fp8_layer(fp8_checkpoint, tmp_path):
    name = "transformer.layers.1.mlp.proj.activation_scaling_factor"
    found = broken(fp8_checkpoint, tmp_path / "c", edit_tensors=lambda t: t.pop(name))
    assert found == [f"rank0: {name} is missing on a FP8 layer"]


def test_missing_rank_file(fp8_checkpoint, tmp_path):
    found = broken(
        fp8_checkpoint, tmp_path / "c", lambda c: c["mapping"].update(world_size=2, tp_size=2)
    )
    assert found == ["rank1.safetensors is missing (world_size is 2)"]


def test_unsupported_quant_algo(fp8_checkpoint, tmp_path):
    found = broken(
        fp8_checkpoint, tmp_path / "c", lambda c: c["quantization"].update(quant_algo="W4A16_NVFP4")
    )
    assert found == ["quantization.quant_algo 'W4A16_NVFP4' is not supported by TensorRT-LLM"]


def test_missing_kv_cache_scale_and_wrong_shapes(fp8_checkpoint, tmp_path):
    import torch

    def edit(t):
        t.pop("transformer.layers.0.attention.kv_cache_scaling_factor")
        t["transformer.layers.0.mlp.fc.weight"] = t["transformer.layers.0.mlp.fc.weight"][
            :10
        ].contiguous()
        t["transformer.layers.1.attention.dense.weight"] = torch.zeros(
            128, 128, dtype=torch.bfloat16
        )

    found = broken(fp8_checkpoint, tmp_path / "c", edit_tensors=edit)
    assert (
        "rank0: transformer.layers.0.attention.kv_cache_scaling_factor is missing (FP8 KV cache)"
        in found
    )
    assert (
        "rank0: transformer.layers.0.mlp.fc.weight has shape [10, 128], expected [256, 128] (FP8)"
        in found
    )
    assert (
        "rank0: transformer.layers.1.attention.dense.weight is BF16, expected F8_E4M3 for FP8"
        in found
    )


def test_truncated_rank_file_and_missing_config_key(fp8_checkpoint, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(fp8_checkpoint, dst)
    data = (dst / "rank0.safetensors").read_bytes()
    (dst / "rank0.safetensors").write_bytes(data[: len(data) // 2])
    found = [str(p) for p in trtllm.check_checkpoint(dst)]
    assert len(found) == 1 and found[0].startswith("rank0.safetensors is unreadable: truncated")
    found = broken(fp8_checkpoint, tmp_path / "d", lambda c: c.pop("architecture"))
    assert found == ["config.json lacks required key 'architecture'"]


def test_check_cli_prints_problems_with_hints_and_exits_2(fp8_checkpoint, tmp_path, capsys):
    broken(
        fp8_checkpoint, tmp_path / "c", lambda c: c["quantization"].update(quant_algo="NVFP4_AWQ")
    )
    assert main(["check", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "quant_algo 'NVFP4_AWQ' is not supported" in err and "hint: " in err


def test_check_cli_recognises_an_hf_checkpoint(tiny_llama, capsys):
    assert main(["check", str(tiny_llama)]) == 2
    assert "this is a Hugging Face checkpoint" in capsys.readouterr().err
