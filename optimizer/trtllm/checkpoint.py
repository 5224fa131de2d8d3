"""TensorRT-LLM checkpoint checks and fix-ups: the validator behind ``optimize check`` and the
export/build stages, the rope fix-up. (The safetensors header reader lives in
:mod:`optimizer.safetensors_header`, shared with the unified HF checkpoint checker.)

A TensorRT-LLM checkpoint is ``config.json`` + ``rank{r}.safetensors`` for each of
``world_size = tp * pp`` ranks (rank = pp_rank * tp + tp_rank; with PP each rank file
numbers its layers from 0). Its ``quantization`` block is parsed strictly by TensorRT-LLM
(unknown keys are errors), ``quant_algo`` / ``kv_cache_quant_algo`` must be members of its
QuantAlgo enum, and loading raises on a missing required tensor (extra ones only warn).
What is accepted comes from :mod:`optimizer.trtllm.facts`; nothing is restated here.

:func:`check_checkpoint` verifies all of that for Llama-family decoders without torch: the
safetensors headers say every tensor's dtype and shape.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimizer.safetensors_header import read_safetensors_header
from optimizer.trtllm.facts import (
    DTYPES,
    FLOAT_DTYPES,
    KV_CACHE_QUANT_ALGOS,
    LINEAR_CONTRACTS,
    LINEARS,
    NORMS,
    NVFP4_BLOCK,
    QUANT_ALGOS,
    QUANTIZATION_KEYS,
    QWEN_TYPES,
    REQUIRED_CONFIG_KEYS,
    TRTLLM,
    TRTLLM_QWEN_TYPES,
    awq_group_problem,
    awq_layout_problems,
)

HINTS = {
    "unknown_key": f"{TRTLLM} parses `quantization` strictly; the checkpoint was written by a "
    "different ModelOpt/TensorRT-LLM version. Re-export with nvidia-modelopt 0.47 or remove the key.",
    "algo": f"Use a format {TRTLLM} builds (fp8, int8_sq, int4_awq, w4a8_awq, nvfp4, ...) or deploy the "
    "unified HF checkpoint with the PyTorch backend instead.",
    "rank": "Each of world_size = tp * pp ranks needs its own file; the export was interrupted or files were "
    "lost. Re-run the export stage (optimize run ... --resume redoes it).",
    "scale": "A quantized layer lacks a calibrated scale: it was not calibrated (no activations reached it) "
    "or the checkpoint was edited. Re-run ptq with calibration data and export again.",
    "tensor": "trtllm-build raises on a missing required tensor. Re-export the checkpoint.",
    "shape": "The tensor does not match the config (hidden sizes, heads, tp). Re-export with the intended "
    "tp/pp, or fix config.json to describe the weights.",
    "config": "See TensorRT-LLM's checkpoint docs: config.json needs architecture, dtype and the model dimensions.",
}


@dataclass(frozen=True)
class CheckProblem:
    message: str
    hint: str

    def __str__(self) -> str:
        return self.message


# --------------------------------------------------------------------------- rope fix-up


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
    """Add :func:`rope_settings` to an exported checkpoint's config.json (rope models)."""
    _update_config(
        checkpoint,
        lambda config: (
            rope_settings(hf_config)
            if config.get("position_embedding_type", "rope_gpt_neox").startswith("rope")
            else {}
        ),
    )


def _update_config(checkpoint: Path, changes) -> None:
    """Merge ``changes(config)`` into ``checkpoint``'s config.json (unwritten when empty)."""
    path = checkpoint / "config.json"
    config = json.loads(path.read_text())
    update = changes(config)
    if update:
        config.update(update)
        path.write_text(json.dumps(config, indent=4) + "\n")


