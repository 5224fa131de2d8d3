"""``optimize check`` for Hugging Face checkpoints: a ModelOpt unified HF checkpoint (what
``export_hf_checkpoint`` of nvidia-modelopt 0.47 writes and TensorRT-LLM >= 1.3's PyTorch
backend, vLLM and SGLang load), or a plain unquantized one (structure only).

Runtimes load such a checkpoint by trusting its files: TensorRT-LLM reads
``hf_quant_config.json``, vLLM and SGLang read ``config.json["quantization_config"]``; a
missing scale is a load error in one and garbage output in another, an extra tensor is often
ignored silently. So this module checks, without torch and reading only safetensors headers:

- the two quantization configs exist where needed, agree, and use algorithms ModelOpt writes
  (with ``group_size`` where the format needs one and ``exclude_modules`` naming real modules);
- every linear layer's tensors (weight packing, scales, dtypes, shapes) against
  :data:`LINEAR_RULES`, the one table of what ModelOpt 0.47 writes per algorithm (read from
  ``modelopt/torch/export/{unified_export_hf,quant_utils,convert_hf_config}.py`` and checked
  against real exports in tests/test_unified_check.py);
- KV-cache scales exactly when ``kv_cache_quant_algo`` is set, unquantized tensors in the
  checkpoint dtype, tied embeddings, every tensor of the architecture present and no other
  (for decoders in :data:`DECODERS`), and the shard index against the files.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimizer.safetensors_header import read_safetensors_header, tensor_nbytes
from optimizer.trtllm.checkpoint import CheckProblem

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FLOAT = frozenset({"BF16", "F16", "F32"})
F32 = frozenset({"F32"})
#: config.json ``dtype`` (transformers 5) / ``torch_dtype`` (4.x) -> safetensors dtype.
CONFIG_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}

HINTS = {
    "config": "config.json and hf_quant_config.json are written by ModelOpt's export_hf_checkpoint; "
    "re-export (the export stage's hf_checkpoint) instead of editing them.",
    "agree": "TensorRT-LLM reads hf_quant_config.json, vLLM and SGLang read config.json's "
    "quantization_config: when they disagree the runtimes serve different models. Re-export.",
    "algo": "Use a format ModelOpt 0.47 exports (fp8, int8_sq, int4_awq, w4a8_awq, nvfp4, ...); "
    "this checker knows the quant_algo values listed in optimizer/unified/check.py.",
    "scale": "A quantized layer lacks a calibrated scale: it was not calibrated (no activations "
    "reached it) or the checkpoint was edited. Re-run ptq with calibration data and export again.",
    "shape": "The tensor does not match config.json and the quantization format (dimensions, "
    "packing, group size, dtype). Re-export, or fix config.json to describe the weights.",
    "tensor": "Runtimes refuse a checkpoint with missing tensors and may silently ignore extra "
    "ones. Re-export the checkpoint.",
    "file": "The safetensors files or their index are damaged or incomplete (an interrupted export "
    "or copy). Re-export or copy the directory again.",
}


# --------------------------------------------------------------------------- THE table


@dataclass(frozen=True)
class Companion:
    """A tensor stored next to a quantized linear's ``weight`` (``<module>.<suffix>``)."""

    dtypes: frozenset[str]
    #: "scalar" (one value), "out" ([out]), "in" ([in]), "block" ([out, in / block]), "any".
    shape: str
    required: bool = True


@dataclass(frozen=True)
class LinearRule:
    """How ModelOpt 0.47's unified export stores one linear layer of a quant_algo."""

    weight_dtype: str
    #: "none": [out, in]; "out/2": two int4 along the output dim per byte, [out / 2, in]
    #: (``pack_int4_in_uint8``); "in/2": two fp4 along the input dim per byte, [out, in / 2].
    packing: str
    tensors: Mapping[str, Companion]
    #: Block size fixed by the format (NVFP4 16, MX 32); None: the config's group_size.
    block: int | None = None


_SCALAR = Companion(F32, "scalar")
_PRE_QUANT = Companion(FLOAT, "in", required=False)  # AWQ: folded into the norm before q/k/v
_NVFP4 = {
    "weight_scale": Companion(frozenset({"F8_E4M3"}), "block"),
    "weight_scale_2": _SCALAR,
    "input_scale": _SCALAR,
}
_INT4 = {"weight_scale": Companion(F32, "block"), "pre_quant_scale": _PRE_QUANT}

