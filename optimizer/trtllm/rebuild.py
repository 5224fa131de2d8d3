"""Rebuild the Hugging Face model a TensorRT-LLM checkpoint of a Llama-family model describes,
from its files alone (``config.json`` + ``rank0.safetensors``, as ModelOpt's
``export_tensorrt_llm_checkpoint`` writes them).

The gate must score what ships. When a recipe exports only a TensorRT-LLM checkpoint, what
ships is that directory, and no library turns it back into a model that runs here:
TensorRT-LLM cannot be installed on these machines (and its engine path is gone upstream),
transformers does not read the format, and ModelOpt only writes it. So this module reads it
as TensorRT-LLM's Llama model would:

- the architecture from the checkpoint's own ``config.json`` (hidden size, heads, KV heads,
  head size, intermediate size, layers, vocabulary, ``rotary_base`` — TensorRT-LLM's default
  10000 when it is missing, as the runtime assumes — ``rotary_scaling``, ``norm_epsilon``,
  ``share_embedding_table``);
- TensorRT-LLM's tensor names mapped back to the HF Llama modules: the fused
  ``attention.qkv`` split row-wise into q/k/v (``H*head``, ``KV*head``, ``KV*head`` rows; two
  rows per byte for packed INT4), ``attention.dense`` -> o_proj, ``mlp.fc`` -> gate_proj and
  ``mlp.gate`` -> up_proj (ModelOpt's ``build_mlp_config``: ``gate_proj`` is an "fc" keyword,
  ``up_proj`` a "gate" one; it fuses them only for MoE shared experts, refused here),
  ``mlp.proj`` -> down_proj, ``post_layernorm`` -> post_attention_layernorm;
- the scale tensors renamed into the unified HF checkpoint's names (``weights_scaling_factor``
  -> ``weight_scale``, ``weights_scaling_factor_2`` -> ``weight_scale_2``,
  ``activation_scaling_factor`` -> ``input_scale``, ``prequant_scaling_factor`` ->
  ``pre_quant_scale``, ``attention.kv_cache_scaling_factor`` -> ``k_scale`` and ``v_scale``:
  TensorRT-LLM keeps one scale for K and V, the maximum of the two). The layouts are
  ModelOpt's ``to_quantized_weight`` for both exporters (FP8 ``[out, in]`` + scalar scale;
  INT8 SmoothQuant ``[out, in]`` + per-row scale; INT4 ``[out/2, in]`` with rows 2i / 2i+1 in
  the low / high nibble, stored as int8 for TensorRT-LLM, uint8 in the unified export; NVFP4
  ``[out, in/2]`` + FP8 block scales), so the translated tensors go through the unified
  rebuild's own dequantization, activation fake-quant hooks and FP8 KV-cache quantizers
  (:func:`optimizer.unified.rebuild.assemble`).

MIXED_PRECISION (auto_quantize) is read per linear from ``quant_cfg.json``. Refused with
:class:`OptimizerError`: other architectures, quant algorithms the unified rebuild cannot run
(FP8 per channel/per token, W8A16 — ModelOpt's layout of it is not TensorRT-LLM's —, INT8 or
NVFP4 KV cache, ...), tensor or pipeline parallel shards (merging them is not written), unknown,
missing or misshapen tensors, scales on an excluded linear. A TensorRT-LLM checkpoint has no tokenizer: the caller supplies the source model's
(:func:`vocab_problem` checks it fits the checkpoint's vocabulary).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
from pathlib import Path
from typing import Any

from optimizer.errors import OptimizerError

log = logging.getLogger(__name__)

#: quant_algo of a TensorRT-LLM checkpoint this reader rebuilds (all through the unified
#: rebuild's tables, under the same name).
ALGORITHMS = ("FP8", "W8A8_SQ_PER_CHANNEL", "W4A16_AWQ", "W4A8_AWQ", "NVFP4")
KV_ALGORITHMS = (None, "FP8")
#: Architectures TensorRT-LLM runs with its Llama model (MODEL_MAP maps Mistral to it too).
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
#: TensorRT-LLM's defaults for keys a checkpoint may omit (PretrainedConfig / rope).
DEFAULT_ROTARY_BASE = 10000.0
DEFAULT_NORM_EPSILON = 1e-5

#: TensorRT-LLM linear -> HF Llama linear(s) of one decoder layer.
LINEARS = {
    "attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention.dense": ("self_attn.o_proj",),
    "mlp.fc": ("mlp.gate_proj",),
    "mlp.gate": ("mlp.up_proj",),
    "mlp.proj": ("mlp.down_proj",),
}
#: TensorRT-LLM tensor suffix of a linear -> the unified HF checkpoint's.
SUFFIXES = {
    "weight": "weight",
    "weights_scaling_factor": "weight_scale",
    "weights_scaling_factor_2": "weight_scale_2",
    "activation_scaling_factor": "input_scale",
    "prequant_scaling_factor": "pre_quant_scale",
}
NORMS = {"input_layernorm": "input_layernorm", "post_layernorm": "post_attention_layernorm"}
GLOBALS = {
    "transformer.vocab_embedding.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
}
_LAYER = re.compile(r"transformer\.layers\.(\d+)\.(.+)$")


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise OptimizerError(f"{path}/config.json is not readable JSON ({e})") from e
    if not isinstance(config, dict):
        raise OptimizerError(f"{path}/config.json is not a JSON object")
    return config


def config_problem(config: dict[str, Any]) -> str | None:
    """Why a TensorRT-LLM checkpoint with this ``config.json`` cannot be rebuilt, or None."""
    arch = config.get("architecture")
    if arch not in ARCHITECTURES:
        return (
            f"architecture {arch!r} cannot be rebuilt from a TensorRT-LLM checkpoint (supported: "
            f"{', '.join(ARCHITECTURES)})"
        )
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(config.get(key), int) or config[key] <= 0:
            return f"config.json has no positive integer {key}"
    mapping = config.get("mapping") or {}
    tp, pp = mapping.get("tp_size", 1), mapping.get("pp_size", 1)
    if tp != 1 or pp != 1 or mapping.get("world_size", 1) != 1:
        return (
            f"it is sharded (tp_size {tp}, pp_size {pp}); only single-rank checkpoints are "
            "rebuilt (export with trtllm_checkpoint: {tp: 1, pp: 1} to gate it)"
        )
    unsupported = {
        "position_embedding_type": ("rope_gpt_neox", config.get("position_embedding_type")),
        "hidden_act": ("silu", config.get("hidden_act", "silu")),
        "rotary_pct": (1.0, float(config.get("rotary_pct", 1.0))),
        "rmsnorm": (True, config.get("rmsnorm", True)),
        "bias": (False, bool(config.get("bias", False))),
        "lm_head_bias": (False, bool(config.get("lm_head_bias", False))),
        "residual_mlp": (False, bool(config.get("residual_mlp", False))),
        "moe": (None, config.get("moe")),
    }
    for key, (want, got) in unsupported.items():
        if key == "position_embedding_type" and got is None:
            continue
        if got != want:
            return f"config.json {key} is {got!r}; a Llama decoder needs {want!r}"
    quant = config.get("quantization") or {}
    algo = quant.get("quant_algo")
    if algo is not None and algo not in (*ALGORITHMS, "MIXED_PRECISION"):
        return (
            f"quant_algo {algo} cannot be rebuilt from a TensorRT-LLM checkpoint (supported: "
            f"{', '.join(ALGORITHMS)}, MIXED_PRECISION of them, or unquantized)"
        )
    kv = quant.get("kv_cache_quant_algo")
    if kv not in KV_ALGORITHMS:
        return (
            f"kv_cache_quant_algo {kv} cannot be rebuilt from a TensorRT-LLM checkpoint "
            "(supported: none, FP8)"
        )
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why the TensorRT-LLM checkpoint at ``path`` cannot be rebuilt (from config.json and the
    rank files' presence; no tensor is read), or None."""
    try:
        config = read_config(path)
    except OptimizerError as e:
        return str(e)
    problem = config_problem(config)
    if problem:
        return f"{path} is a TensorRT-LLM checkpoint that cannot be rebuilt: {problem}"
    if not (Path(path) / "rank0.safetensors").is_file():
        return f"{path} is a TensorRT-LLM checkpoint without rank0.safetensors"
    if (config.get("quantization") or {}).get("quant_algo") == "MIXED_PRECISION":
        try:
            layer_algos(path)
        except OptimizerError as e:
            return f"{path} is a TensorRT-LLM checkpoint that cannot be rebuilt: {e}"
    return None


