"""TensorRT-LLM checkpoint facts: the schema ``trtllm-build`` (1.2.x) accepts, fix-ups, checks.

A TensorRT-LLM checkpoint is ``config.json`` + ``rank{r}.safetensors`` for each of
``world_size = tp * pp`` ranks. Its ``quantization`` block is parsed strictly by TensorRT-LLM
(unknown keys are errors), and ``quant_algo`` / ``kv_cache_quant_algo`` must be members of
its QuantAlgo enum.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REQUIRED_CONFIG_KEYS = (
    "architecture",
    "dtype",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
)
QUANTIZATION_KEYS = {
    "quant_algo",
    "kv_cache_quant_algo",
    "group_size",
    "has_zero_point",
    "pre_quant_scale",
    "exclude_modules",
    "smoothquant_val",
    "clamp_val",
}
QUANT_ALGOS = {
    "W8A16",
    "W4A16",
    "W4A16_AWQ",
    "W4A8_AWQ",
    "W8A16_GPTQ",
    "W4A16_GPTQ",
    "W8A8_SQ_PER_CHANNEL",
    "W8A8_SQ_PER_TENSOR_PLUGIN",
    "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
    "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN",
    "W4A8_QSERVE_PER_GROUP",
    "W4A8_QSERVE_PER_CHANNEL",
    "FP8",
    "FP8_PER_CHANNEL_PER_TOKEN",
    "FP8_BLOCK_SCALES",
    "MIXED_PRECISION",
    "NVFP4",
    "W4A8_NVFP4_FP8",
    "W4A8_MXFP4_FP8",
    "W4A8_MXFP4_MXFP8",
    "W4A16_MXFP4",
    "NO_QUANT",
}
KV_CACHE_QUANT_ALGOS = {"FP8", "INT8", "NVFP4"}


def rope_settings(hf_config: Any) -> dict[str, Any]:
    """``rotary_base`` / ``rotary_scaling`` as TensorRT-LLM expects them, from an HF config.

    transformers 5 keeps rope settings in ``config.rope_parameters``; 4.x used ``rope_theta``
    and ``rope_scaling`` attributes. Both are read.
    """
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    legacy_scaling = getattr(hf_config, "rope_scaling", None)
    if isinstance(legacy_scaling, dict):
        params = {**legacy_scaling, **params}
    base = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    scaling = None
    if rope_type != "default":
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "rope_type", "type")}
        scaling["type"] = rope_type
    out: dict[str, Any] = {"rotary_scaling": scaling}
    if base is not None:
        out["rotary_base"] = float(base)
    return out


def apply_rope_settings(checkpoint: Path, hf_config: Any) -> None:
    path = checkpoint / "config.json"
    config = json.loads(path.read_text())
    if config.get("position_embedding_type", "rope_gpt_neox").startswith("rope"):
        config.update(rope_settings(hf_config))
        path.write_text(json.dumps(config, indent=4) + "\n")


def check_checkpoint(checkpoint: Path) -> list[str]:
    """Problems that would make ``trtllm-build`` reject the checkpoint (empty if none)."""
    path = checkpoint / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return [f"{path} is missing"]
    except ValueError as e:
        return [f"{path} is not valid JSON: {e}"]
    problems = [
        f"config.json lacks required key '{k}'" for k in REQUIRED_CONFIG_KEYS if k not in config
    ]
    quant = config.get("quantization") or {}
    for key in sorted(set(quant) - QUANTIZATION_KEYS):
        problems.append(
            f"quantization.{key} is not a key TensorRT-LLM accepts (it rejects unknown keys)"
        )
    algo = quant.get("quant_algo")
    if algo is not None and algo not in QUANT_ALGOS:
        problems.append(f"quantization.quant_algo {algo!r} is not supported by TensorRT-LLM")
    kv = quant.get("kv_cache_quant_algo")
    if kv is not None and kv not in KV_CACHE_QUANT_ALGOS:
        problems.append(f"quantization.kv_cache_quant_algo {kv!r} is not supported by TensorRT-LLM")
    mapping = config.get("mapping") or {}
    world = int(mapping.get("world_size", 1))
    for r in range(world):
        if not (checkpoint / f"rank{r}.safetensors").is_file():
            problems.append(f"rank{r}.safetensors is missing (world_size is {world})")
    return problems


def summarize(checkpoint: Path) -> dict[str, Any]:
    config = json.loads((checkpoint / "config.json").read_text())
    quant = config.get("quantization") or {}
    return {
        "quant_algo": quant.get("quant_algo"),
        "kv_cache_quant_algo": quant.get("kv_cache_quant_algo"),
        "world_size": (config.get("mapping") or {}).get("world_size", 1),
        "bytes": sum(f.stat().st_size for f in checkpoint.glob("rank*.safetensors")),
    }
