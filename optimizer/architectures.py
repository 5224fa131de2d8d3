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
  formats cannot be exported for an MoE model.
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


def moe_export_problem(model_type: str | None, formats: list[str]) -> str | None:
    """Why the unified export of an MoE model quantized as ``formats`` would fail."""
    fam = family(model_type)
    awq = [f for f in formats if "awq" in f]
    if fam is None or not fam.moe or not awq:
        return None
    return (
        f"{', '.join(awq)} cannot be exported for {fam.name}: ModelOpt 0.47's AWQ re-smoothing "
        "at export indexes experts one by one, and transformers 5 fuses them; use fp8, "
        "nvfp4 or int8_sq"
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
