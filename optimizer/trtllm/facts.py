"""THE table of TensorRT-LLM facts this project relies on (TensorRT-LLM 1.2, engine path).

Every reader uses this module and keeps no copy of its own: the checkpoint validator
(:mod:`optimizer.trtllm.checkpoint`), :func:`optimizer.formats.trtllm_layout_problems`, the
``build`` stage (versions, default image, the rules in ``check()``) and the ``trtllm-build``
test double (``tests/doubles/trtllm-build``), which loads this file by path.

So this module is **stdlib-only** (no torch, no pydantic, not even the rest of ``optimizer``)
and must stay importable by a bare ``python3``: declarative data (frozen dataclasses and
constants) plus small pure rule functions over plain values. Sources: TensorRT-LLM 1.2's
QuantAlgo enum, QuantConfig, builder and attention-plugin checks, and
``../shared/notes/tensorrt-llm.md``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

# --------------------------------------------------------------------------- versions

#: The TensorRT-LLM version whose checkpoint contract and rules this table describes.
CONTRACT_VERSION = "1.2"
TRTLLM = f"TensorRT-LLM {CONTRACT_VERSION}"  # as messages name it
#: trtllm-build engines: 1.0 (the first whose checkpoints ModelOpt 0.47 writes) to 1.2. The
#: TensorRT backend was deprecated in the 1.3 release candidates, removed after 1.3.0rc20.
ENGINE_VERSION_MIN = (1, 0)
ENGINE_VERSION_MAX = (1, 2)
ENGINE_PATH_LAST_RELEASE = "1.3.0rc20"
DEFAULT_IMAGE_VERSION = "1.2.0"
DEFAULT_IMAGE = f"nvcr.io/nvidia/tensorrt-llm/release:{DEFAULT_IMAGE_VERSION}"


def parse_version(version: str) -> tuple[int, int] | None:
    """(major, minor) of a TensorRT-LLM version string ("1.2.0", "1.3.0rc20"), or None."""
    m = re.match(r"\s*v?(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def engine_version_problem(version: str) -> str | None:
    """Why TensorRT-LLM ``version`` cannot build engines from our checkpoints, or None."""
    major_minor = parse_version(version)
    lo = ".".join(map(str, ENGINE_VERSION_MIN))
    hi = ".".join(map(str, ENGINE_VERSION_MAX))
    if major_minor is None:
        return (
            f"TensorRT-LLM reported version {version!r}, which is not a version number; "
            f"engines need TensorRT-LLM {lo} to {hi}"
        )
    if major_minor > ENGINE_VERSION_MAX:
        return (
            f"TensorRT-LLM {version} has no trtllm-build engine path (removed after {hi}); "
            "serve the unified HF checkpoint with the PyTorch backend (deploy/), or use a "
            f"{hi} image such as {DEFAULT_IMAGE} (engines are supported from {lo} to {hi}; "
            f"the 1.3 release candidates up to {ENGINE_PATH_LAST_RELEASE} deprecate them and "
            "are not supported here)"
        )
    if major_minor < ENGINE_VERSION_MIN:
        return (
            f"TensorRT-LLM {version} predates the checkpoints ModelOpt 0.47 writes; use "
            f"{lo} to {hi}"
        )
    return None


# --------------------------------------------------------------------------- checkpoint schema

#: config.json keys trtllm-build needs (a missing one is a KeyError there).
REQUIRED_CONFIG_KEYS = (
    "architecture",
    "dtype",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
)
#: config.json ``dtype`` values.
DTYPES = ("float16", "bfloat16", "float32")
#: ``qwen_type`` values of the dense Qwen decoders (QWenConfig reads it from config.json and
#: QWenDecoderLayer builds from it: models/qwen/config.py, model.py); ModelOpt 0.47's manual
#: config path does not write it.
QWEN_TYPES = ("qwen2", "qwen3")
#: Every ``qwen_type`` TensorRT-LLM 1.2's QWenConfig accepts (a checkpoint converted by
#: TensorRT-LLM itself may carry any of them).
TRTLLM_QWEN_TYPES = (
    "qwen",
    "qwen2",
    "qwen2_moe",
    "qwen2_llava_onevision",
    "qwen2_vl",
    "qwen2_audio",
    "qwen3",
    "qwen3_moe",
)
#: The ``quantization`` block is parsed strictly (QuantConfig(**block)): other keys are errors.
QUANTIZATION_KEYS = frozenset(
    {
        "quant_algo",
        "kv_cache_quant_algo",
        "group_size",
        "has_zero_point",
        "pre_quant_scale",
        "exclude_modules",
        "smoothquant_val",
        "clamp_val",
        "use_meta_recipe",
        "mamba_ssm_cache_dtype",
    }
)
#: Members of TensorRT-LLM 1.x's QuantAlgo enum (``quantization.quant_algo``).
QUANT_ALGOS = frozenset(
    {
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
)
#: safetensors dtypes of unquantized (float) tensors.
FLOAT_DTYPES = frozenset({"BF16", "F16", "F32"})


@dataclass(frozen=True)
class LinearContract:
    """What a quantized linear layer carries for one quant_algo (as ModelOpt 0.47 writes it)."""

    weight_dtype: frozenset[str]
    #: Extra tensors by suffix; the value says their shape: "scalar", "out", "in", or
    #: "block" (``[out, in / group]``).
    tensors: Mapping[str, str]
    #: Weight layout: "out_in" ([out, in]), "in_out" ([in, out]), "int4" ([out/2, in]),
    #: "fp4" ([out, in/2]).
    packing: str = "out_in"
    block_scale_dtype: str | None = None


#: quant_algo (None: unquantized) -> the tensors of one linear layer.
LINEAR_CONTRACTS: Mapping[str | None, LinearContract] = {
    None: LinearContract(FLOAT_DTYPES, {}),
    "FP8": LinearContract(
        frozenset({"F8_E4M3"}),
        {"weights_scaling_factor": "scalar", "activation_scaling_factor": "scalar"},
    ),
    "FP8_PER_CHANNEL_PER_TOKEN": LinearContract(
        frozenset({"F8_E4M3"}), {"per_channel_scale": "out"}
    ),
    # Float weights (quantized when TensorRT-LLM loads them) or its own int8 layout [in, out]
    # with per_channel_scale; ModelOpt 0.47's int8 [out, in] + weights_scaling_factor is neither.
    "W8A16": LinearContract(frozenset({"I8"}), {"per_channel_scale": "out"}, packing="in_out"),
    "W8A8_SQ_PER_CHANNEL": LinearContract(
        frozenset({"I8"}),
        {
            "weights_scaling_factor": "out",
            "activation_scaling_factor": "scalar",
            "prequant_scaling_factor": "in",
        },
    ),
    "W4A16_AWQ": LinearContract(
        frozenset({"I8"}),
        {"weights_scaling_factor": "block", "prequant_scaling_factor": "in"},
        packing="int4",
    ),
    "W4A8_AWQ": LinearContract(
        frozenset({"I8"}),
        {
            "weights_scaling_factor": "block",
            "prequant_scaling_factor": "in",
            "activation_scaling_factor": "scalar",
            "weights_scaling_factor_2": "scalar",
        },
        packing="int4",
    ),
    "NVFP4": LinearContract(
        frozenset({"U8"}),
        {
            "weights_scaling_factor": "block",
            "weights_scaling_factor_2": "scalar",
            "activation_scaling_factor": "scalar",
        },
        packing="fp4",
        block_scale_dtype="F8_E4M3",
    ),
}
#: NVFP4's block (group) size along the input dimension, fixed by the format.
NVFP4_BLOCK = 16
#: Llama-family decoder layer: the linears and norms every layer has.
LINEARS = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")
NORMS = ("input_layernorm", "post_layernorm")

# --------------------------------------------------------------------------- per-algorithm facts

#: The lowest SM with FP8 tensor cores (Ada 8.9, Hopper 9.0).
FP8_MIN_SM = 8.9
SM_NAMES = {8.9: "Ada/Hopper", 10.0: "Blackwell"}
#: AWQ group size when the checkpoint does not say.
DEFAULT_AWQ_GROUP = 128


@dataclass(frozen=True)
class AlgoFacts:
    """What TensorRT-LLM 1.2 needs or does for one ``quant_algo`` when building engines."""

    name: str
    #: Activations (or some layers) run in FP8: needs SM >= FP8_MIN_SM.
    fp8_activations: bool = False
    #: Lowest SM its engines run on, beyond the FP8 requirement (None: no other limit).
    min_sm: float | None = None
    #: TensorRT-LLM 1.2 rejects it on this SM and newer (the int4/int8 formats on SM 10.x);
    #: None: no such limit.
    rejected_from_sm: float | None = None
    #: AWQ int4 GEMM: every dimension is padded to a multiple of max(floor, group) x tp, and
    #: loading then fails on the checkpoint's unpadded shapes. None: not AWQ.
    awq_padding_floor: int | None = None
    #: Group sizes TensorRT-LLM 1.2 does not implement for it.
    unsupported_group_sizes: tuple[int, ...] = ()
    #: With an FP8 KV cache, TensorRT-LLM silently turns paged context FMHA off.
    fp8_kv_disables_paged_context_fmha: bool = False
    #: Buildable per layer inside a MIXED_PRECISION checkpoint (quant_cfg.json).
    per_layer_in_mixed: bool = False
    #: Quantizes whole attention/MLP blocks: per-layer exclusions are not honoured and the
    #: excluded layers' tensors would be missing.
    whole_blocks_only: bool = False


ALGO_FACTS: Mapping[str, AlgoFacts] = {
    f.name: f
    for f in (
        AlgoFacts("FP8", fp8_activations=True, per_layer_in_mixed=True),
        AlgoFacts(
            "FP8_PER_CHANNEL_PER_TOKEN",
            fp8_activations=True,
            rejected_from_sm=10.0,
            whole_blocks_only=True,
        ),
        AlgoFacts("W8A16", rejected_from_sm=10.0),
        AlgoFacts("W8A8_SQ_PER_CHANNEL", rejected_from_sm=10.0, per_layer_in_mixed=True),
        AlgoFacts(
            "W4A16_AWQ",
            rejected_from_sm=10.0,
            awq_padding_floor=64,
            fp8_kv_disables_paged_context_fmha=True,
            per_layer_in_mixed=True,
        ),
        AlgoFacts(
            "W4A8_AWQ",
            fp8_activations=True,
            rejected_from_sm=10.0,
            awq_padding_floor=128,
            unsupported_group_sizes=(64,),
            fp8_kv_disables_paged_context_fmha=True,
            per_layer_in_mixed=True,
        ),
        # A per-layer mix may hold FP8 layers (auto_quantize's candidates), so FP8's SM rule.
        AlgoFacts("MIXED_PRECISION", fp8_activations=True),
        AlgoFacts("NVFP4", min_sm=10.0, per_layer_in_mixed=True),
    )
}
assert set(ALGO_FACTS) <= QUANT_ALGOS


def algo_facts(quant_algo: str | None) -> AlgoFacts:
    """The facts of ``quant_algo`` (an algorithm without special rules gets the defaults)."""
    if quant_algo is None:
        return AlgoFacts("NO_QUANT")
    return ALGO_FACTS.get(quant_algo) or AlgoFacts(quant_algo)


@dataclass(frozen=True)
class KVCacheFacts:
    """One ``kv_cache_quant_algo``."""

    name: str
    fp8: bool = False
    rejected_from_sm: float | None = None
    #: False: trtllm-build raises "Paged Context FMHA doesn't work with int8 kv cache".
    works_with_paged_context_fmha: bool = True


KV_CACHE_FACTS: Mapping[str, KVCacheFacts] = {
    f.name: f
    for f in (
        KVCacheFacts("FP8", fp8=True),
        KVCacheFacts("INT8", rejected_from_sm=10.0, works_with_paged_context_fmha=False),
        KVCacheFacts("NVFP4"),
    )
}
#: ``quantization.kv_cache_quant_algo`` values.
KV_CACHE_QUANT_ALGOS = frozenset(KV_CACHE_FACTS)

#: Derived sets, for readers that want them by name.
FP8_ALGOS = frozenset(n for n, f in ALGO_FACTS.items() if f.fp8_activations)
AWQ_ALGOS = frozenset(n for n, f in ALGO_FACTS.items() if f.awq_padding_floor is not None)
MIXED_PRECISION_LAYER_ALGOS = frozenset(n for n, f in ALGO_FACTS.items() if f.per_layer_in_mixed)


def exclusion_problem(quant_algo: str | None) -> str | None:
    """Why per-layer ``exclude`` cannot work for ``quant_algo`` in a checkpoint, or None."""
    if not algo_facts(quant_algo).whole_blocks_only:
        return None
    return (
        f"TensorRT-LLM quantizes whole attention/MLP blocks for {quant_algo}, so per-layer "
        "`exclude` is not honoured and tensors would go missing; drop `exclude`"
    )


# --------------------------------------------------------------------------- rules


def awq_group_problem(quant_algo: str, group_size: int | None) -> str | None:
    """A group size TensorRT-LLM 1.2 does not implement for ``quant_algo``, or None."""
    f = algo_facts(quant_algo)
    g = group_size or DEFAULT_AWQ_GROUP
    if g not in f.unsupported_group_sizes:
        return None
    return (
        f"{TRTLLM} does not implement {quant_algo.replace('_', ' ')} with group_size {g} "
        f"(quant_algo {quant_algo}); choose another group_size ({DEFAULT_AWQ_GROUP} is the default)"
    )


def awq_padding_multiple(quant_algo: str, group_size: int | None, tp: int) -> int | None:
    """What TensorRT-LLM pads ``quant_algo``'s int4 GEMM dimensions to, or None (not AWQ)."""
    floor = algo_facts(quant_algo).awq_padding_floor
    if floor is None:
        return None
    return max(floor, group_size or DEFAULT_AWQ_GROUP) * tp


