"""export stage and the TensorRT-LLM checkpoint facts it relies on."""

import json

import pytest
from tiny import make_tiny_llama, run_tiny_recipe

from optimizer import trtllm
from optimizer.cli import main

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.fixture(scope="module")
def llama3_style(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("m") / "llama3", rope_parameters=LLAMA3_ROPE)


def test_export_keeps_llama3_rope_settings(llama3_style, tmp_path):
    assert run_tiny_recipe(tmp_path, llama3_style, ["ptq: {format: fp8}", "export: {}"]) == 0
    config = json.loads((tmp_path / "run" / "trtllm_checkpoint" / "config.json").read_text())
    source = json.loads((llama3_style / "config.json").read_text())["rope_parameters"]
    assert config["rotary_base"] == source["rope_theta"] == 500000.0
    assert config["rotary_scaling"] == {
        "type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


def test_rope_settings_from_transformers_4_style_config():
    class Legacy:
        rope_theta = 1e6
        rope_scaling = {"type": "linear", "factor": 2.0}

    assert trtllm.rope_settings(Legacy()) == {
        "rotary_base": 1e6,
        "rotary_scaling": {"type": "linear", "factor": 2.0},
    }


def test_tensor_and_pipeline_parallel_shards(tiny_llama, tmp_path):
    stages = ["ptq: {format: fp8}", "export: {trtllm_checkpoint: {tp: 2, pp: 1}}"]
    assert run_tiny_recipe(tmp_path, tiny_llama, stages) == 0
    ckpt = tmp_path / "run" / "trtllm_checkpoint"
    assert sorted(p.name for p in ckpt.glob("rank*")) == ["rank0.safetensors", "rank1.safetensors"]
    config = json.loads((ckpt / "config.json").read_text())
    assert config["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    header = trtllm.read_safetensors_header(ckpt / "rank1.safetensors")
    # 4 heads + 2 x 2 KV heads of 32 rows, split over 2 ranks; dense splits its input
    assert header["transformer.layers.0.attention.qkv.weight"]["shape"] == [128, 128]
    assert header["transformer.layers.0.attention.dense.weight"]["shape"] == [128, 64]
    assert trtllm.check_checkpoint(ckpt) == []
    assert (
        main(
            [
                "run",
                str(tmp_path / "recipe.yaml"),
                "-o",
                str(tmp_path / "pp"),
                "-q",
                "--set",
                "stages.export.trtllm_checkpoint={tp: 1, pp: 2}",
            ]
        )
        == 0
    )
    ckpt = tmp_path / "pp" / "trtllm_checkpoint"
    first = trtllm.read_safetensors_header(ckpt / "rank0.safetensors")
    last = trtllm.read_safetensors_header(ckpt / "rank1.safetensors")
    assert "transformer.vocab_embedding.weight" in first and "lm_head.weight" not in first
    assert "lm_head.weight" in last and "transformer.ln_f.weight" in last
    assert trtllm.check_checkpoint(ckpt) == []


@pytest.mark.parametrize("fmt", ["fp8", "int4_awq"])
def test_the_hf_checkpoint_does_not_depend_on_a_trtllm_export_beside_it(tiny_llama, tmp_path, fmt):
    """ModelOpt's TensorRT-LLM export fuses q/k/v and gate/up in place (shared amax,
    re-smoothed weights); the unified checkpoint written after it in the same stage must still
    be the one an HF-only export writes, tensor for tensor (the one a search trial judged)."""
    from safetensors.torch import load_file

    both, alone = tmp_path / "both", tmp_path / "alone"
    for directory, trtllm_checkpoint in ((both, "{}"), (alone, "null")):
        directory.mkdir()
        stages = [
            f"ptq: {{format: {fmt}}}",
            f"export: {{trtllm_checkpoint: {trtllm_checkpoint}, hf_checkpoint: true}}",
        ]
        assert run_tiny_recipe(directory, tiny_llama, stages) == 0
    assert (both / "run" / "trtllm_checkpoint").is_dir()
    assert not (alone / "run" / "trtllm_checkpoint").exists()
    a = load_file(both / "run" / "hf_checkpoint" / "model.safetensors")
    b = load_file(alone / "run" / "hf_checkpoint" / "model.safetensors")
    assert sorted(a) == sorted(b)
    differ = [k for k in a if a[k].dtype != b[k].dtype or not a[k].equal(b[k])]
    assert differ == []
