"""Quantization formats by simple name: the ModelOpt preset behind each, what it needs
(GPU, group sizes that divide the model), and what TensorRT-LLM 1.2 calls it.

Used by the ``ptq`` and ``auto_quantize`` stages; importing this module is cheap (ModelOpt
is imported only when a config is built).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from optimizer.registry import Registry
from optimizer.trtllm import facts


@dataclass(frozen=True)
class Format:
    name: str
    preset: str  # attribute of modelopt.torch.quantization
    summary: str
    #: ``quant_algo`` ModelOpt writes into a TensorRT-LLM checkpoint; None when TensorRT-LLM
    #: 1.2 has no such algorithm (the unified HF checkpoint is then the deploy path).
    trtllm_algo: str | None
    #: Calibration algorithms that make sense for this format; the first is the default.
    algorithms: tuple[str, ...]
    #: Any forward pass of the fake-quantized model needs CUDA (ModelOpt's FP4 kernels).
    needs_gpu: bool = False
    #: Default weight block (group) size along the input dimension, if blockwise.
    block_size: int | None = None
    #: Whether the recipe may choose the group size (NVFP4's 16 is fixed by the format).
    group_size_choosable: bool = False
    #: Why a TensorRT-LLM checkpoint of this format cannot be built (when trtllm_algo is None).
    trtllm_note: str = ""


_FORMATS = (
    Format(
        "fp8",
        "FP8_DEFAULT_CFG",
        "FP8 E4M3 weights and activations, per-tensor scales",
        "FP8",
        ("max", "mse"),
    ),
    Format(
        "fp8_pc_pt",
        "FP8_PER_CHANNEL_PER_TOKEN_CFG",
        "FP8 weights per output channel, activations per token (dynamic)",
        "FP8_PER_CHANNEL_PER_TOKEN",
        ("max",),
    ),
    Format(
        "int8_sq",
        "INT8_SMOOTHQUANT_CFG",
        "INT8 SmoothQuant: W8A8, per-channel weights",
        "W8A8_SQ_PER_CHANNEL",
        ("smoothquant",),
    ),
    Format(
        "int8_wo",
        "INT8_WEIGHT_ONLY_CFG",
        "INT8 weight-only (W8A16), per-channel",
        None,
        ("max", "mse"),
        trtllm_note="ModelOpt 0.47 writes W8A16 weights as [out, in] with weights_scaling_factor, "
        "while TensorRT-LLM 1.2 loads [in, out] with per_channel_scale",
    ),
    Format(
        "int4_awq",
        "INT4_AWQ_CFG",
        "INT4 weight-only AWQ (W4A16), blockwise",
        "W4A16_AWQ",
        ("awq_lite", "awq_full", "awq_clip"),
        block_size=128,
        group_size_choosable=True,
    ),
    Format(
        "w4a8_awq",
        "W4A8_AWQ_BETA_CFG",
        "INT4 AWQ weights with FP8 activations",
        "W4A8_AWQ",
        ("awq_lite", "awq_full", "awq_clip"),
        block_size=128,
        group_size_choosable=True,
    ),
    Format(
        "nvfp4",
        "NVFP4_DEFAULT_CFG",
        "NVFP4 weights and activations (block 16, FP8 scales)",
        "NVFP4",
        ("max", "mse"),
        needs_gpu=True,
        block_size=16,
    ),
    Format(
        "nvfp4_awq",
        "NVFP4_AWQ_LITE_CFG",
        "NVFP4 with AWQ pre-quant scaling",
        None,
        ("awq_lite", "awq_full", "awq_clip"),
        needs_gpu=True,
        block_size=16,
        trtllm_note="ModelOpt exports it as quant_algo NVFP4_AWQ, unknown to TensorRT-LLM 1.2",
    ),
    Format(
        "w4a16_nvfp4",
        "W4A16_NVFP4_CFG",
        "NVFP4 weight-only, 16-bit activations",
        None,
        ("max",),
        needs_gpu=True,
        block_size=16,
        trtllm_note="ModelOpt exports it as quant_algo W4A16_NVFP4, unknown to TensorRT-LLM 1.2",
    ),
)
#: Format names in the order declared above (the recipe schema lists its choices so; the
#: registry's own ``names()`` are sorted).
FORMAT_NAMES = tuple(f.name for f in _FORMATS)
FORMATS: Registry[Format] = Registry("format", {f.name: f for f in _FORMATS})


@dataclass(frozen=True)
class KVCacheFormat:
    preset: str
    trtllm_algo: str
    needs_gpu: bool


KV_CACHE_FORMATS: Registry[KVCacheFormat] = Registry(
    "KV-cache format",
    {
        "fp8": KVCacheFormat("FP8_KV_CFG", "FP8", needs_gpu=False),
        "nvfp4": KVCacheFormat("NVFP4_KV_CFG", "NVFP4", needs_gpu=True),
    },
)
ALGORITHMS = ("max", "mse", "smoothquant", "awq_lite", "awq_full", "awq_clip")


def _set_weight_block(cfg: dict[str, Any], block: int) -> None:
    """Set the input-dimension block size of every weight quantizer entry of ``cfg``."""
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") != "*weight_quantizer":
            continue
        attrs = entry.get("cfg")
        for attr in attrs if isinstance(attrs, list) else [attrs]:
            if (
                isinstance(attr, dict)
                and isinstance(attr.get("block_sizes"), dict)
                and -1 in attr["block_sizes"]
            ):
                attr["block_sizes"] = {**attr["block_sizes"], -1: block}


#: Stored bits per weight element before block scales (``none``: 16-bit storage).
_ELEMENT_BITS = {"fp8": 8, "fp8_pc_pt": 8, "int8_sq": 8, "int8_wo": 8, "none": 16}


def bits_per_weight(fmt: str, group_size: int | None) -> float:
    """Effective stored bits per weight of ``fmt``: element bits plus its block scales (a
    16-bit scale per int4 group, an FP8 scale per NVFP4 block of 16); per-tensor and
    per-channel scales are negligible."""
    if fmt in _ELEMENT_BITS:
        return float(_ELEMENT_BITS[fmt])
    spec = FORMATS[fmt]
    block = group_size or spec.block_size or 0
    scale_bits = 8 if fmt.startswith(("nvfp4", "w4a16_nvfp4")) else 16
    return 4.0 + (scale_bits / block if block else 0.0)


def build_config(
    fmt: str,
    *,
    algorithm: str | None = None,
    group_size: int | None = None,
    kv_cache: str = "none",
    exclude: tuple[str, ...] | list[str] = (),
) -> dict[str, Any]:
    """The ModelOpt ``mtq.quantize`` config for a simple format name and options."""
    import modelopt.torch.quantization as mtq

    spec = FORMATS[fmt]
    cfg = copy.deepcopy(getattr(mtq, spec.preset))
    if group_size is not None:
        _set_weight_block(cfg, group_size)
    if algorithm is not None:
        current = cfg.get("algorithm")
        same = isinstance(current, dict) and current.get("method") == algorithm
        cfg["algorithm"] = current if same else {"method": algorithm}
    return add_kv_and_exclusions(cfg, kv_cache, exclude)


def add_kv_and_exclusions(cfg: dict[str, Any], kv_cache: str, exclude) -> dict[str, Any]:
    import modelopt.torch.quantization as mtq

    if kv_cache != "none":
        kv = getattr(mtq, KV_CACHE_FORMATS[kv_cache].preset)["quant_cfg"]
        cfg = mtq.update_quant_cfg_with_kv_cache_quant(cfg, kv)
    # Entries apply in order and later ones win, so exclusions go last. Patterns are module
    # globs; quantizer names extend module names, hence the trailing '*'.
    for pattern in exclude:
        glob = pattern if pattern.endswith("*") else f"{pattern}*"
        cfg["quant_cfg"].append({"quantizer_name": glob, "enable": False})
    return cfg


def linear_input_dims(model_config: dict[str, Any]) -> dict[str, int]:
    """Input dimensions of a decoder's linear layers, from an HF config (Llama-style)."""
    hidden = model_config.get("hidden_size")
    heads = model_config.get("num_attention_heads")
    head_dim = model_config.get("head_dim") or (hidden // heads if hidden and heads else None)
    dims = {
        "hidden_size (q/k/v, gate/up inputs)": hidden,
        "intermediate_size (down_proj input)": model_config.get("intermediate_size"),
        "num_attention_heads x head_dim (o_proj input)": heads * head_dim
        if heads and head_dim
        else None,
    }
    return {k: v for k, v in dims.items() if isinstance(v, int)}


def check_block_size(
    fmt: str, group_size: int | None, model_config: dict[str, Any] | None
) -> list[str]:
    """Blockwise formats need the block to divide every linear input dimension."""
    spec = FORMATS[fmt]
    block = group_size or spec.block_size
    if block is None or model_config is None:
        return []
    bad = {name: dim for name, dim in linear_input_dims(model_config).items() if dim % block}
    if not bad:
        return []
    fits = [
        g
        for g in (128, 64, 32, 16)
        if all(d % g == 0 for d in linear_input_dims(model_config).values())
    ]
    what = ", ".join(f"{n} = {d}" for n, d in bad.items())
    hint = f"; set group_size to {fits[0]}" if fits and spec.group_size_choosable else ""
    return [
        f"{fmt} uses blocks of {block} along the input dimension, which do not divide the "
        f"model's {what}{hint}"
    ]


def trtllm_layout_problems(
    fmt: str, group_size: int | None, tp: int, model_config: dict[str, Any] | None
) -> list[str]:
    """AWQ layouts TensorRT-LLM 1.2 cannot load (the rule is
    :func:`optimizer.trtllm.facts.awq_layout_problems`): int4 GEMM dimensions are padded to
    multiples of max(64, g) x tp (W4A8: max(128, g) x tp); W4A8 with group 64 is not
    implemented."""
    spec = FORMATS[fmt]
    if spec.trtllm_algo is None:
        return []
    group = group_size or spec.block_size
    dims: dict[str, int | None] = {}
    if model_config is not None:
        dims.update(linear_input_dims(model_config))
        dims["intermediate_size (gate/up output)"] = model_config.get("intermediate_size")
    return [f"{fmt}: {m}" for m in facts.awq_layout_problems(spec.trtllm_algo, group, tp, dims)]