def awq_layout_problems(
    quant_algo: str | None,
    group_size: int | None,
    tp: int,
    dims: Mapping[str, int | None],
) -> list[str]:
    """AWQ layouts TensorRT-LLM 1.2 cannot load (list of messages; empty when fine).

    It pads int4 GEMM dimensions to multiples of max(64, g) x tp (W4A8: max(128, g) x tp) and
    then fails on the checkpoint's shapes; W4A8 with group 64 is not implemented at all (then
    only that is reported: nothing else matters until the group size changes). ``dims``: the
    model's GEMM dimensions by a name for the message (None values are skipped).
    """
    if quant_algo is None or algo_facts(quant_algo).awq_padding_floor is None:
        return []
    group = awq_group_problem(quant_algo, group_size)
    if group:
        return [group]
    floor = algo_facts(quant_algo).awq_padding_floor
    g = group_size or DEFAULT_AWQ_GROUP
    multiple = awq_padding_multiple(quant_algo, group_size, tp)
    assert multiple is not None
    bad = [(n, d) for n, d in dims.items() if isinstance(d, int) and d % multiple]
    if not bad:
        return []
    return [
        f"{TRTLLM} pads {quant_algo} GEMM dimensions to multiples of {multiple} "
        f"(max({floor}, group_size {g}) x tp {tp}) and then fails on the checkpoint's shapes, "
        "but the model has " + ", ".join(f"{n} = {d}" for n, d in bad)
    ]


