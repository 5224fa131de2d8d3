"""Model families: what ModelOpt 0.47 and this pipeline can do with each, by HF ``model_type``.

Validation reads this table (through ``ModelDims.model_type``) to refuse, before any model
loads, what a family cannot go through, with the reason; everything else about a family is
ModelOpt's (it quantizes and exports HF models by module structure, not by family). The
facts were established on tiny models of each family built from their transformers 5.14
configs (tests/test_families.py keeps them true):

- ModelOpt writes a TensorRT-LLM 1.2 checkpoint only for decoders its manual config path
  knows (llama, gemma, gpt, qwen: ``convert_to_tensorrt_llm_config``); Gemma 2/3 and Phi-3
  raise ``NotImplementedError``. For Qwen3-MoE its ``build_moe_config`` asserts on the
  decoder type; for Mixtral it writes stacked experts that this pipeline's TensorRT-LLM
  checker and rebuild do not read. The unified HF checkpoint works for all.
- transformers 5 keeps MoE experts as fused 3D tensors, which ModelOpt 0.47's AWQ and
  SmoothQuant exports cannot handle; the ptq stage therefore unfuses them into one module
  per expert first (optimizer/techniques/unfused_experts.py), and fp8, int4_awq and int8_sq
  then export per-expert tensors (AWQ / SmoothQuant ``pre_quant_scale`` included). w4a8_awq
  still fails at export (ModelOpt's gate/up amax sync cannot reshape its two-level weight
  quantizers), nvfp4_awq is unverified (its export needs a GPU), and the gate's rebuild reads
  a block's experts in one format, so exclusions of single expert projections and the
  search's per-layer-group mixes stay refused. auto_quantize is allowed: ModelOpt's
  AutoQuantize makes one choice for all expert projections of a block.
- Under ``model.max_memory`` an MoE is unfused in host memory and then placed by accelerate
  (models.load_model / models.dispatch), so offloading works for it as for dense models.
- The unified checkpoint stores experts under per-expert hub names
  (``experts.E.gate_proj``); the gate's rebuild stacks them back into transformers' fused
  experts (optimizer/unified/experts.py).
"""

from __future__ import annotations

import functools
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
    #: Why not, when it is not that ModelOpt's exporter has no config for the family.
    trtllm_why: str = ""


FAMILIES = (
    Family("Llama", ("llama",)),
    Family("Mistral", ("mistral",)),
    Family("Qwen2 / Qwen2.5", ("qwen2",)),
    Family("Qwen3", ("qwen3",)),
    Family("Gemma 2", ("gemma2",), trtllm_checkpoint=False),
    Family("Gemma 3 (text)", ("gemma3_text",), trtllm_checkpoint=False),
    Family("Phi-3", ("phi3",), trtllm_checkpoint=False),
    Family(
        "Mixtral",
        ("mixtral",),
        moe=True,
        trtllm_checkpoint=False,
        trtllm_why="ModelOpt 0.47 writes its experts stacked, a layout this pipeline's "
        "TensorRT-LLM checker and rebuild do not read yet",
    ),
    Family(
        "Qwen3-MoE",
        ("qwen3_moe",),
        moe=True,
        trtllm_checkpoint=False,
        trtllm_why="ModelOpt 0.47's MoE config builder knows no Qwen3-MoE decoder",
    ),
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
    what = (
        f"no TensorRT-LLM checkpoint for {fam.name}: {fam.trtllm_why}"
        if fam.trtllm_why
        else f"ModelOpt 0.47 writes no TensorRT-LLM checkpoint for {fam.name} (ModelOpt's "
        "TensorRT-LLM exporter has no config for it)"
    )
    return (
        f"{what}; set trtllm_checkpoint: null and hf_checkpoint: true (TensorRT-LLM's PyTorch "
        "backend, vLLM and SGLang load the unified checkpoint)"
    )


def _moe(model_type: str | None) -> Family | None:
    """The family of ``model_type`` if it is a mixture of experts."""
    fam = family(model_type)
    return fam if fam is not None and fam.moe else None


#: Formats whose unified export of an MoE model fails or is unverified, and why.
MOE_EXPORT_REFUSED = {
    "w4a8_awq": "ModelOpt 0.47's gate/up amax sync at export cannot reshape its two-level "
    "(INT4 + FP8) weight quantizers of the experts",
    "nvfp4_awq": "not verified on mixtures of experts yet (its export needs a GPU)",
}


def moe_export_problem(model_type: str | None, formats: list[str]) -> str | None:
    """Why the unified export of an MoE model quantized as ``formats`` would fail (or is
    unverified)."""
    fam = _moe(model_type)
    if fam is None:
        return None
    for fmt in formats:
        if fmt in MOE_EXPORT_REFUSED:
            return (
                f"{fmt} cannot be exported for {fam.name}: {MOE_EXPORT_REFUSED[fmt]}; use "
                "int4_awq, int8_sq or fp8"
            )
    return None


@functools.cache
def _expert_names() -> tuple[str, ...]:
    """Names an expert projection of an MoE block has (on disk and in memory): the gate's
    rebuild reads a block's experts in one format (fused, as transformers 5 computes them),
    so an exclusion matching one is refused. Built on first use, not at import."""
    return (
        "model.layers.0.mlp.experts",
        *(
            f"model.layers.0.{block}.experts.{e}.{p}"
            for e in range(512)  # (as many experts as the largest MoE checkpoints have)
            for block in ("mlp", "block_sparse_moe")
            for p in ("gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")
        ),
    )


def moe_exclude_problem(model_type: str | None, patterns: list[str]) -> str | None:
    """Why ``exclude`` globs that reach into an MoE model's experts cannot be honoured."""
    from fnmatch import fnmatch

    fam = _moe(model_type)
    if fam is None:
        return None
    hit = [p for p in patterns if any(fnmatch(n, p) for n in _expert_names())]
    if not hit:
        return None
    return (
        f"{hit[0]!r} matches expert projections of {fam.name}: the gate's rebuild reads a "
        "block's experts in one format (as transformers 5's fused experts compute), so an "
        "export with some of them unquantized is not evaluated; exclude whole layers' "
        "attention or the lm_head instead"
    )


def is_moe(model_type: str | None) -> bool:
    """A mixture-of-experts family this table knows."""
    return _moe(model_type) is not None


def moe_mixed_problem(model_type: str | None) -> str | None:
    """Why the search's per-layer-group format mix is refused for an MoE model."""
    fam = _moe(model_type)
    if fam is None:
        return None
    return (
        f"search on {fam.name} is not supported yet: its layer groups may give a block's "
        "experts different formats, and the gate's rebuild reads a block's experts in one "
        "(auto_quantize, which chooses one format per block's experts, works)"
    )


def support_matrix() -> str:
    """The family x target table of the README (tests/test_families.py checks that the README
    holds exactly this, and has a tiny-model test for every cell)."""
    yes, no = "✓", "✗"
    # (MoE: the experts are unfused for ModelOpt; its w4a8_awq export still fails on them)
    moe_awq = f"{yes} (int4_awq; w4a8_awq {no})"
    rows = [
        "| family | `model_type` | PTQ -> unified HF checkpoint, gate on it | AWQ formats | "
        "TensorRT-LLM 1.2 checkpoint |",
        "|---|---|---|---|---|",
    ]
    for f in FAMILIES:
        types = ", ".join(f"`{t}`" for t in f.model_types)
        rows.append(
            f"| {f.name} | {types} | {yes} | {moe_awq if f.moe else yes} | "
            f"{yes if f.trtllm_checkpoint else no} |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(support_matrix(), end="")