#: quant_algo (as hf_quant_config.json names it) -> the tensors of one linear layer.
LINEAR_RULES: Mapping[str, LinearRule] = {
    "FP8": LinearRule("F8_E4M3", "none", {"weight_scale": _SCALAR, "input_scale": _SCALAR}),
    "FP8_PER_CHANNEL_PER_TOKEN": LinearRule(
        "F8_E4M3", "none", {"weight_scale": Companion(F32, "out")}
    ),
    "W8A16": LinearRule("I8", "none", {"weight_scale": Companion(F32, "out")}),
    "W8A8_SQ_PER_CHANNEL": LinearRule(
        "I8",
        "none",
        {
            "weight_scale": Companion(F32, "out"),
            "input_scale": _SCALAR,
            "pre_quant_scale": Companion(FLOAT, "in"),
        },
    ),
    "W4A16_AWQ": LinearRule("U8", "out/2", _INT4),
    "W4A8_AWQ": LinearRule(
        "U8", "out/2", {**_INT4, "input_scale": _SCALAR, "weight_scale_2": _SCALAR}
    ),
    "NVFP4": LinearRule("U8", "in/2", _NVFP4, block=16),
    "NVFP4_AWQ": LinearRule("U8", "in/2", {**_NVFP4, "pre_quant_scale": _PRE_QUANT}, block=16),
    "NVFP4_SVD": LinearRule(
        "U8",
        "in/2",
        {
            **_NVFP4,
            "pre_quant_scale": _PRE_QUANT,
            "svdquant_lora_a": Companion(FLOAT, "any", required=False),
            "svdquant_lora_b": Companion(FLOAT, "any", required=False),
        },
        block=16,
    ),
    "W4A16_NVFP4": LinearRule(
        "U8", "in/2", {k: v for k, v in _NVFP4.items() if k != "input_scale"}, block=16
    ),
    "W4A8_NVFP4_FP8": LinearRule("U8", "in/2", _NVFP4, block=16),
    "W4A8_MXFP4_FP8": LinearRule(
        "U8",
        "in/2",
        {"weight_scale": Companion(frozenset({"U8"}), "block"), "input_scale": _SCALAR},
        block=32,
    ),
    "MXFP8": LinearRule(
        "F8_E4M3", "none", {"weight_scale": Companion(frozenset({"U8"}), "block")}, block=32
    ),
}
MIXED = "MIXED_PRECISION"
QUANT_ALGOS = frozenset(LINEAR_RULES) | {MIXED}
#: kv_cache_quant_algo -> tensors per attention layer (``_KV_CACHE_REPLACEMENTS``: amax / 448).
KV_RULES: Mapping[str, Mapping[str, Companion]] = {
    "FP8": {"k_proj.k_scale": _SCALAR, "v_proj.v_scale": _SCALAR},
    "NVFP4": {"k_proj.k_scale": _SCALAR, "v_proj.v_scale": _SCALAR},
    "NVFP4_AFFINE": {
        "k_proj.k_scale": _SCALAR,
        "v_proj.v_scale": _SCALAR,
        "k_proj.k_bias": Companion(F32, "any", required=False),
        "v_proj.v_bias": Companion(F32, "any", required=False),
    },
}
#: What config.json's kv_cache_scheme is for each kv_cache_quant_algo (convert_hf_config.py).
KV_SCHEMES = {"FP8": {"dynamic": False, "num_bits": 8, "type": "float"}}
#: Suffixes only a quantized linear stores; on an unquantized one they are a mislabelled layer.
QUANT_SUFFIXES = frozenset(s for r in LINEAR_RULES.values() for s in r.tensors)


@dataclass(frozen=True)
class Experts:
    """How a mixture-of-experts layer's tensors are named on disk (after ModelOpt's export,
    which writes transformers 5's fused experts under their per-expert hub names)."""

    #: The layer's MoE block: ``{block}.gate`` is the router, ``{block}.experts.E.*`` the experts.
    block: str
    #: (gate, up, down) projection names of one expert.
    projections: tuple[str, str, str]
    #: config key of one expert's width.
    width_key: str


@dataclass(frozen=True)
class Decoder:
    """A decoder-only architecture whose full tensor list the checker can derive."""

    #: q/k/v carry a bias: True, False, or the config key that says (Llama: attention_bias).
    qkv_bias: bool | str = "attention_bias"
    qk_norm: bool = False
    tie_default: bool = False
    #: Norms per layer besides input_layernorm and post_attention_layernorm (Gemma's pair
    #: around the feed-forward).
    extra_norms: tuple[str, ...] = ()
    #: Phi-3: q/k/v in one ``qkv_proj``, gate/up in one ``gate_up_proj``.
    fused: bool = False
    experts: Experts | None = None


_GEMMA_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")