def layer_algos(path: Path) -> dict[str, str]:
    """MIXED_PRECISION: quant_algo per TensorRT-LLM linear, from ``quant_cfg.json`` (a linear
    it does not name is unquantized)."""
    try:
        data = json.loads((Path(path) / "quant_cfg.json").read_text())
    except (OSError, ValueError) as e:
        raise OptimizerError(f"MIXED_PRECISION needs a readable quant_cfg.json ({e})") from e
    layers = data.get("quantized_layers") if isinstance(data, dict) else None
    if not isinstance(layers, dict):
        raise OptimizerError("quant_cfg.json has no quantized_layers table")
    out = {}
    for name, spec in layers.items():
        algo = spec.get("quant_algo") if isinstance(spec, dict) else None
        if algo not in ALGORITHMS:
            raise OptimizerError(
                f"quant_cfg.json: {name} has quant_algo {algo}, which cannot be rebuilt "
                f"(supported: {', '.join(ALGORITHMS)})"
            )
        out[name] = algo
    return out


def plan_problem(formats: list[str], kv_cache: str | None) -> str | None:
    """Why a TensorRT-LLM checkpoint of these simple formats (optimizer/formats.py names) and
    KV cache could not be rebuilt, or None: the plan-time twin of :func:`config_problem`."""
    from optimizer.formats import FORMATS, KV_CACHE_FORMATS

    algos = {(FORMATS[f].trtllm_algo if f in FORMATS else None) or f for f in formats}
    unknown = sorted(str(a) for a in algos if a not in ALGORITHMS)
    if unknown:
        return (
            f"quant_algo {', '.join(unknown)} cannot be rebuilt from a TensorRT-LLM checkpoint "
            f"(supported: {', '.join(ALGORITHMS)})"
        )
    kv = KV_CACHE_FORMATS[kv_cache].trtllm_algo if kv_cache and kv_cache != "none" else None
    if kv not in KV_ALGORITHMS:
        return (
            f"kv_cache_quant_algo {kv} cannot be rebuilt from a TensorRT-LLM checkpoint "
            "(supported: none, FP8)"
        )
    return None