def qwen_settings(hf_config: Any) -> dict[str, Any]:
    """What TensorRT-LLM's Qwen model reads from config.json and ModelOpt 0.47's exporter
    does not write: ``qwen_type`` (the model builds from it: q/k layernorm for qwen3, the
    MLP layout; absent, the build fails) and ``attn_bias`` (QWenConfig defaults it to True,
    right for Qwen2's biased q/k/v, wrong for Qwen3's). Empty for other families."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in QWEN_TYPES:
        return {}
    bias = True if model_type == "qwen2" else bool(getattr(hf_config, "attention_bias", False))
    return {"qwen_type": model_type, "attn_bias": bias}


def apply_family_settings(checkpoint: Path, hf_config: Any) -> None:
    """Add :func:`qwen_settings` to an exported checkpoint's config.json."""
    _update_config(checkpoint, lambda config: qwen_settings(hf_config))


# --------------------------------------------------------------------------- the check


def kind_of(path: Path) -> str:
    """'trtllm_checkpoint', 'engine', 'hf', or 'unknown' (tools tell them apart by config.json)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return "unknown"
    if not isinstance(config, dict):
        return "unknown"
    if "pretrained_config" in config and "build_config" in config:
        return "engine"
    if "architecture" in config and "dtype" in config:
        return "trtllm_checkpoint"
    if "architectures" in config or "model_type" in config:
        return "hf"
    return "unknown"


#: config.json keys that must be positive integers when present (the model's dimensions).
SIZE_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_size",
    "intermediate_size",
    "vocab_size",
)


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _config_shape_problem(config: dict) -> str | None:
    """The first value of config.json with the wrong type (a string where a number goes, a
    zero or negative size, a list where an object goes), or None. Checked before any rule
    reads the values, so a hostile file is one clear message, never a traceback."""
    for key in SIZE_KEYS:
        optional_null = config.get(key) is None and key not in REQUIRED_CONFIG_KEYS
        if key in config and not optional_null and not _is_size(config[key]):
            return f"config.json {key} must be a positive integer, not {config[key]!r}"
    for key in ("architecture", "dtype"):
        if key in config and not isinstance(config[key], str):
            return f"config.json {key} must be a string, not {config[key]!r}"
    for key in ("quantization", "mapping"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            return f"config.json {key} must be an object, not {type(config[key]).__name__}"
    mapping = config.get("mapping") or {}
    for key in ("tp_size", "pp_size", "world_size"):
        if key in mapping and not _is_size(mapping[key]):
            return f"config.json mapping.{key} must be a positive integer, not {mapping[key]!r}"
    quant = config.get("quantization") or {}
    for key in ("quant_algo", "kv_cache_quant_algo"):
        if quant.get(key) is not None and not isinstance(quant[key], str):
            return f"config.json quantization.{key} must be a string or null, not {quant[key]!r}"
    group = quant.get("group_size")
    if group is not None and not _is_size(group):
        return f"config.json quantization.group_size must be a positive integer, not {group!r}"
    excluded = quant.get("exclude_modules")
    if excluded is not None and not (
        isinstance(excluded, list) and all(isinstance(x, str) for x in excluded)
    ):
        return f"config.json quantization.exclude_modules must be a list of names, not {excluded!r}"
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if _is_size(heads) and _is_size(kv) and heads % kv:
        return (
            f"config.json num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
        )
    hidden = config.get("hidden_size")
    if _is_size(heads) and _is_size(hidden) and not config.get("head_size") and hidden % heads:
        return f"config.json hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
    return None


def check_checkpoint(checkpoint: Path) -> list[CheckProblem]:
    """Every problem that would make ``trtllm-build`` reject the checkpoint (empty if none)."""
    problems: list[CheckProblem] = []

    def bad(message: str, hint: str) -> None:
        problems.append(CheckProblem(message, HINTS[hint]))

    path = checkpoint / "config.json"
    if not path.exists():
        return [CheckProblem(f"{path} is missing", HINTS["config"])]
    if not path.is_file():
        return [CheckProblem(f"{path} is not a file", HINTS["config"])]
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return [CheckProblem(f"{path} is not valid JSON: {e}", HINTS["config"])]
    if not isinstance(config, dict):
        return [
            CheckProblem(
                f"{path} holds {type(config).__name__}, not a JSON object", HINTS["config"]
            )
        ]
    if kind_of(checkpoint) == "engine":
        return [CheckProblem("this is a built engine directory, not a checkpoint", HINTS["config"])]
    shape_problem = _config_shape_problem(config)
    if shape_problem:
        return [CheckProblem(shape_problem, HINTS["config"])]
    for key in REQUIRED_CONFIG_KEYS:
        if key not in config:
            bad(f"config.json lacks required key '{key}'", "config")
    if str(config.get("architecture", "")).lower().startswith("qwen"):
        qwen_type = config.get("qwen_type")
        if qwen_type not in TRTLLM_QWEN_TYPES:
            bad(
                f"config.json qwen_type is {qwen_type!r}, not one of "
                f"{', '.join(TRTLLM_QWEN_TYPES)}: {TRTLLM}'s Qwen model builds from it",
                "config",
            )
    if "dtype" in config and config["dtype"] not in DTYPES:
        bad(f"config.json dtype {config['dtype']!r} is not one of {', '.join(DTYPES)}", "config")

    quant = config.get("quantization") or {}
    for key in sorted(set(quant) - QUANTIZATION_KEYS):
        bad(
            f"quantization.{key} is not a key TensorRT-LLM accepts (it rejects unknown keys)",
            "unknown_key",
        )
    algo = quant.get("quant_algo")
    if algo is not None and algo not in QUANT_ALGOS:
        bad(f"quantization.quant_algo {algo!r} is not supported by TensorRT-LLM", "algo")
    kv = quant.get("kv_cache_quant_algo")
    if kv is not None and kv not in KV_CACHE_QUANT_ALGOS:
        bad(f"quantization.kv_cache_quant_algo {kv!r} is not supported by TensorRT-LLM", "algo")

    mapping = config.get("mapping") or {}
    tp, pp = mapping.get("tp_size", 1), mapping.get("pp_size", 1)
    world = mapping.get("world_size", tp * pp)
    if world != tp * pp:
        bad(f"mapping.world_size {world} is not tp_size x pp_size = {tp * pp}", "config")
        return problems
    headers: dict[int, dict[str, dict[str, Any]]] = {}
    for r in range(world):
        f = checkpoint / f"rank{r}.safetensors"
        if not f.is_file():
            bad(f"rank{r}.safetensors is missing (world_size is {world})", "rank")
            continue
        try:
            headers[r] = read_safetensors_header(f)
        except (OSError, ValueError) as e:
            bad(f"rank{r}.safetensors is unreadable: {e}", "rank")
    if problems or algo not in LINEAR_CONTRACTS and algo not in ("MIXED_PRECISION", "NO_QUANT"):
        return problems  # tensor checks only make sense on a structurally sound checkpoint

    per_layer_algo = _per_layer_algos(checkpoint, quant, problems)
    if problems:
        return problems
    groups = _per_layer_groups(checkpoint) if per_layer_algo is not None else {}
    problems += _check_tensors(config, quant, per_layer_algo, headers, tp, pp, groups)
    return problems


def _per_layer_groups(checkpoint: Path) -> dict[str, int]:
    """For MIXED_PRECISION, quant_algo -> the group size its layers declare in quant_cfg.json
    (TensorRT-LLM reads each layer's own; the top-level ``group_size`` is ModelOpt's default
    128 even when every AWQ layer uses 64). Read after :func:`_per_layer_algos` checked it."""
    layers = json.loads((checkpoint / "quant_cfg.json").read_text()).get("quantized_layers")
    groups: dict[str, int] = {}
    for entry in layers.values():
        entry = entry or {}
        if isinstance(entry.get("group_size"), int) and isinstance(entry.get("quant_algo"), str):
            algo = entry["quant_algo"]
            groups[algo] = max(groups.get(algo, 0), entry["group_size"])  # the strictest
    return groups


def _per_layer_algos(
    checkpoint: Path, quant: dict, problems: list[CheckProblem]
) -> dict[str, str | None] | None:
    """For MIXED_PRECISION, layer name -> quant_algo from quant_cfg.json."""
    if quant.get("quant_algo") != "MIXED_PRECISION":
        return None
    try:
        cfg = json.loads((checkpoint / "quant_cfg.json").read_text())
    except (OSError, ValueError) as e:
        problems.append(
            CheckProblem(
                f"quant_cfg.json is required for MIXED_PRECISION and unreadable: {e}",
                HINTS["config"],
            )
        )
        return {}
    layers = (cfg.get("quantized_layers") or {}) if isinstance(cfg, dict) else None
    if not isinstance(layers, dict) or not all(
        isinstance(e, dict) or e is None for e in layers.values()
    ):
        problems.append(
            CheckProblem(
                "quant_cfg.json needs quantized_layers: an object of layer name -> "
                "{quant_algo: ...}",
                HINTS["config"],
            )
        )
        return {}
    out = {}
    for name, entry in layers.items():
        layer_algo = (entry or {}).get("quant_algo")
        if layer_algo is not None and not isinstance(layer_algo, str):
            layer_algo = repr(layer_algo)
        if layer_algo not in LINEAR_CONTRACTS:
            problems.append(
                CheckProblem(
                    f"quant_cfg.json: layer {name} has quant_algo {layer_algo!r}, which "
                    "TensorRT-LLM cannot build per layer",
                    HINTS["algo"],
                )
            )
        out[name] = layer_algo
    return out


def _layer_shapes(config: dict, tp: int) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear of one layer on one tensor-parallel rank."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head = config.get("head_size") or hidden // heads
    inter = config.get("intermediate_size") or 4 * hidden
    kv_per_rank = -(-kv // tp)  # TensorRT-LLM holds whole KV heads: ceil(KV / tp) per rank
    return {
        "attention.qkv": ((heads // tp + 2 * kv_per_rank) * head, hidden),
        "attention.dense": (hidden, heads * head // tp),
        "mlp.fc": (inter // tp, hidden),
        "mlp.gate": (inter // tp, hidden),
        "mlp.proj": (hidden, inter // tp),
    }


def _check_tensors(
    config, quant, per_layer_algo, headers, tp, pp, groups: dict[str, int]
) -> list[CheckProblem]:
    problems: list[CheckProblem] = []
    if not headers or any(
        k not in config for k in ("hidden_size", "num_attention_heads", "num_hidden_layers")
    ):
        return problems
    shapes = _layer_shapes(config, tp)
    excluded = quant.get("exclude_modules") or []
    group = quant.get("group_size")
    algos = set((per_layer_algo or {}).values()) | {quant.get("quant_algo")}
    head = config.get("head_size") or config["hidden_size"] // config["num_attention_heads"]
    gemm_dims = {
        "hidden_size": config["hidden_size"],
        "intermediate_size": config.get("intermediate_size"),
        "num_attention_heads x head_size": config["num_attention_heads"] * head,
    }
    for algo in sorted(a for a in algos if isinstance(a, str)):
        algo_group = groups.get(algo, group)
        for message in awq_layout_problems(algo, algo_group, tp, gemm_dims):
            group_problem = message == awq_group_problem(algo, algo_group)
            problems.append(CheckProblem(message, HINTS["algo" if group_problem else "shape"]))
    layers_seen = 0
    for r, tensors in sorted(headers.items()):
        pp_rank, tp_rank = divmod(r, tp)
        where = f"rank{r}"
        local = sorted(
            {
                int(m.group(1))
                for k in tensors
                if (m := re.match(r"transformer\.layers\.(\d+)\.", k))
            }
        )
        if local != list(range(len(local))):
            problems.append(
                CheckProblem(
                    f"{where}: layer indices {local} are not contiguous from 0", HINTS["tensor"]
                )
            )
            continue
        offset = layers_seen
        if tp_rank == tp - 1:
            layers_seen += len(local)
        required = []
        if pp_rank == 0:
            required.append("transformer.vocab_embedding.weight")
        if pp_rank == pp - 1:
            required.append("transformer.ln_f.weight")
            if not config.get("share_embedding_table"):
                required.append("lm_head.weight")
        for name in required:
            if name not in tensors:
                problems.append(
                    CheckProblem(f"{where}: required tensor {name} is missing", HINTS["tensor"])
                )
        for i in local:
            prefix = f"transformer.layers.{i}"
            global_prefix = f"transformer.layers.{offset + i}"
            for norm in NORMS:
                if f"{prefix}.{norm}.weight" not in tensors:
                    problems.append(
                        CheckProblem(
                            f"{where}: required tensor {prefix}.{norm}.weight is missing",
                            HINTS["tensor"],
                        )
                    )
            for linear in LINEARS:
                layer_name = f"{global_prefix}.{linear}"
                if per_layer_algo is not None:
                    algo = per_layer_algo.get(layer_name)
                elif any(fnmatch.fnmatchcase(layer_name, p) for p in excluded):
                    algo = None
                else:
                    algo = quant.get("quant_algo")
                    algo = None if algo == "NO_QUANT" else algo
                problems += _check_linear(
                    where,
                    f"{prefix}.{linear}",
                    tensors,
                    LINEAR_CONTRACTS.get(algo),
                    algo,
                    shapes[linear],
                    groups.get(algo, group) if isinstance(algo, str) else group,
                )
            kv = quant.get("kv_cache_quant_algo")
            if kv is not None and f"{prefix}.attention.kv_cache_scaling_factor" not in tensors:
                problems.append(
                    CheckProblem(
                        f"{where}: {prefix}.attention.kv_cache_scaling_factor is missing ({kv} KV cache)",
                        HINTS["scale"],
                    )
                )
    layers = config["num_hidden_layers"]
    if layers_seen != layers and not problems:
        problems.append(
            CheckProblem(
                f"the rank files hold {layers_seen} layers, config.json says {layers}",
                HINTS["shape"],
            )
        )
    return problems


def _check_linear(where, name, tensors, contract, algo, out_in, group) -> list[CheckProblem]:
    if contract is None:
        return []
    problems = []
    weight = tensors.get(f"{name}.weight")
    if weight is None:
        return [CheckProblem(f"{where}: required tensor {name}.weight is missing", HINTS["tensor"])]
    label = algo or "unquantized"
    if algo == "W8A16" and weight["dtype"] in FLOAT_DTYPES:
        contract = LINEAR_CONTRACTS[None]  # TensorRT-LLM quantizes float weights itself
    if weight["dtype"] not in contract.weight_dtype:
        problems.append(
            CheckProblem(
                f"{where}: {name}.weight is {weight['dtype']}, expected {'/'.join(sorted(contract.weight_dtype))} "
                f"for {label}",
                HINTS["shape"],
            )
        )
    out, inp = out_in
    expected = {
        "out_in": [out, inp],
        "in_out": [inp, out],
        "int4": [out // 2, inp],
        "fp4": [out, inp // 2],
    }[contract.packing]
    if weight["shape"] != expected:
        problems.append(
            CheckProblem(
                f"{where}: {name}.weight has shape {weight['shape']}, expected {expected} "
                f"({label})",
                HINTS["shape"],
            )
        )
    block = NVFP4_BLOCK if contract.packing == "fp4" else group
    for suffix, kind in contract.tensors.items():
        t = tensors.get(f"{name}.{suffix}")
        if t is None:
            problems.append(
                CheckProblem(
                    f"{where}: {name}.{suffix} is missing on a {label} layer",
                    HINTS["scale" if "scaling" in suffix or "scale" in suffix else "tensor"],
                )
            )
            continue
        numel = 1
        for d in t["shape"]:
            numel *= d
        want = {
            "scalar": None,
            "out": [out],
            "in": [inp],
            "block": [out, inp // block] if block else None,
        }[kind]
        if kind == "scalar" and numel != 1:
            problems.append(
                CheckProblem(
                    f"{where}: {name}.{suffix} should be a single value, has shape {t['shape']}",
                    HINTS["shape"],
                )
            )
        elif want is not None and t["shape"] != want:
            problems.append(
                CheckProblem(
                    f"{where}: {name}.{suffix} has shape {t['shape']}, expected {want}",
                    HINTS["shape"],
                )
            )
        if (
            kind == "block"
            and contract.block_scale_dtype
            and t["dtype"] != contract.block_scale_dtype
        ):
            problems.append(
                CheckProblem(
                    f"{where}: {name}.{suffix} is {t['dtype']}, expected "
                    f"{contract.block_scale_dtype}",
                    HINTS["shape"],
                )
            )
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