#: Architectures (config.json ``architectures[0]``) whose tensor lists the checker derives;
#: each row is exercised by a real ModelOpt export of a tiny model (tests/test_families.py).
DECODERS: Mapping[str, Decoder] = {
    "LlamaForCausalLM": Decoder(),
    "MistralForCausalLM": Decoder(qkv_bias=False),
    "Qwen2ForCausalLM": Decoder(qkv_bias=True),
    "Qwen3ForCausalLM": Decoder(qk_norm=True),
    "Gemma2ForCausalLM": Decoder(tie_default=True, extra_norms=_GEMMA_NORMS),
    "Gemma3ForCausalLM": Decoder(qk_norm=True, tie_default=True, extra_norms=_GEMMA_NORMS),
    "Phi3ForCausalLM": Decoder(qkv_bias=False, fused=True),
    "MixtralForCausalLM": Decoder(
        qkv_bias=False,
        experts=Experts("block_sparse_moe", ("w1", "w3", "w2"), "intermediate_size"),
    ),
    "Qwen3MoeForCausalLM": Decoder(
        qk_norm=True,
        experts=Experts("mlp", ("gate_proj", "up_proj", "down_proj"), "moe_intermediate_size"),
    ),
}


# --------------------------------------------------------------------------- reading


class _Stop(Exception):
    """A problem after which nothing else can be checked."""


@dataclass
class _Check:
    directory: Path
    problems: list[CheckProblem] = field(default_factory=list)

    def bad(self, message: str, hint: str) -> None:
        self.problems.append(CheckProblem(message, HINTS[hint]))

    def json_object(self, name: str, required: bool) -> dict | None:
        path = self.directory / name
        if not path.is_file():
            if required:
                self.bad(f"{name} is missing", "config")
                raise _Stop
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            self.bad(f"{name} is not valid JSON: {e}", "config")
            raise _Stop from None
        if not isinstance(data, dict):
            self.bad(f"{name} holds {type(data).__name__}, not a JSON object", "config")
            raise _Stop
        return data


def load_headers(directory: Path, bad) -> dict[str, dict[str, Any]]:
    """Tensor name -> {dtype, shape, file} over the checkpoint's safetensors files, with the
    shard index checked against them (``bad(message, hint)`` for each problem)."""
    files = sorted(p.name for p in directory.glob("*.safetensors"))
    index_path = directory / INDEX
    weight_map: dict[str, str] | None = None
    total_size = None
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            bad(f"{INDEX} is not valid JSON: {e}", "file")
            return {}
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            bad(f"{INDEX} has no weight_map of tensor name -> file", "file")
            return {}
        metadata = index.get("metadata")
        total_size = metadata.get("total_size") if isinstance(metadata, dict) else None
        listed = sorted(set(weight_map.values()))
        for name in listed:
            if name not in files:
                bad(f"{name} is listed in {INDEX} but missing", "file")
        for name in files:
            if name not in listed:
                bad(f"{name} is not listed in {INDEX} (a stale or stray shard)", "file")
        files = [f for f in listed if f in files]
    elif not files:
        bad(f"no weights: neither {SINGLE} nor {INDEX} is present", "file")
        return {}
    elif files != [SINGLE]:
        bad(f"{len(files)} safetensors files ({', '.join(files)}) but no {INDEX}", "file")
        return {}
    headers: dict[str, dict[str, Any]] = {}
    for name in files:
        try:
            header = read_safetensors_header(directory / name)
        except (OSError, ValueError) as e:
            bad(f"{name} is unreadable: {e}", "file")
            continue
        for tensor, info in header.items():
            if tensor in headers:
                bad(f"{tensor} is stored twice ({headers[tensor]['file']} and {name})", "file")
            headers[tensor] = {**info, "file": name}
    if weight_map is not None:
        for tensor, name in sorted(weight_map.items()):
            held = headers.get(tensor)
            if held is None:
                if name in files:
                    bad(f"{INDEX} maps {tensor} to {name}, which does not hold it", "file")
            elif held["file"] != name:
                bad(f"{INDEX} maps {tensor} to {name}, but {held['file']} holds it", "file")
        for tensor, info in sorted(headers.items()):
            if tensor not in weight_map:
                bad(f"{tensor} (in {info['file']}) is not in {INDEX}'s weight_map", "file")
        stored = sum(tensor_nbytes(t["dtype"], t["shape"]) for t in headers.values())
        if isinstance(total_size, int) and total_size != stored and len(files) == len(listed):
            bad(
                f"{INDEX} metadata.total_size is {total_size}, the shards hold {stored} bytes",
                "file",
            )
    return headers


# --------------------------------------------------------------------------- the check