def vocab_problem(path: Path, tokenizer) -> str | None:
    """A TensorRT-LLM checkpoint carries no tokenizer: the one it is evaluated with (the source
    model's) must have ids inside the checkpoint's embedding table, or None. A larger table is
    fine: ModelOpt pads the vocabulary to a multiple of 64 for AWQ."""
    vocab = read_config(path).get("vocab_size")
    if not isinstance(vocab, int) or len(tokenizer) > vocab:
        return (
            f"{path}: the tokenizer it is evaluated with has {len(tokenizer)} tokens, the "
            f"checkpoint's vocab_size is {vocab}: it was not exported from this model"
        )
    # Our export stage saves the pipeline's tokenizer beside the checkpoint (TensorRT-LLM
    # ignores it; trtllm-serve takes it with --tokenizer): when there, it must be the same.
    if (Path(path) / "tokenizer_config.json").is_file():
        from optimizer.models import load_tokenizer

        own = load_tokenizer(Path(path), False)
        if own.get_vocab() != tokenizer.get_vocab():
            return (
                f"{path}: the tokenizer saved with the checkpoint ({len(own)} tokens) differs "
                f"from the one it would be evaluated with ({len(tokenizer)} tokens, the source "
                "model's): it was not exported from this model"
            )
    return None


def hf_config(config: dict[str, Any]):
    """The transformers ``LlamaConfig`` of a TensorRT-LLM ``config.json``."""
    from transformers import LlamaConfig

    heads = config["num_attention_heads"]
    base = config.get("rotary_base")
    if base is None:
        log.warning("config.json has no rotary_base: TensorRT-LLM assumes %s", DEFAULT_ROTARY_BASE)
        base = DEFAULT_ROTARY_BASE
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(base)}
    scaling = config.get("rotary_scaling")
    if isinstance(scaling, dict):
        scaling = dict(scaling)
        rope["rope_type"] = scaling.pop("type", scaling.pop("rope_type", "default"))
        rope.update(scaling)
    elif scaling is not None:
        raise OptimizerError(f"config.json rotary_scaling {scaling!r} is not an object")
    out = LlamaConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config.get("intermediate_size") or 4 * config["hidden_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_size") or config["hidden_size"] // heads,
        max_position_embeddings=config.get("max_position_embeddings") or 2048,
        rms_norm_eps=float(config.get("norm_epsilon", DEFAULT_NORM_EPSILON)),
        hidden_act="silu",
        tie_word_embeddings=bool(config.get("share_embedding_table", False)),
        rope_parameters=rope,
    )
    out.architectures = ["LlamaForCausalLM"]
    return out


