"""Model families: what ModelOpt 0.47 and this pipeline can do with each, by HF ``model_type``.

Validation reads this table (through ``ModelDims.model_type``) to refuse, before any model
loads, what a family cannot go through, with the reason; everything else about a family is
ModelOpt's (it quantizes and exports HF models by module structure, not by family). The
facts were established on tiny models of each family built from their transformers 5.14
configs (tests/test_families.py keeps them true):

- ModelOpt writes a TensorRT-LLM 1.2 checkpoint only for decoders its manual config path
  knows (llama, gemma, gpt, qwen: ``convert_to_tensorrt_llm_config``); Gemma 2/3 and Phi-3
  raise ``NotImplementedError``, Mixtral and Qwen3-MoE fail in ``build_moe_config`` (fused
  experts of transformers 5 are not iterable). The unified HF checkpoint works for all.
- transformers 5 keeps MoE experts as fused 3D tensors; ModelOpt's AWQ re-smoothing at
  export indexes experts one by one (``get_experts_list``) and crashes on them, so AWQ
  formats cannot be exported for an MoE model; its SmoothQuant leaves fused experts
  unsmoothed (no ``pre_quant_scale``), it quantizes fused experts as a whole (an exclusion of
  one projection is exported half-quantized), and its per-layer mixes name expert
  projections nothing maps back.
- The unified checkpoint stores experts under per-expert hub names
  (``experts.E.gate_proj``); the gate's rebuild stacks them back into transformers' fused
  experts (optimizer/unified/experts.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """What one model family supports."""

    name: str
    #: HF ``model_type`` values of the family.
    model_types: tuple[str, ...]
    #: Mixture-of-experts (experts and a router per layer).
    moe: bool = False
    #: ModelOpt 0.47 writes a TensorRT-LLM 1.2 checkpoint of it.
    trtllm_checkpoint: bool = True


FAMILIES = (
    Family("Llama", ("llama",)),
    Family("Mistral", ("mistral",)),
    Family("Qwen2 / Qwen2.5", ("qwen2",)),
    Family("Qwen3", ("qwen3",)),
    Family("Gemma 2", ("gemma2",), trtllm_checkpoint=False),
    Family("Gemma 3 (text)", ("gemma3_text",), trtllm_checkpoint=False),
    Family("Phi-3", ("phi3",), trtllm_checkpoint=False),
    Family("Mixtral", ("mixtral",), moe=True, trtllm_checkpoint=False),
    Family("Qwen3-MoE", ("qwen3_moe",), moe=True, trtllm_checkpoint=False),
)

_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def family(model_type: str | None) -> Family | None:
    """The family of an HF ``model_type``; None when unknown (nothing is refused for it)."""
    return _BY_TYPE.get(model_type or "")


def trtllm_checkpoint_problem(model_type: str | None) -> str | None:
    """Why ModelOpt cannot write a TensorRT-LLM checkpoint of this family (None: it can)."""
    fam = family(model_type)
    if fam is None or fam.trtllm_checkpoint:
        return None
    why = (
        "its fused experts (transformers 5) are not what ModelOpt's TensorRT-LLM exporter reads"
        if fam.moe
        else "ModelOpt's TensorRT-LLM exporter has no config for it"
    )
    return (
        f"ModelOpt 0.47 writes no TensorRT-LLM checkpoint for {fam.name} ({why}); set "
        "trtllm_checkpoint: null and hf_checkpoint: true (TensorRT-LLM's PyTorch backend, vLLM "
        "and SGLang load the unified checkpoint)"
    )


def _moe(model_type: str | None) -> Family | None:
    """The family of ``model_type`` if it is a mixture of experts."""
    fam = family(model_type)
    return fam if fam is not None and fam.moe else None


def moe_export_problem(model_type: str | None, formats: list[str]) -> str | None:
    """Why the unified export of an MoE model quantized as ``formats`` would fail (or be
    inconsistent)."""
    fam = _moe(model_type)
    if fam is None:
        return None
    awq = [f for f in formats if "awq" in f]
    if awq:
        return (
            f"{', '.join(awq)} cannot be exported for {fam.name}: ModelOpt 0.47's AWQ "
            "re-smoothing at export indexes experts one by one, and transformers 5 fuses them; "
            "use fp8 (or nvfp4 on a GPU)"
        )
    if "int8_sq" in formats:
        return (
            f"int8_sq on {fam.name}: ModelOpt 0.47 does not smooth fused experts, so their "
            "export lacks the pre_quant_scale a W8A8 SmoothQuant layer needs; use fp8 (or "
            "nvfp4 on a GPU)"
        )
    return None


#: Names an expert projection of a fused MoE block has (on disk and in memory): an exclusion
#: matching one cannot be kept by ModelOpt 0.47, which neither quantizes single projections
#: of fused experts apart nor lists them in ``exclude_modules``.
_EXPERT_NAMES = (
    "model.layers.0.mlp.experts",
    *(f"model.layers.0.mlp.experts.0.{p}" for p in ("gate_proj", "up_proj", "down_proj")),
    *(f"model.layers.0.block_sparse_moe.experts.0.{p}" for p in ("w1", "w2", "w3")),
)


def moe_exclude_problem(model_type: str | None, patterns: list[str]) -> str | None:
    """Why ``exclude`` globs that reach into an MoE model's experts cannot be honoured."""
    from fnmatch import fnmatch

    fam = _moe(model_type)
    if fam is None:
        return None
    hit = [p for p in patterns if any(fnmatch(n, p) for n in _EXPERT_NAMES)]
    if not hit:
        return None
    return (
        f"{hit[0]!r} matches expert projections of {fam.name}: ModelOpt 0.47 quantizes "
        "transformers 5's fused experts as a whole and would export them half-quantized; "
        "exclude whole layers' attention or the lm_head instead"
    )


def moe_mixed_problem(model_type: str | None) -> str | None:
    """Why a per-layer format mix (auto_quantize) is refused for an MoE model."""
    fam = _moe(model_type)
    if fam is None:
        return None
    return (
        f"auto_quantize on {fam.name} is not supported yet: its per-layer mix names expert "
        "projections that the export and the gate's rebuild do not map onto fused experts"
    )


def support_matrix() -> str:
    """The family x target table of the README (tests/test_families.py checks that the README
    holds exactly this, and has a tiny-model test for every cell)."""
    yes, no = "✓", "✗"
    rows = [
        "| family | `model_type` | PTQ -> unified HF checkpoint, gate on it | AWQ formats | "
        "TensorRT-LLM 1.2 checkpoint |",
        "|---|---|---|---|---|",
    ]
    for f in FAMILIES:
        types = ", ".join(f"`{t}`" for t in f.model_types)
        rows.append(
            f"| {f.name} | {types} | {yes} | {no if f.moe else yes} | "
            f"{yes if f.trtllm_checkpoint else no} |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(support_matrix(), end="")
