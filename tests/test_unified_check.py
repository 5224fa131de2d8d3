"""``optimize check`` on ModelOpt unified HF checkpoints: real exports of a tiny Llama pass,
and each planted defect fails with its own message (exit 2, no traceback).

Every checkpoint here is written by ModelOpt 0.47's ``export_hf_checkpoint`` on CPU,
NVFP4 included: its ``max`` calibration and its export run without CUDA (only NVFP4
*forwards* of the fake-quantized model need a GPU), so the NVFP4 rules are checked against
a real export, not a hand-written imitation. Defects are planted by rewriting the exported
files (tensors through safetensors, headers and JSON by hand).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from optimizer.cli import main
from optimizer.safetensors_header import read_safetensors_header
from optimizer.unified.check import LINEAR_RULES, check_hf_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:.*is not calibrated, skip smoothing")

EXPORTS = {
    "fp8_kv": ("fp8", "fp8"),
    "int4_awq": ("int4_awq", "none"),
    "w4a8_awq": ("w4a8_awq", "none"),
    "int8_sq": ("int8_sq", "none"),
    "nvfp4": ("nvfp4", "none"),
    "w4a16_nvfp4": ("w4a16_nvfp4", "none"),
    "fp8_pc_pt": ("fp8_pc_pt", "none"),
    "int8_wo": ("int8_wo", "none"),
}


def _export(model_dir: Path, out: Path, fmt: str, kv: str, extra_cfg=None, **export_kw) -> Path:
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    from optimizer.models import cast_to_storage
    from optimizer.techniques.quantize import QuantizeConfig

    # Calibrate in float32 (bf16 matmuls are slow on CPUs without native bf16), then round to
    # the bf16 storage dtype as the export stage does (exporters.py via cast_to_storage).
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.architectures = ["LlamaForCausalLM"]
    cfg = QuantizeConfig(format=fmt, kv_cache=kv).modelopt_config()
    cfg["quant_cfg"] += extra_cfg or []
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (2, 16), generator=gen) for _ in range(2)]

    def forward_loop(m):
        for batch in batches:
            m(batch)

    mtq.quantize(model, cfg, forward_loop)
    cast_to_storage(model, "bfloat16", "float32")
    export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=out, **export_kw)
    return out


@pytest.fixture(scope="module")
def exports(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """One real export per CPU format, plus a sharded and a mixed-precision one (a few s).

    On one thread: AWQ's many tiny matmuls run 10x slower on two threads of a busy 2-core
    machine (measured: int4_awq 1.4 s on one thread, 18 s on two)."""
    import modelopt.torch.quantization as mtq
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("unified")
        out = {name: _export(tiny_llama, root / name, *spec) for name, spec in EXPORTS.items()}
        out["sharded"] = _export(tiny_llama, root / "sharded", "fp8", "fp8", max_shard_size="100KB")
        nvfp4 = {
            e["quantizer_name"]: e["cfg"] for e in mtq.NVFP4_DEFAULT_CFG["quant_cfg"] if "cfg" in e
        }
        out["mixed"] = _export(
            tiny_llama,
            root / "mixed",
            "fp8",
            "fp8",
            extra_cfg=[
                {"quantizer_name": "*mlp*weight_quantizer", "cfg": nvfp4["*weight_quantizer"]},
                {"quantizer_name": "*mlp*input_quantizer", "cfg": nvfp4["*input_quantizer"]},
                {"quantizer_name": "*layers.1.self_attn.o_proj*", "enable": False},
            ],
        )
    finally:
        torch.set_num_threads(threads)
    return out


def messages(path: Path) -> list[str]:
    return [p.message for p in check_hf_checkpoint(path)]


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def edit_tensors(path: Path, change) -> None:
    """Rewrite model.safetensors with ``change(tensors)`` applied (real data, valid header)."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def edit_header(file: Path, change) -> None:
    """Rewrite only the JSON header of a safetensors file (the data bytes stay as they are)."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    change(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    file.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


# --------------------------------------------------------------------------- clean exports


@pytest.mark.parametrize("name", [*EXPORTS, "sharded", "mixed"])
def test_every_real_export_checks_ok(exports, name, capsys):
    assert messages(exports[name]) == []
    assert main(["check", str(exports[name])]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok: {exports[name]} (unified HF checkpoint, quant_algo ")


def test_the_table_matches_what_modelopt_wrote(exports):
    """Packing and scale layouts of the real exports, as numbers (hidden 128, inter 256)."""
    h = read_safetensors_header
    awq = h(exports["int4_awq"] / "model.safetensors")
    down = "model.layers.0.mlp.down_proj"
    assert awq[f"{down}.weight"] == {"dtype": "U8", "shape": [64, 256]}  # [out / 2, in]
    assert awq[f"{down}.weight_scale"]["shape"] == [128, 2]  # [out, in / 128]
    assert awq[f"{down}.pre_quant_scale"]["shape"] == [256]
    assert "model.layers.0.self_attn.q_proj.pre_quant_scale" not in awq  # folded into the norm
    nv = h(exports["nvfp4"] / "model.safetensors")
    assert nv[f"{down}.weight"] == {"dtype": "U8", "shape": [128, 128]}  # [out, in / 2]
    assert nv[f"{down}.weight_scale"] == {"dtype": "F8_E4M3", "shape": [128, 16]}
    assert nv[f"{down}.weight_scale_2"] == {"dtype": "F32", "shape": []}
    fp8 = h(exports["fp8_kv"] / "model.safetensors")
    assert fp8["model.layers.1.self_attn.k_proj.k_scale"] == {"dtype": "F32", "shape": []}
    assert fp8["lm_head.weight"]["dtype"] == "BF16"  # excluded: the checkpoint dtype
    assert LINEAR_RULES["W4A16_AWQ"].packing == "out/2" and LINEAR_RULES["NVFP4"].block == 16


def test_a_plain_hf_checkpoint_checks_ok(tiny_llama, capsys):
    assert main(["check", str(tiny_llama)]) == 0
    out = capsys.readouterr().out
    assert "(Hugging Face checkpoint, unquantized, LlamaForCausalLM, 21 tensors" in out


# --------------------------------------------------------------------------- planted defects


def test_missing_weight_scale(exports, tmp_path):
    d = copy(exports["fp8_kv"], tmp_path / "c")
    edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight_scale"))
    assert messages(d) == ["model.layers.1.mlp.up_proj.weight_scale is missing on a FP8 layer"]


def test_wrong_shape_block_scale(exports, tmp_path):
    import torch

    d = copy(exports["int4_awq"], tmp_path / "c")
    name = "model.layers.0.mlp.down_proj.weight_scale"
    edit_tensors(d, lambda t: t.update({name: torch.ones(128, 4)}))
    assert messages(d) == [f"{name} has shape [128, 4], expected [128, 2]"]


def test_wrong_shape_nvfp4_scale_and_dtype(exports, tmp_path):
    import torch

    d = copy(exports["nvfp4"], tmp_path / "c")
    scale = "model.layers.0.self_attn.q_proj.weight_scale"
    edit_tensors(d, lambda t: t.update({scale: t[scale].float()[:, :4].contiguous()}))
    assert messages(d) == [
        f"{scale} is F32, expected F8_E4M3",
        f"{scale} has shape [128, 4], expected [128, 8]",
    ]
    d = copy(exports["nvfp4"], tmp_path / "d")
    weight = "model.layers.0.self_attn.q_proj.weight"
    edit_tensors(d, lambda t: t.update({weight: torch.zeros(64, 128, dtype=torch.uint8)}))
    assert messages(d) == [
        f"{weight} has shape [64, 128], expected [128, 64] (NVFP4, 128x128 packed 'in/2')"
    ]


def test_wrong_weight_dtype(exports, tmp_path):
    d = copy(exports["fp8_kv"], tmp_path / "c")
    name = "model.layers.0.self_attn.o_proj.weight"
    edit_tensors(d, lambda t: t.update({name: t[name].bfloat16()}))
    assert messages(d) == [f"{name} is BF16, expected F8_E4M3 for FP8"]
    d = copy(exports["int8_sq"], tmp_path / "d")
    edit_tensors(d, lambda t: t.update({"lm_head.weight": t["lm_head.weight"].float()}))
    assert messages(d) == [
        "lm_head.weight is F32, expected BF16 (unquantized, stored in the checkpoint dtype)"
    ]


def test_quant_algo_mismatch_between_the_config_files(exports, tmp_path):
    d = copy(exports["w4a8_awq"], tmp_path / "c")
    edit_json(d / "config.json", lambda c: c["quantization_config"].update(quant_algo="W4A16_AWQ"))
    assert messages(d) == [
        "quant_algo disagrees: hf_quant_config.json says 'W4A8_AWQ', config.json's "
        "quantization_config says 'W4A16_AWQ'"
    ]


def test_unknown_quant_algo(exports, tmp_path):
    d = copy(exports["fp8_kv"], tmp_path / "c")
    edit_json(d / "config.json", lambda c: c["quantization_config"].update(quant_algo="FP6"))
    edit_json(d / "hf_quant_config.json", lambda c: c["quantization"].update(quant_algo="FP6"))
    found = messages(d)
    assert len(found) == 1 and found[0].startswith(
        "hf_quant_config.json quant_algo 'FP6' is not one ModelOpt 0.47 exports (FP8, "
    )


def test_kv_scales_missing_or_unexpected(exports, tmp_path):
    d = copy(exports["fp8_kv"], tmp_path / "c")
    edit_tensors(d, lambda t: t.pop("model.layers.0.self_attn.v_proj.v_scale"))
    assert messages(d) == ["model.layers.0.self_attn.v_proj.v_scale is missing (FP8 KV cache)"]
    d = copy(exports["int8_sq"], tmp_path / "d")
    import torch

    name = "model.layers.1.self_attn.k_proj.k_scale"
    edit_tensors(d, lambda t: t.update({name: torch.tensor(1.0)}))
    assert messages(d) == [f"{name} is stored, but kv_cache_quant_algo is not set"]


def test_kv_algo_disagreement(exports, tmp_path):
    d = copy(exports["fp8_kv"], tmp_path / "c")
    edit_json(d / "config.json", lambda c: c["quantization_config"].pop("kv_cache_scheme"))
    assert messages(d) == [
        "KV cache disagrees: hf_quant_config.json kv_cache_quant_algo is 'FP8', config.json's "
        "kv_cache_scheme is None (expected {'dynamic': False, 'num_bits': 8, 'type': 'float'})"
    ]


def test_a_header_whose_offsets_lie_does_not_pass(exports, tmp_path):
    d = copy(exports["fp8_kv"], tmp_path / "c")
    name = "model.layers.0.mlp.gate_proj.weight"

    def grow(header):  # claims a larger tensor in the same bytes
        header[name]["shape"] = [512, 128]

    edit_header(d / "model.safetensors", grow)
    assert messages(d) == [
        f"model.safetensors is unreadable: tensor {name}: data_offsets span 32768 bytes, but "
        "F8_E4M3 [512, 128] needs 65536"
    ]
    d = copy(exports["fp8_kv"], tmp_path / "d")

    def overlap(header):  # a consistent size, but on top of another tensor's bytes
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin - 16, end - 16]

    edit_header(d / "model.safetensors", overlap)
    found = messages(d)
    assert len(found) == 1 and "overlaps the previous tensor" in found[0]


def test_missing_layer_tensor_and_missing_layer(exports, tmp_path):
    d = copy(exports["int4_awq"], tmp_path / "c")
    edit_tensors(d, lambda t: t.pop("model.layers.1.post_attention_layernorm.weight"))
    assert messages(d) == [
        "required tensor model.layers.1.post_attention_layernorm.weight is missing"
    ]
    d = copy(exports["int4_awq"], tmp_path / "d")

    def drop_layer(t):
        for k in [k for k in t if k.startswith("model.layers.1.")]:
            del t[k]

    edit_tensors(d, drop_layer)
    assert messages(d) == [
        "layer 1 is missing: none of its tensors is stored (config.json says num_hidden_layers 2)"
    ]
    d = copy(exports["int4_awq"], tmp_path / "e")
    edit_json(d / "config.json", lambda c: c.update(num_hidden_layers=1))
    found = messages(d)
    assert found[-1] == "18 tensors of layer 1 are stored, but config.json says num_hidden_layers 1"


def test_group_size_exclusions_and_tied_embeddings(exports, tmp_path):
    d = copy(exports["int4_awq"], tmp_path / "c")
    edit_json(d / "hf_quant_config.json", lambda c: c["quantization"].pop("group_size"))
    assert messages(d) == [
        "hf_quant_config.json group_size is None; W4A16_AWQ needs a positive integer group size"
    ]
    d = copy(exports["fp8_kv"], tmp_path / "d")
    extra = ["lm_head", "model.embed_tokens", "model.vision_tower*"]
    edit_json(d / "hf_quant_config.json", lambda c: c["quantization"].update(exclude_modules=extra))
    edit_json(d / "config.json", lambda c: c["quantization_config"].update(ignore=extra))
    assert messages(d) == [
        "exclude_modules entry 'model.vision_tower*' names no module of the model"
    ]
    d = copy(exports["fp8_kv"], tmp_path / "e")
    edit_json(d / "config.json", lambda c: c.update(tie_word_embeddings=True))
    assert messages(d) == [
        "lm_head.weight is stored, but config.json says tie_word_embeddings (the runtime uses "
        "the embedding and ignores it)"
    ]


def test_an_excluded_layer_stored_quantized(exports, tmp_path):
    """MIXED_PRECISION: layers.1 o_proj is not in quantized_layers; storing it quantized fails."""
    d = copy(exports["mixed"], tmp_path / "c")
    name = "model.layers.1.self_attn.o_proj"
    edit_json(
        d / "hf_quant_config.json",
        lambda c: c["quantization"]["quantized_layers"].pop("model.layers.1.mlp.down_proj"),
    )
    edit_json(
        d / "config.json",
        lambda c: c["quantization_config"]["quantized_layers"].pop("model.layers.1.mlp.down_proj"),
    )
    found = messages(d)
    down = "model.layers.1.mlp.down_proj"
    unquantized = (
        f"is stored, but {down} is not quantized (excluded or absent from the quantization config)"
    )
    assert found == [
        f"{down}.weight has shape [128, 128], expected [128, 256]",
        f"{down}.weight is U8, expected BF16 (unquantized, stored in the checkpoint dtype)",
        f"{down}.input_scale {unquantized}",
        f"{down}.weight_scale {unquantized}",
        f"{down}.weight_scale_2 {unquantized}",
    ]
    assert not any(name in m for m in found)


def test_sharded_index_consistency(exports, tmp_path):
    d = copy(exports["sharded"], tmp_path / "c")
    index = d / "model.safetensors.index.json"
    shard_of_norm = json.loads(index.read_text())["weight_map"]["model.norm.weight"]
    edit_json(index, lambda c: c["weight_map"].pop("model.norm.weight"))
    found = messages(d)
    assert len(found) == 1 and found[0].startswith("model.norm.weight (in model-0000")
    assert found[0].endswith(") is not in model.safetensors.index.json's weight_map")
    edit_json(index, lambda c: c["metadata"].update(total_size=1000))
    edit_json(index, lambda c: c["weight_map"].update({"model.norm.weight": shard_of_norm}))
    assert messages(d) == [
        "model.safetensors.index.json metadata.total_size is 1000, the shards hold 558464 bytes"
    ]
    d = copy(exports["sharded"], tmp_path / "d")
    shard = json.loads(index.read_text())["weight_map"]["model.norm.weight"]
    (d / shard).unlink()
    found = messages(d)
    assert found[0] == f"{shard} is listed in model.safetensors.index.json but missing"


def test_config_and_quant_config_presence(exports, tiny_llama, tmp_path):
    d = copy(exports["fp8_kv"], tmp_path / "c")
    (d / "hf_quant_config.json").unlink()
    assert messages(d) == [
        "hf_quant_config.json is missing, but config.json's quantization_config says quant_algo "
        "'FP8' (TensorRT-LLM reads hf_quant_config.json)"
    ]
    d = copy(exports["fp8_kv"], tmp_path / "d")
    edit_json(d / "config.json", lambda c: c.pop("quantization_config"))
    assert messages(d) == [
        "config.json has no quantization_config, but hf_quant_config.json says quant_algo 'FP8' "
        "(vLLM and SGLang read config.json's)"
    ]
    d = copy(tiny_llama, tmp_path / "e")  # a plain checkpoint with a stray scale
    import torch

    edit_tensors(
        d, lambda t: t.update({"model.layers.0.mlp.up_proj.weight_scale": torch.tensor(1.0)})
    )
    assert messages(d) == [
        "model.layers.0.mlp.up_proj.weight_scale is stored, but model.layers.0.mlp.up_proj is not "
        "quantized (excluded or absent from the quantization config)"
    ]


# --------------------------------------------------------------------------- bad input via the CLI


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[1, 2]", "config.json holds list, not a JSON object"),
        ("null", "config.json holds NoneType, not a JSON object"),
        ("{not json", "config.json is not valid JSON: "),
    ],
)
def test_malformed_config_exits_2_with_one_line(exports, tmp_path, capsys, content, expected):
    d = copy(exports["int8_sq"], tmp_path / "c")
    (d / "config.json").write_text(content)
    assert main(["check", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {d}: {expected}") and err.count("\n") == 1
    assert "Traceback" not in err


def test_missing_dir_and_malformed_quant_config_exit_2(exports, tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope'}: not a directory\n"
    d = copy(exports["int8_sq"], tmp_path / "c")
    (d / "hf_quant_config.json").write_text("[]")
    assert main(["check", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"error: {d}: hf_quant_config.json holds list, not a JSON object"
    assert "hint: " in err and "Traceback" not in err


def test_an_architecture_outside_the_table_gets_per_layer_checks(exports, tmp_path, capsys):
    """No tensor list for it, so layers are not counted, but each quantized layer is checked."""
    d = copy(exports["fp8_kv"], tmp_path / "c")
    edit_json(d / "config.json", lambda c: c.update(architectures=["FooForCausalLM"]))
    assert main(["check", str(d)]) == 0
    assert "FooForCausalLM, tensor list not known: layers not counted" in capsys.readouterr().out
    edit_tensors(d, lambda t: t.pop("model.layers.0.self_attn.q_proj.input_scale"))
    assert messages(d) == ["model.layers.0.self_attn.q_proj.input_scale is missing on a FP8 layer"]