def _load_rank0(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    file = Path(path) / "rank0.safetensors"
    try:
        return load_file(str(file))
    except Exception as e:  # a missing or corrupt file: the user's to fix
        raise OptimizerError(f"{file} is not a readable safetensors file ({e})") from e


def _split_rows(tensor, sizes: tuple[int, ...], name: str) -> tuple[Any, ...]:
    """``tensor`` split along its rows in proportion to ``sizes`` (packed INT4 holds two rows
    per byte row, so its row count is half the sum)."""
    total = sum(sizes)
    rows = tensor.shape[0]
    if rows == total:
        parts = sizes
    elif rows * 2 == total and all(s % 2 == 0 for s in sizes):
        parts = tuple(s // 2 for s in sizes)
    else:
        raise OptimizerError(
            f"{name} has {rows} rows; q/k/v of this config need {total} ({'+'.join(map(str, sizes))})"
        )
    return tuple(tensor.split(list(parts), dim=0))


def translate(config: dict[str, Any], tensors: dict[str, Any], path: Path):
    """(scheme, tensors under the unified HF checkpoint's names) of a TensorRT-LLM checkpoint's
    config and rank-0 tensors."""
    import torch

    from optimizer.unified.rebuild import QuantScheme

    quant = config.get("quantization") or {}
    algo = quant.get("quant_algo")
    mixed = layer_algos(path) if algo == "MIXED_PRECISION" else None
    per_layer: dict[str, str] = {}
    exclude = quant.get("exclude_modules") or []
    if not isinstance(exclude, list) or not all(isinstance(x, str) for x in exclude):
        raise OptimizerError(f"{path}: quantization.exclude_modules is not a list of names")
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head = config.get("head_size") or config["hidden_size"] // heads
    qkv_rows = (heads * head, kv_heads * head, kv_heads * head)

    out: dict[str, Any] = {}
    excluded_hf: list[str] = []
    linears: dict[str, dict[str, Any]] = {}  # trtllm linear -> {suffix: tensor}
    kv_scale: dict[str, Any] = {}
    for key, value in tensors.items():
        if key in GLOBALS:
            out[GLOBALS[key]] = value
            continue
        if key.startswith("lm_head."):
            linears.setdefault("lm_head", {})[key.removeprefix("lm_head.")] = value
            continue
        m = _LAYER.match(key)
        if m is None:
            raise OptimizerError(
                f"{path}: {key} is not a tensor of a Llama TensorRT-LLM checkpoint"
            )
        layer, rest = int(m.group(1)), m.group(2)
        norm = rest.removesuffix(".weight")
        if norm in NORMS and rest.endswith(".weight"):
            out[f"model.layers.{layer}.{NORMS[norm]}.weight"] = value
        elif rest == "attention.kv_cache_scaling_factor":
            kv_scale[f"model.layers.{layer}.self_attn"] = value
        elif rest in ("attention.k_cache_scaling_factor", "attention.v_cache_scaling_factor"):
            pass  # TensorRT-LLM reads the one kv_cache_scaling_factor (their maximum)
        else:
            linear, _, suffix = rest.rpartition(".")
            if linear not in LINEARS or suffix not in SUFFIXES:
                raise OptimizerError(
                    f"{path}: {key} is not a tensor of a Llama TensorRT-LLM checkpoint"
                )
            linears.setdefault(f"transformer.layers.{layer}.{linear}", {})[suffix] = value

    for name, parts in sorted(linears.items()):
        if "weight" not in parts:
            raise OptimizerError(f"{path}: {name}.weight is missing")
        if name == "lm_head":
            targets = ("lm_head",)
        else:
            layer, linear = re.match(r"transformer\.layers\.(\d+)\.(.+)$", name).groups()
            targets = tuple(f"model.layers.{layer}.{t}" for t in LINEARS[linear])
        quantized = "weights_scaling_factor" in parts
        if mixed is not None:  # quant_cfg.json names every quantized linear
            layer_algo = mixed.get(name)
            excluded = layer_algo is None
        else:
            layer_algo = algo
            excluded = any(fnmatch.fnmatchcase(name, p) for p in exclude)
        if quantized and (layer_algo is None or excluded):
            raise OptimizerError(
                f"{path}: {name} carries quantization scales but the config "
                + ("excludes it" if excluded and algo is not None else "has no quant_algo")
            )
        if mixed is not None and not quantized and layer_algo is not None:
            raise OptimizerError(
                f"{path}: quant_cfg.json says {name} is {layer_algo}, yet it has no "
                "weights_scaling_factor"
            )
        if quantized and mixed is not None:
            per_layer.update(dict.fromkeys(targets, layer_algo))
        if not quantized:
            stray = sorted(set(parts) - {"weight"})
            if stray:
                raise OptimizerError(f"{path}: {name}.{stray[0]} without weights_scaling_factor")
            if excluded or algo is None:
                excluded_hf.extend(targets)
        for suffix, value in parts.items():
            if (
                value.dtype == torch.int8
                and suffix == "weight"
                and layer_algo in ("W4A16_AWQ", "W4A8_AWQ")
            ):
                # ModelOpt stores packed INT4 as int8 for TensorRT-LLM, uint8 in the unified export.
                value = value.view(torch.uint8)
            if value.numel() == 1 and suffix != "weight":
                value = value.reshape(())
            if len(targets) == 1:
                out[f"{targets[0]}.{SUFFIXES[suffix]}"] = value
                continue
            if value.ndim == 0 or suffix == "prequant_scaling_factor":
                split = (value,) * 3  # one input scale for the fused q/k/v input
            else:
                split = _split_rows(value, qkv_rows, f"{path}: {name}.{suffix}")
            for target, piece in zip(targets, split, strict=True):
                out[f"{target}.{SUFFIXES[suffix]}"] = piece.contiguous()

    if "lm_head" not in linears:
        excluded_hf.append("lm_head")  # shared with the (unquantized) embedding table
    kv_algo = quant.get("kv_cache_quant_algo")
    if kv_algo is not None and len(kv_scale) != config["num_hidden_layers"]:
        raise OptimizerError(
            f"{path}: kv_cache_quant_algo {kv_algo} but {config['num_hidden_layers'] - len(kv_scale)} "
            "layers lack attention.kv_cache_scaling_factor"
        )
    if kv_algo is None and kv_scale:
        raise OptimizerError(
            f"{path}: kv_cache_scaling_factor tensors without a kv_cache_quant_algo"
        )
    for attention, scale in kv_scale.items():
        out[f"{attention}.k_proj.k_scale"] = scale.reshape(())
        out[f"{attention}.v_proj.v_scale"] = scale.reshape(())

    group = quant.get("group_size")
    scheme = (
        None
        if algo is None
        else QuantScheme(
            algo,
            kv_algo,
            per_layer,
            tuple(excluded_hf),
            group if isinstance(group, int) and group > 0 else None,
        )
    )
    return scheme, out


def rebuild(path: Path | str, dtype: str, device: str | None = None, tokenizer=None):
    """The model in the TensorRT-LLM checkpoint ``path`` computing in ``dtype`` on ``device``
    (default: CUDA when available), as :class:`optimizer.unified.rebuild.Rebuilt`.
    ``tokenizer``, when given, is checked against the checkpoint's vocabulary."""
    from optimizer.unified.rebuild import assemble

    path = Path(path)
    problem = checkpoint_problem(path)
    if problem:
        raise OptimizerError(problem)
    if tokenizer is not None:
        problem = vocab_problem(path, tokenizer)
        if problem:
            raise OptimizerError(problem)
    # What TensorRT-LLM would refuse to load (from the safetensors headers: missing tensors,
    # shapes, dtypes, scales) does not ship, so it is not evaluated either.
    from optimizer.trtllm.checkpoint import check_checkpoint

    problems = check_checkpoint(path)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise OptimizerError(f"{path}: TensorRT-LLM would reject it: {problems[0]}{more}")
    config = read_config(path)
    scheme, tensors = translate(config, _load_rank0(path), path)
    rebuilt = assemble(path, hf_config(config), scheme, tensors, dtype, device)
    log.info("rebuilt from the TensorRT-LLM checkpoint %s (%s)", path, rebuilt.quant_algo)
    return rebuilt