def check_hf_checkpoint(directory: Path) -> list[CheckProblem]:
    """Every problem a serving runtime would trip over in this HF checkpoint (empty if none)."""
    check = _Check(directory)
    with contextlib.suppress(_Stop):  # the problem that stopped it is recorded
        _check(check)
    return check.problems


def _check(c: _Check) -> None:
    config = c.json_object("config.json", required=True)
    hq_file = c.json_object("hf_quant_config.json", required=False)
    quant = _quant_settings(c, config, hq_file)
    headers = load_headers(c.directory, c.bad)
    if not headers:
        if not c.problems:
            c.bad("the safetensors files hold no tensors", "file")
        return
    if quant is None or c.problems:
        # Tensor rules only make sense under a consistent, known quantization config; a
        # broken one has been reported. A plain checkpoint gets the structure checks.
        if quant is None and not c.problems:
            _check_tensors(c, config, _Quant(), headers)
        return
    _check_tensors(c, config, quant, headers)


@dataclass
class _Quant:
    algo: str | None = None
    kv: str | None = None
    group_size: Any = None
    exclude: list[str] = field(default_factory=list)
    #: MIXED_PRECISION: module -> its entry ({quant_algo, group_size, ...}).
    layers: dict[str, dict] | None = None

    def of(self, module: str) -> tuple[str | None, Any]:
        """(quant_algo, group_size) of one module."""
        if self.layers is not None:
            entry = self.layers.get(module) or {}
            return entry.get("quant_algo"), entry.get("group_size")
        if any(fnmatch.fnmatchcase(module, p) for p in self.exclude):
            return None, None
        return self.algo, self.group_size


def _quant_settings(c: _Check, config: dict, hq_file: dict | None) -> _Quant | None:
    """The quantization both config files describe (None: a plain checkpoint); problems for
    what is missing, unknown or disagreeing."""
    qc = config.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        c.bad("config.json quantization_config is not an object", "config")
        raise _Stop
    if qc is not None and qc.get("quant_method") != "modelopt":
        c.bad(
            f"config.json quantization_config.quant_method is {qc.get('quant_method')!r}: only "
            "ModelOpt unified checkpoints (quant_method 'modelopt') are checked",
            "config",
        )
        raise _Stop
    if hq_file is None and qc is None:
        return None
    hq = (hq_file or {}).get("quantization") if hq_file is not None else None
    if hq_file is not None and not isinstance(hq, dict):
        c.bad("hf_quant_config.json has no 'quantization' object", "config")
        raise _Stop
    if hq_file is None:
        c.bad(
            "hf_quant_config.json is missing, but config.json's quantization_config says "
            f"quant_algo {qc.get('quant_algo')!r} (TensorRT-LLM reads hf_quant_config.json)",
            "config",
        )
        hq = _as_hf_quant(qc)
    algo, kv = hq.get("quant_algo"), hq.get("kv_cache_quant_algo")
    for key, value in (("quant_algo", algo), ("kv_cache_quant_algo", kv)):
        if value is not None and not isinstance(value, str):
            c.bad(f"hf_quant_config.json {key} is {value!r}, not a name or null", "config")
            raise _Stop
    if algo is None and kv is None:
        c.bad(
            "hf_quant_config.json quantizes nothing (quant_algo and kv_cache_quant_algo are null)",
            "config",
        )
    if qc is None:
        c.bad(
            f"config.json has no quantization_config, but hf_quant_config.json says quant_algo "
            f"{algo!r} (vLLM and SGLang read config.json's)",
            "agree",
        )
    else:
        _agree(c, hq, qc)
    if algo is not None and algo not in QUANT_ALGOS:
        c.bad(
            f"hf_quant_config.json quant_algo {algo!r} is not one ModelOpt 0.47 exports "
            f"({', '.join(sorted(QUANT_ALGOS))})",
            "algo",
        )
    if kv is not None and kv not in KV_RULES:
        c.bad(
            f"hf_quant_config.json kv_cache_quant_algo {kv!r} is not one ModelOpt 0.47 exports "
            f"({', '.join(sorted(KV_RULES))})",
            "algo",
        )
    exclude = hq.get("exclude_modules") or []
    if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
        c.bad("hf_quant_config.json exclude_modules is not a list of module names", "config")
        exclude = []
    quant = _Quant(algo, kv, hq.get("group_size"), exclude)
    if algo == MIXED:
        layers = hq.get("quantized_layers")
        if not isinstance(layers, dict) or not layers:
            c.bad("hf_quant_config.json: MIXED_PRECISION needs a quantized_layers object", "config")
            layers = {}
        quant.layers = {}
        for name, entry in layers.items():
            layer_algo = entry.get("quant_algo") if isinstance(entry, dict) else None
            if not isinstance(layer_algo, str) or layer_algo not in LINEAR_RULES:
                c.bad(
                    f"hf_quant_config.json quantized_layers.{name}: quant_algo {layer_algo!r} is "
                    "not one ModelOpt 0.47 exports per layer",
                    "algo",
                )
                continue
            _group_size(c, layer_algo, entry.get("group_size"), f"quantized_layers.{name}.")
            quant.layers[name] = entry
    elif algo in LINEAR_RULES:
        _group_size(c, algo, quant.group_size, "")
    return quant


