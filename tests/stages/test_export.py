"""export stage and the TensorRT-LLM checkpoint facts it relies on."""

import json
import shutil

import pytest
from tiny import CALIBRATION, make_tiny_llama

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
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: rope\nmodel: {{source: {llama3_style}}}\n"
        f"calibration: {{dataset: {CALIBRATION}, num_samples: 2, seq_len: 32}}\n"
        "stages:\n  - ptq: {format: fp8}\n  - export: {}\n"
    )
    assert main(["run", str(recipe), "-o", str(tmp_path / "run"), "-q"]) == 0
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


def test_check_checkpoint_catches_what_trtllm_build_rejects(tmp_path, tiny_llama):
    good = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: c\nmodel: {{source: {tiny_llama}}}\n"
        f"calibration: {{dataset: {CALIBRATION}, num_samples: 2, seq_len: 32}}\n"
        "stages:\n  - ptq: {format: fp8}\n  - export: {}\n"
    )
    assert main(["run", str(recipe), "-o", str(good), "-q"]) == 0
    ckpt = good / "trtllm_checkpoint"
    assert trtllm.check_checkpoint(ckpt) == []

    def broken(name, edit):
        d = tmp_path / name
        shutil.copytree(ckpt, d)
        config = json.loads((d / "config.json").read_text())
        edit(d, config)
        (d / "config.json").write_text(json.dumps(config))
        return trtllm.check_checkpoint(d)

    assert broken("unknown-key", lambda d, c: c["quantization"].update(fp8_scales="x")) == [
        "quantization.fp8_scales is not a key TensorRT-LLM accepts (it rejects unknown keys)"
    ]
    assert broken("bad-algo", lambda d, c: c["quantization"].update(quant_algo="W4A16_NVFP4")) == [
        "quantization.quant_algo 'W4A16_NVFP4' is not supported by TensorRT-LLM"
    ]
    assert broken("missing-rank", lambda d, c: c["mapping"].update(world_size=2, tp_size=2)) == [
        "rank1.safetensors is missing (world_size is 2)"
    ]
    assert broken("no-arch", lambda d, c: c.pop("architecture")) == [
        "config.json lacks required key 'architecture'"
    ]
