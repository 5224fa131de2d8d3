"""THE table of which serving runtime, from which version, loads which ModelOpt unified HF
checkpoint (``hf_quant_config.json``: ``quantization.quant_algo`` / ``kv_cache_quant_algo``).

Read by the ``deploy`` stage (validation from the plan, and at run time against the exported
``hf_quant_config.json``) and by the serving test double (``tests/doubles/serving-engine``),
which loads this file by path. So it is **stdlib-only** and importable by a bare ``python3``:
data (one :class:`Release` per runtime version where support changed) plus small pure
functions over plain values.

A release's facts hold from its ``since`` version up to the next listed release of the same
runtime; a version older than the first listed one is not covered (refused). Sources are
cited per entry, with the version each fact was read for (checked 2026-12); where a fact was
read from a development branch rather than a release, the entry says so.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

RUNTIMES = ("trtllm", "vllm", "sglang")
#: How messages name them.
NAMES: Mapping[str, str] = {"trtllm": "TensorRT-LLM", "vllm": "vLLM", "sglang": "SGLang"}


@dataclass(frozen=True)
class Release:
    """What one runtime loads from ``since`` on (until the next listed release)."""

    runtime: str
    #: First version these facts hold for, "major.minor" (or "major.minor.patch").
    since: str
    #: ``quant_algo`` -> the value the runtime's quantization flag takes for it ("" where
    #: the runtime reads the method from the checkpoint and has no such flag: TensorRT-LLM).
    quant_algos: Mapping[str, str]
    #: ``kv_cache_quant_algo`` -> the runtime's KV-cache dtype value.
    kv_cache: Mapping[str, str]
    #: Serves an EAGLE-3 draft head (speculative decoding).
    eagle3: bool
    #: Container image of this version (a tag: pin it by digest for reproducible runs).
    image: str
    source: str
    #: Serves a separate draft model with the same tokenizer (draft/target speculative
    #: decoding: TensorRT-LLM ``DraftTarget``, vLLM ``draft_model``).
    draft_target: bool = False


#: ModelOpt's ``quant_algo`` strings in ``hf_quant_config.json`` per simple format name of
#: optimizer/formats.py (ModelOpt 0.47, modelopt/torch/export/quant_utils.py
#: ``process_layer_quant_config``); several formats in one model export as MIXED_PRECISION.
FORMAT_QUANT_ALGOS: Mapping[str, str] = {
    "fp8": "FP8",
    "fp8_pc_pt": "FP8_PER_CHANNEL_PER_TOKEN",
    "int8_sq": "W8A8_SQ_PER_CHANNEL",
    "int8_wo": "W8A16",
    "int4_awq": "W4A16_AWQ",
    "w4a8_awq": "W4A8_AWQ",
    "nvfp4": "NVFP4",
    "nvfp4_awq": "NVFP4_AWQ",
    "w4a16_nvfp4": "W4A16_NVFP4",
}
MIXED_PRECISION = "MIXED_PRECISION"

_TRTLLM_ALGOS = {
    a: ""
    for a in (
        "FP8",
        "FP8_PER_CHANNEL_PER_TOKEN",
        "FP8_BLOCK_SCALES",
        "NVFP4",
        "W4A8_NVFP4_FP8",
        "W4A16_AWQ",
        "W4A8_AWQ",
        MIXED_PRECISION,
    )
}

_VLLM_016_ALGOS = {
    "FP8": "modelopt",
    "FP8_PER_CHANNEL_PER_TOKEN": "modelopt",
    "FP8_PB_WO": "modelopt",
    "NVFP4": "modelopt_fp4",
    "MXFP8": "modelopt_mxfp8",
}

RELEASES: tuple[Release, ...] = (
    # TensorRT-LLM, PyTorch backend (the default from 1.0; the only one after 1.3.0rc20).
    # tensorrt_llm/_torch/modules/linear.py get_quant_method (read on main, 2026-12): FP8 QDQ,
    # FP8 rowwise (per channel/token), FP8 block scales, NVFP4, W4A8 NVFP4-FP8, W4A16 AWQ,
    # W4A8 AWQ; there is no SmoothQuant (W8A8_SQ_*) method ("unsupported quant mode"), and
    # ModelOpt's W8A16 [out, in] layout is not the one TensorRT-LLM loads (formats.py).
    # MIXED_PRECISION: per-layer quant configs of the HF checkpoint. Speculative decoding:
    # speculative_config {decoding_type: Eagle3} (../shared/notes/tensorrt-llm.md).
    Release(
        "trtllm",
        "1.0",
        _TRTLLM_ALGOS,
        {"FP8": "fp8"},
        eagle3=True,
        image="nvcr.io/nvidia/tensorrt-llm/release:1.0.0",
        source="tensorrt_llm/_torch/modules/linear.py get_quant_method (read on main 2026-12, "
        "assumed from 1.0); KV FP8: KvCacheConfig(dtype='fp8')",
    ),
    # The 1.3.0rc27 and 1.4.0rc4 docs (features/quantization) list "NVFP4 KV Cache" next to
    # FP8 KV (kv_cache_config.dtype 'nvfp4', needs a ModelOpt NVFP4-KV checkpoint).
    Release(
        "trtllm",
        "1.3",
        _TRTLLM_ALGOS,
        {"FP8": "fp8", "NVFP4": "nvfp4"},
        eagle3=True,
        image="nvcr.io/nvidia/tensorrt-llm/release:1.3.0rc27",
        source="nvidia.github.io/TensorRT-LLM/1.3.0rc27/features/quantization.html (FP8 and "
        "NVFP4 KV cache); linear.py get_quant_method (main 2026-12); features/"
        "speculative-decoding (DraftTargetDecodingConfig; assumed from 1.3, unverified before)",
        draft_target=True,
    ),
    # vLLM: `--quantization modelopt` (ModelOptFp8Config, static per-tensor FP8) since 0.6.
    Release(
        "vllm",
        "0.6",
        {"FP8": "modelopt"},
        {"FP8": "fp8"},
        eagle3=False,
        image="vllm/vllm-openai:v0.6.6",
        source="vLLM 0.6 ModelOptFp8Config (FP8 only); EAGLE-3 came later",
    ),
    Release(
        "vllm",
        "0.9",
        {"FP8": "modelopt", "NVFP4": "modelopt_fp4"},
        {"FP8": "fp8"},
        eagle3=True,
        image="vllm/vllm-openai:v0.9.0",
        source="docs.vllm.ai v0.9.0 API, quantization/modelopt: QUANT_ALGOS ['FP8', 'NVFP4'], "
        "KV_CACHE_QUANT_ALGOS ['FP8'] (same in v0.10.0, v0.10.1.1, v0.13.0); NVFP4 is "
        "ModelOptNvFp4Config ('modelopt_fp4'); speculative_config method 'eagle3'",
    ),
    Release(
        "vllm",
        "0.15",
        {
            "FP8": "modelopt",
            "FP8_PER_CHANNEL_PER_TOKEN": "modelopt",
            "FP8_PB_WO": "modelopt",
            "NVFP4": "modelopt_fp4",
        },
        {"FP8": "fp8"},
        eagle3=True,
        image="vllm/vllm-openai:v0.15.0",
        source="docs.vllm.ai v0.15.0 API: QUANT_ALGOS ['FP8', 'FP8_PER_CHANNEL_PER_TOKEN', "
        "'FP8_PB_WO', 'NVFP4'], KV ['FP8']",
    ),
    Release(
        "vllm",
        "0.16",
        _VLLM_016_ALGOS,
        {"FP8": "fp8"},
        eagle3=True,
        image="vllm/vllm-openai:v0.16.0",
        # vLLM main (2026-12) adds W4A16_NVFP4, MIXED_PRECISION and an NVFP4 KV cache; no
        # release with them was verified, so they are not listed (refused) here.
        source="docs.vllm.ai v0.16.0 API: QUANT_ALGOS + 'MXFP8' ('modelopt_mxfp8'), KV "
        "['FP8']; no W4A16_AWQ / W4A8_AWQ / W8A8_SQ in any vLLM ModelOpt config",
    ),
    Release(
        "vllm",
        "0.25",
        _VLLM_016_ALGOS,
        {"FP8": "fp8"},
        eagle3=True,
        image="vllm/vllm-openai:v0.25.0",
        source="docs.vllm.ai v0.25.0 features/speculative_decoding/draft_model (speculative_config "
        "method 'draft_model'); the quantization facts are 0.16's, not re-checked",
        draft_target=True,
    ),
    # SGLang: modelopt_quant.py ModelOptFp8Config requires an FP8 quant_algo (static per-tensor
    # linear method), ModelOptFp4Config is 'modelopt_fp4'; KV FP8 scales are loaded
    # (ModelOptFp8KVCacheMethod). sglang issue #18261 (2026-02) documents
    # `--quantization modelopt_fp4` for NVIDIA's NVFP4 checkpoints. EAGLE-3:
    # --speculative-algorithm EAGLE3.
    Release(
        "sglang",
        "0.5",
        {"FP8": "modelopt", "NVFP4": "modelopt_fp4"},
        {"FP8": "fp8_e4m3"},
        eagle3=True,
        image="lmsysorg/sglang:v0.5.0",
        source="sglang python/sglang/srt/layers/quantization/modelopt_quant.py (2025-2026); "
        "sgl-project/sglang#18261",
    ),
)

#: The version a target gets when the recipe names none: the newest listed release whose facts
#: were all checked (vLLM 0.25's row adds only its draft_model method to 0.16's facts).
DEFAULT_VERSIONS: Mapping[str, str] = {"trtllm": "1.3", "vllm": "0.16", "sglang": "0.5"}

#: The executable each runtime is started with (launcher: local), and what it runs.
EXECUTABLES: Mapping[str, str] = {"trtllm": "trtllm-serve", "vllm": "vllm", "sglang": "python3"}
SGLANG_MODULE = "sglang.launch_server"
#: Images whose entrypoint already starts a server (docker runs our argv instead).
RESET_ENTRYPOINT = frozenset({"vllm"})

#: 2:4 weight sparsity: only TensorRT-LLM's removed engine path used it (--weight_sparsity);
#: ModelOpt's unified export does not support it (examples/hf_ptq/README.md), so every
#: runtime here serves the weights dense.
SPARSITY_NOTE = (
    "the model is {sparsity} sparse, but the unified HF checkpoint is served dense by "
    "TensorRT-LLM >= 1.3, vLLM and SGLang: expect no speed-up from the sparsity"
)


# --------------------------------------------------------------------------- versions


def parse_version(version: str) -> tuple[int, ...] | None:
    """(major, minor[, patch]) of "1.3", "1.3.0rc27", "v0.16.0"; None if not a version."""
    m = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?(?:[A-Za-z0-9.+-]*)", version.strip())
    if not m:
        return None
    return tuple(int(g) for g in m.groups() if g is not None)


def releases(runtime: str) -> tuple[Release, ...]:
    """The listed releases of ``runtime``, oldest first."""
    return tuple(
        sorted(
            (r for r in RELEASES if r.runtime == runtime),
            key=lambda r: parse_version(r.since) or (),
        )
    )


def release(runtime: str, version: str) -> Release | None:
    """The facts that hold for ``runtime`` ``version`` (None: older than the table, or not
    a version number)."""
    v = parse_version(version)
    if v is None:
        return None
    found = None
    for r in releases(runtime):
        if (parse_version(r.since) or ()) <= v:
            found = r
    return found


def version_problem(runtime: str, version: str) -> str | None:
    """Why ``version`` of ``runtime`` is outside the table, or None."""
    name, listed = NAMES[runtime], releases(runtime)
    if parse_version(version) is None:
        return f"{version!r} is not a {name} version number (e.g. {DEFAULT_VERSIONS[runtime]!r})"
    if release(runtime, version) is None:
        return (
            f"{name} {version} predates ModelOpt checkpoint support in this table (the first "
            f"listed is {listed[0].since}); use {DEFAULT_VERSIONS[runtime]} or newer"
        )
    return None


# --------------------------------------------------------------------------- the checkpoint


def checkpoint_algos(hf_quant_config: Mapping) -> tuple[str | None, str | None, tuple[str, ...]]:
    """(quant_algo, kv_cache_quant_algo, per-layer quant_algos of a MIXED_PRECISION export)
    of an ``hf_quant_config.json`` (upper-cased, as the runtimes compare them)."""
    q = hf_quant_config.get("quantization") or {}
    algo = q.get("quant_algo")
    kv = q.get("kv_cache_quant_algo")
    layers = sorted(
        {
            str(layer.get("quant_algo")).upper()
            for layer in (q.get("quantized_layers") or {}).values()
            if isinstance(layer, Mapping) and layer.get("quant_algo")
        }
    )
    return (
        str(algo).upper() if algo else None,
        str(kv).upper() if kv else None,
        tuple(layers),
    )


def load_problems(
    runtime: str,
    version: str,
    quant_algo: str | None,
    kv_cache_algo: str | None,
    layer_algos: tuple[str, ...] = (),
    draft: str | None = None,
) -> list[str]:
    """Why ``runtime`` ``version`` cannot load or serve this checkpoint (empty: it can).
    ``quant_algo`` None: unquantized; ``draft``: e.g. "eagle3"."""
    name = NAMES[runtime]
    problem = version_problem(runtime, version)
    if problem:
        return [problem]
    rel = release(runtime, version)
    assert rel is not None
    where = f"{name} {version}"
    problems = []
    for algo in ([quant_algo] if quant_algo else []) + [a for a in layer_algos if a != quant_algo]:
        if algo in rel.quant_algos:
            continue
        newer = [r.since for r in releases(runtime) if algo in r.quant_algos]
        hint = (
            f"it does from {name} {newer[0]} on"
            if newer
            else f"no {name} version in this table does"
        )
        problems.append(
            f"{where} cannot load a ModelOpt {algo} checkpoint ({hint}; it loads "
            f"{', '.join(sorted(rel.quant_algos))})"
        )
    if kv_cache_algo and kv_cache_algo not in rel.kv_cache:
        newer = [r.since for r in releases(runtime) if kv_cache_algo in r.kv_cache]
        hint = (
            f"it does from {newer[0]} on" if newer else f"no {name} version in this table has one"
        )
        problems.append(
            f"{where} has no {kv_cache_algo} KV cache for ModelOpt checkpoints ({hint}; it "
            f"has {', '.join(sorted(rel.kv_cache))})"
        )
    if draft == "medusa":
        problems.append(
            f"{where} is not given Medusa heads here: they deploy as a TensorRT-LLM <= 1.2 "
            "engine (a `build` stage after the speculative stage)"
        )
    elif draft and not getattr(rel, draft):  # one Release flag per draft kind, named as it
        newer = [r.since for r in releases(runtime) if getattr(r, draft)]
        hint = f"from {newer[0]} on" if newer else "in no version in this table"
        what = DRAFT_NAMES[draft]
        problems.append(f"{where} cannot serve the {draft} draft ({what} is supported {hint})")
    return problems


#: How messages name the draft kinds.
DRAFT_NAMES: Mapping[str, str] = {
    "eagle3": "EAGLE-3 speculative decoding",
    "draft_target": "draft/target speculative decoding with a separate draft model",
    "medusa": "Medusa",
}


def quantization_flag(runtime: str, version: str, quant_algo: str | None) -> str | None:
    """The value of the runtime's quantization flag for ``quant_algo`` (None: pass none)."""
    rel = release(runtime, version)
    if rel is None or quant_algo is None:
        return None
    return rel.quant_algos.get(quant_algo) or None


def kv_cache_dtype(runtime: str, version: str, kv_cache_algo: str | None) -> str | None:
    """The runtime's KV-cache dtype value for ``kv_cache_algo`` (None: the model's dtype)."""
    rel = release(runtime, version)
    if rel is None or kv_cache_algo is None:
        return None
    return rel.kv_cache.get(kv_cache_algo)