def _as_hf_quant(qc: dict) -> dict:
    """hf_quant_config.json's ``quantization`` block as config.json's quantization_config
    describes it (so the remaining config checks can run when only config.json has one)."""
    scheme = qc.get("kv_cache_scheme")
    kv = next((k for k, v in KV_SCHEMES.items() if v == scheme), scheme)
    groups = qc.get("config_groups")
    sizes = set()
    for group in groups.values() if isinstance(groups, dict) else ():
        weights = group.get("weights") if isinstance(group, dict) else None
        size = weights.get("group_size") if isinstance(weights, dict) else None
        if isinstance(size, int):
            sizes.add(size)
    return {
        "quant_algo": qc.get("quant_algo"),
        "kv_cache_quant_algo": kv if isinstance(kv, str) else None,
        "exclude_modules": qc.get("ignore") or [],
        "group_size": sizes.pop() if len(sizes) == 1 else None,
        "quantized_layers": qc.get("quantized_layers"),
    }


def _agree(c: _Check, hq: dict, qc: dict) -> None:
    algo = hq.get("quant_algo")
    if qc.get("quant_algo") != algo:
        c.bad(
            f"quant_algo disagrees: hf_quant_config.json says {algo!r}, config.json's "
            f"quantization_config says {qc.get('quant_algo')!r}",
            "agree",
        )
    kv = hq.get("kv_cache_quant_algo")
    scheme = qc.get("kv_cache_scheme")
    want = KV_SCHEMES.get(kv, kv) if isinstance(kv, str) else kv
    if scheme != want:
        c.bad(
            f"KV cache disagrees: hf_quant_config.json kv_cache_quant_algo is {kv!r}, "
            f"config.json's kv_cache_scheme is {scheme!r} (expected {want!r})",
            "agree",
        )
    exclude, ignore = hq.get("exclude_modules") or [], qc.get("ignore") or []
    lists = all(
        isinstance(x, list) and all(isinstance(n, str) for n in x) for x in (exclude, ignore)
    )
    if lists and set(exclude) != set(ignore):
        c.bad(
            f"excluded modules disagree: hf_quant_config.json exclude_modules {sorted(exclude)}, "
            f"config.json's quantization_config ignore {sorted(ignore)}",
            "agree",
        )
    if algo == MIXED and qc.get("quantized_layers") != hq.get("quantized_layers"):
        c.bad(
            "quantized_layers differ between hf_quant_config.json and config.json's "
            "quantization_config",
            "agree",
        )
    if algo != MIXED and hq.get("group_size") is not None:
        groups = qc.get("config_groups")
        for name, group in (groups if isinstance(groups, dict) else {}).items():
            weights = group.get("weights") if isinstance(group, dict) else None
            size = weights.get("group_size") if isinstance(weights, dict) else None
            if size is not None and size != hq["group_size"]:
                c.bad(
                    f"group_size disagrees: hf_quant_config.json says {hq['group_size']}, "
                    f"config.json's config_groups.{name}.weights says {size}",
                    "agree",
                )


def _group_size(c: _Check, algo: str, group: Any, where: str) -> None:
    rule = LINEAR_RULES[algo]
    blockwise = any(t.shape == "block" for t in rule.tensors.values())
    if rule.block is not None:
        if group is not None and group != rule.block:
            c.bad(
                f"hf_quant_config.json {where}group_size is {group!r}; {algo} blocks are "
                f"{rule.block} wide",
                "algo",
            )
    elif blockwise and not (isinstance(group, int) and not isinstance(group, bool) and group > 0):
        c.bad(
            f"hf_quant_config.json {where}group_size is {group!r}; {algo} needs a positive integer "
            "group size",
            "config",
        )


# --------------------------------------------------------------------------- tensors