def _rules(
    quant_algo: str | None,
    kv_cache_algo: str | None,
    sm: float | None,
    use_paged_context_fmha: bool,
    use_fp8_context_fmha: bool,
):
    """(recipe key, message, whether trtllm-build itself raises) for every rule broken."""
    algo = algo_facts(quant_algo)
    kv = KV_CACHE_FACTS.get(kv_cache_algo or "") or KVCacheFacts(kv_cache_algo or "none")
    if use_fp8_context_fmha and not kv.fp8:
        yield (
            "use_fp8_context_fmha",
            "FP8 context FMHA needs an FP8 KV cache (ptq kv_cache: fp8)",
            True,
        )
    if algo.fp8_kv_disables_paged_context_fmha and kv.fp8 and use_paged_context_fmha:
        yield (
            "",
            f"{quant_algo} with an FP8 KV cache: {TRTLLM} turns paged context FMHA off for "
            "it (losing KV reuse and chunked context); drop the FP8 KV cache or set "
            "use_paged_context_fmha: false to accept that",
            False,
        )
    if not kv.works_with_paged_context_fmha and use_paged_context_fmha:
        yield (
            "use_paged_context_fmha",
            f"an {kv.name} KV cache does not work with paged context FMHA (trtllm-build "
            "raises); set use_paged_context_fmha: false or use an FP8 KV cache",
            True,
        )
    if sm is None:
        return
    if (algo.fp8_activations or kv.fp8) and sm < FP8_MIN_SM:
        what = " and ".join(
            w
            for w, on in (
                (f"quant_algo {quant_algo}", algo.fp8_activations),
                ("FP8 KV cache", kv.fp8),
            )
            if on
        )
        yield (
            "gpu_compute_capability",
            f"FP8 needs SM {FP8_MIN_SM}+ ({SM_NAMES[FP8_MIN_SM]}); target is {sm} ({what})",
            False,
        )
    if algo.min_sm is not None and sm < algo.min_sm:
        yield (
            "gpu_compute_capability",
            f"{quant_algo} engines need SM {algo.min_sm}+ "
            f"({SM_NAMES.get(algo.min_sm, 'newer GPUs')}); target is {sm}",
            False,
        )
    if algo.rejected_from_sm is not None and sm >= algo.rejected_from_sm:
        yield (
            "gpu_compute_capability",
            f"{TRTLLM} rejects {quant_algo} on SM {sm} (it does from SM "
            f"{algo.rejected_from_sm} on); use fp8 or nvfp4 for such a GPU",
            False,
        )
    if kv.rejected_from_sm is not None and sm >= kv.rejected_from_sm:
        yield (
            "gpu_compute_capability",
            f"{TRTLLM} rejects an {kv.name} KV cache on SM {sm}; use an FP8 KV cache for such "
            "a GPU",
            False,
        )


def engine_build_problems(
    quant_algo: str | None,
    kv_cache_algo: str | None,
    sm: float | None,
    *,
    use_paged_context_fmha: bool,
    use_fp8_context_fmha: bool,
) -> list[tuple[str, str]]:
    """(recipe key of the build stage, message) for each combination TensorRT-LLM 1.2 rejects
    or silently degrades. ``sm``: target compute capability (None: unknown, SM rules skipped);
    ``kv_cache_algo``: "FP8", "INT8", "NVFP4" or None."""
    return [
        (key, msg)
        for key, msg, _ in _rules(
            quant_algo, kv_cache_algo, sm, use_paged_context_fmha, use_fp8_context_fmha
        )
    ]


def trtllm_build_errors(
    quant_algo: str | None,
    kv_cache_algo: str | None,
    *,
    use_paged_context_fmha: bool,
    use_fp8_context_fmha: bool,
) -> list[str]:
    """Messages for the flag combinations trtllm-build itself raises on (whatever the GPU)."""
    return [
        msg
        for _, msg, raises in _rules(
            quant_algo, kv_cache_algo, None, use_paged_context_fmha, use_fp8_context_fmha
        )
        if raises
    ]
