"""Deployable checkpoints of a live (ModelOpt-quantized or plain) model, usable without the
runner: a TensorRT-LLM checkpoint (``config.json`` + ``rank{r}.safetensors``) and the unified
Hugging Face checkpoint (TensorRT-LLM's PyTorch backend, vLLM, SGLang).

ModelOpt's exporters pack the model's weights in place: the model is not usable afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def export_trtllm_checkpoint(model, out: Path, *, dtype: str, tp: int = 1, pp: int = 1) -> dict:
    """Write a TensorRT-LLM checkpoint of ``model`` into ``out`` and validate it; returns its
    summary (quant_algo, kv cache algo, world size, bytes). RuntimeError if ModelOpt wrote a
    checkpoint trtllm-build would reject."""
    from modelopt.torch.export import export_tensorrt_llm_checkpoint
    from modelopt.torch.export.model_utils import get_model_type

    from optimizer import trtllm
    from optimizer.models import torch_dtype

    export_tensorrt_llm_checkpoint(
        model,
        get_model_type(model),
        torch_dtype(dtype),
        out,
        inference_tensor_parallel=tp,
        inference_pipeline_parallel=pp,
    )
    # ModelOpt reads rope settings from attributes transformers 5 no longer sets, and writes
    # no qwen_type / attn_bias for Qwen.
    trtllm.apply_rope_settings(out, model.config)
    trtllm.apply_family_settings(out, model.config)
    problems = trtllm.check_checkpoint(out)
    if problems:
        raise RuntimeError(
            "exported TensorRT-LLM checkpoint is invalid:\n  " + "\n  ".join(map(str, problems))
        )
    return trtllm.summarize(out)


def export_unified_hf_checkpoint(model, out: Path, *, dtype: str) -> dict[str, Any]:
    """Write the unified HF checkpoint (``hf_quant_config.json`` when quantized)."""
    from modelopt.torch.export import export_hf_checkpoint

    from optimizer.models import torch_dtype

    export_hf_checkpoint(model, dtype=torch_dtype(dtype), export_dir=out)
    return {"bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file())}