def _dims(config: dict, decoder: Decoder) -> dict[str, Any] | None:
    """The sizes the tensor list needs; None when config.json lacks them or they are not
    positive integers."""

    def size(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    optional = ("num_key_value_heads", "head_dim", "intermediate_size")
    if decoder.experts is not None:
        optional += (decoder.experts.width_key, "num_local_experts", "num_experts")
    if not all(size(config.get(k)) for k in keys) or not all(
        config.get(k) is None or size(config[k]) for k in optional
    ):
        return None
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head = config.get("head_dim") or hidden // heads
    inter = config.get("intermediate_size") or 4 * hidden
    if decoder.fused:
        attention = {"self_attn.qkv_proj": ((heads + 2 * kv) * head, hidden)}
        dense = {"mlp.gate_up_proj": (2 * inter, hidden)}
    else:
        attention = {
            "self_attn.q_proj": (heads * head, hidden),
            "self_attn.k_proj": (kv * head, hidden),
            "self_attn.v_proj": (kv * head, hidden),
        }
        dense = {"mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden)}
    attention["self_attn.o_proj"] = (hidden, heads * head)
    dense["mlp.down_proj"] = (hidden, inter)
    moe = None
    if decoder.experts is not None:
        e = decoder.experts
        n = config.get("num_local_experts") or config.get("num_experts")
        width = config.get(e.width_key)
        if not n or not width:
            return None
        gate, up, down = e.projections
        moe = {"router": (f"{e.block}.gate", n), "linears": {}}
        for i in range(n):
            x = f"{e.block}.experts.{i}"
            moe["linears"] |= {
                f"{x}.{gate}": (width, hidden),
                f"{x}.{up}": (width, hidden),
                f"{x}.{down}": (hidden, width),
            }
    return {
        "layers": config["num_hidden_layers"],
        "vocab": config["vocab_size"],
        "hidden": hidden,
        "head": head,
        "attention": attention,
        "dense": dense,
        "moe": moe,
    }


def _moe_layer(config: dict, i: int) -> bool:
    """Whether decoder layer ``i`` of an MoE config has experts (Qwen-MoE can keep some
    layers dense: ``mlp_only_layers``, ``decoder_sparse_step``)."""
    if i in (config.get("mlp_only_layers") or []):
        return False
    step = config.get("decoder_sparse_step") or 1
    return isinstance(step, int) and step > 0 and (i + 1) % step == 0


def _layout(config: dict, decoder: Decoder, dims: dict) -> tuple[dict, dict, bool]:
    """(linear module -> (out, in), float tensor -> shape, tied) for a known decoder."""
    hidden, head = dims["hidden"], dims["head"]
    qkv_bias = decoder.qkv_bias
    if isinstance(qkv_bias, str):
        qkv_bias = bool(config.get(qkv_bias, False))
    mlp_bias = bool(config.get("mlp_bias", False))
    o_bias = bool(config.get("attention_bias", False)) and decoder.qkv_bias == "attention_bias"
    tied = bool(config.get("tie_word_embeddings", decoder.tie_default))
    linears: dict[str, tuple[int, int]] = {}
    floats: dict[str, list[int]] = {
        "model.embed_tokens.weight": [dims["vocab"], hidden],
        "model.norm.weight": [hidden],
    }
    if not tied:
        linears["lm_head"] = (dims["vocab"], hidden)
    qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.qkv_proj")
    for i in range(dims["layers"]):
        p = f"model.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm", *decoder.extra_norms):
            floats[f"{p}.{norm}.weight"] = [hidden]
        if decoder.qk_norm:
            floats[f"{p}.self_attn.q_norm.weight"] = [head]
            floats[f"{p}.self_attn.k_norm.weight"] = [head]
        moe = dims["moe"] if dims["moe"] is not None and _moe_layer(config, i) else None
        layer = dims["attention"] | (moe["linears"] if moe else dims["dense"])
        if moe:
            router, n = moe["router"]
            floats[f"{p}.{router}.weight"] = [n, hidden]  # kept in high precision
        for name, (out, inp) in layer.items():
            linears[f"{p}.{name}"] = (out, inp)
            has_bias = (
                (qkv_bias and name in qkv)
                or (o_bias and name == "self_attn.o_proj")
                or (mlp_bias and name.startswith("mlp.") and not moe)
            )
            if has_bias:
                floats[f"{p}.{name}.bias"] = [out]
    return linears, floats, tied


def _check_tensors(c: _Check, config: dict, quant: _Quant, headers: dict) -> None:
    declared = config.get("dtype") or config.get("torch_dtype")
    storage = CONFIG_DTYPES.get(declared) if isinstance(declared, str) else None
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    decoder = DECODERS.get(arch)
    dims = _dims(config, decoder) if decoder else None
    if decoder and dims is None:
        c.bad(
            "config.json lacks a positive integer hidden_size, num_hidden_layers, "
            "num_attention_heads or vocab_size, or has a non-integer num_key_value_heads, "
            "head_dim or intermediate_size"
            + (
                f", or lacks the experts' count (num_local_experts / num_experts) or width "
                f"({decoder.experts.width_key})"
                if decoder.experts
                else ""
            )
            + f" ({arch} needs them)",
            "config",
        )
        return
    if dims is None:
        _check_generic(c, quant, headers, storage)
        return
    linears, floats, tied = _layout(config, decoder, dims)
    modules = set(linears) | {n.rsplit(".", 1)[0] for n in floats} | {"lm_head"}
    _check_module_names(c, quant, modules)
    layers = dims["layers"]
    stored_layers = {int(m.group(1)) for n in headers if (m := _LAYER.match(n))}
    absent = [i for i in range(layers) if i not in stored_layers]
    for i in absent:
        c.bad(
            f"layer {i} is missing: none of its tensors is stored (config.json says "
            f"num_hidden_layers {layers})",
            "tensor",
        )

    def present(name: str) -> bool:
        m = _LAYER.match(name)
        return not (m and int(m.group(1)) in absent)

    expected: set[str] = set()
    for name, shape in floats.items():
        expected.add(name)
        if name in headers:
            _check_float(c, name, headers[name], shape, storage)
    for module, out_in in linears.items():
        algo, group = quant.of(module)
        if present(module):
            expected |= _check_linear(c, module, headers, algo, group, out_in, storage)
    if quant.kv is not None and quant.kv in KV_RULES:
        for i in set(range(layers)) - set(absent):
            for suffix, rule in KV_RULES[quant.kv].items():
                name = f"model.layers.{i}.self_attn.{suffix}"
                expected.add(name)
                _check_companion(
                    c, name, headers.get(name), rule, (0, 0), None, f"({quant.kv} KV cache)"
                )
    expected = {n for n in expected if present(n)}
    _missing_and_stray(c, headers, expected, layers, tied, arch)


def _check_module_names(c: _Check, quant: _Quant, modules: set[str]) -> None:
    for pattern in quant.exclude:
        if not any(fnmatch.fnmatchcase(m, pattern) for m in modules):
            c.bad(f"exclude_modules entry {pattern!r} names no module of the model", "config")
    for name in sorted(quant.layers or {}):
        if name not in modules:
            c.bad(f"quantized_layers names {name}, which is not a module of the model", "config")


def _check_float(c: _Check, name: str, t: dict, shape: list[int] | None, storage) -> None:
    if shape is not None and t["shape"] != shape:
        c.bad(f"{name} has shape {t['shape']}, expected {shape}", "shape")
    want = {storage} if storage else FLOAT
    if t["dtype"] not in want:
        c.bad(
            f"{name} is {t['dtype']}, expected {'/'.join(sorted(want))} (unquantized, stored in "
            "the checkpoint dtype)",
            "shape",
        )


def _check_linear(c, module, headers, algo, group, out_in, storage) -> set[str]:
    """Check one linear layer; the tensor names it should have."""
    weight = f"{module}.weight"
    names = {weight}
    if algo is None:
        if weight in headers:
            _check_float(c, weight, headers[weight], list(out_in), storage)
        for suffix in sorted(QUANT_SUFFIXES):
            if f"{module}.{suffix}" in headers:
                c.bad(
                    f"{module}.{suffix} is stored, but {module} is not quantized (excluded or "
                    "absent from the quantization config)",
                    "tensor",
                )
                names.add(f"{module}.{suffix}")
        return names
    rule = LINEAR_RULES.get(algo)
    if rule is None:
        return names
    names |= {f"{module}.{s}" for s in rule.tensors}
    out, inp = out_in
    t = headers.get(weight)
    if t is not None:
        if t["dtype"] != rule.weight_dtype:
            c.bad(f"{weight} is {t['dtype']}, expected {rule.weight_dtype} for {algo}", "shape")
        want = {"none": [out, inp], "out/2": [out // 2, inp], "in/2": [out, inp // 2]}
        if t["shape"] != want[rule.packing]:
            c.bad(
                f"{weight} has shape {t['shape']}, expected {want[rule.packing]} ({algo}, "
                f"{out}x{inp} packed '{rule.packing}')",
                "shape",
            )
    block = rule.block or (group if isinstance(group, int) and group > 0 else None)
    if block and any(r.shape == "block" for r in rule.tensors.values()) and inp % block:
        c.bad(
            f"{module}: {inp} input features are not a multiple of the {algo} block {block}",
            "shape",
        )
    for suffix, companion in rule.tensors.items():
        name = f"{module}.{suffix}"
        _check_companion(c, name, headers.get(name), companion, out_in, block, f"on a {algo} layer")
    return names


def _check_companion(c, name, t, rule: Companion, out_in, block, where: str) -> None:
    if t is None:
        if rule.required:
            c.bad(f"{name} is missing {where}", "scale" if "scale" in name else "tensor")
        return
    if t["dtype"] not in rule.dtypes:
        c.bad(f"{name} is {t['dtype']}, expected {'/'.join(sorted(rule.dtypes))}", "shape")
    out, inp = out_in
    numel = 1
    for d in t["shape"]:
        numel *= d
    if rule.shape == "scalar":
        if numel != 1:
            c.bad(f"{name} should be a single value, has shape {t['shape']}", "shape")
        return
    want = {
        "out": [out],
        "in": [inp],
        "block": [out, inp // block] if block else None,
    }.get(rule.shape)
    if want is not None and t["shape"] != want:
        c.bad(f"{name} has shape {t['shape']}, expected {want}", "shape")


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _missing_and_stray(c, headers, expected, layers, tied, arch) -> None:
    companions = QUANT_SUFFIXES | {"k_scale", "v_scale", "k_bias", "v_bias"}
    for name in sorted(expected - set(headers)):
        if name.rpartition(".")[2] not in companions:  # those the layer's own check reports
            c.bad(f"required tensor {name} is missing", "tensor")
    stray_layers: dict[int, int] = {}
    for name in sorted(set(headers) - expected):
        m = _LAYER.match(name)
        if m and int(m.group(1)) >= layers:
            stray_layers[int(m.group(1))] = stray_layers.get(int(m.group(1)), 0) + 1
        elif name == "lm_head.weight" and tied:
            c.bad(
                "lm_head.weight is stored, but config.json says tie_word_embeddings (the "
                "runtime uses the embedding and ignores it)",
                "tensor",
            )
        elif name.endswith((".k_scale", ".v_scale")):
            c.bad(f"{name} is stored, but kv_cache_quant_algo is not set", "tensor")
        else:
            c.bad(f"unexpected tensor {name} (not part of {arch})", "tensor")
    for layer, n in sorted(stray_layers.items()):
        c.bad(
            f"{n} tensors of layer {layer} are stored, but config.json says "
            f"num_hidden_layers {layers}",
            "tensor",
        )


def _check_generic(c: _Check, quant: _Quant, headers: dict, storage) -> None:
    """An architecture not in DECODERS: each quantized layer against its own weight's shape
    (completeness cannot be checked without the architecture's tensor list)."""
    modules = {n.rsplit(".", 1)[0] for n in headers} | {"lm_head"}
    _check_module_names(c, quant, modules)
    for name in sorted(headers):
        if not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        t = headers[name]
        stored_quantized = f"{module}.weight_scale" in headers or t["dtype"] not in FLOAT
        algo, group = quant.of(module)
        if not stored_quantized:
            continue
        if algo is None or algo not in LINEAR_RULES:
            c.bad(
                f"{module} is stored quantized ({t['dtype']} weight), but the quantization "
                "config leaves it unquantized",
                "tensor",
            )
            continue
        rule = LINEAR_RULES[algo]
        if len(t["shape"]) != 2:
            continue
        a, b = t["shape"]
        out_in = {"none": (a, b), "out/2": (2 * a, b), "in/2": (a, 2 * b)}[rule.packing]
        _check_linear(c, module, headers, algo, group, out_in, storage)
    kv_stored = any(n.endswith((".k_scale", ".v_scale")) for n in headers)
    if quant.kv is not None and not kv_stored:
        c.bad(f"no k_scale / v_scale tensors, but kv_cache_quant_algo is {quant.kv}", "scale")
    if quant.kv is None and kv_stored:
        c.bad("k_scale / v_scale tensors are stored, but kv_cache_quant_algo is not set", "tensor")


# --------------------------------------------------------------------------- summary


def summarize(directory: Path) -> dict[str, Any]:
    """What the ok line says about a checked checkpoint."""
    config = json.loads((directory / "config.json").read_text())
    hq = {}
    if (directory / "hf_quant_config.json").is_file():
        hq = json.loads((directory / "hf_quant_config.json").read_text()).get("quantization", {})
    headers = load_headers(directory, lambda *_: None)
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else None
    arch = arch if isinstance(arch, str) else "unknown architecture"
    return {
        "architecture": arch,
        "quant_algo": hq.get("quant_algo"),
        "kv_cache_quant_algo": hq.get("kv_cache_quant_algo"),
        "tensors": len(headers),
        "files": len({t["file"] for t in headers.values()}),
        "bytes": sum(tensor_nbytes(t["dtype"], t["shape"]) for t in headers.values()),
        "layout_known": arch in DECODERS,
    }
