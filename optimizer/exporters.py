"""Deployable checkpoints of a live (ModelOpt-quantized or plain) model, usable without the
runner: a TensorRT-LLM checkpoint (``config.json`` + ``rank{r}.safetensors``) and the unified
Hugging Face checkpoint (TensorRT-LLM's PyTorch backend, vLLM, SGLang).

ModelOpt's exporters pack the model's weights in place: the model is not usable afterwards.

A model whose weights accelerate offloads (``model.max_memory``: meta tensors, the values in
the offload hooks) exports too: ModelOpt 0.47's ``export_hf_checkpoint`` streams it layer by
layer itself; its TensorRT-LLM exporter reads every module's weights directly, so
:func:`offload_aware_trtllm_export` opens each module's weights while ModelOpt converts it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path
from typing import Any

from optimizer.errors import OptimizerError

#: The per-module converters of ModelOpt's TensorRT-LLM exporter
#: (modelopt/torch/export/model_config_export.py calls them by these names); each reads
#: its module's weights, and the result holds tensors (views of them, or derived).
TRTLLM_BUILDERS = (
    "build_embedding_config",
    "build_decoder_config",
    "build_layernorm_config",
    "build_linear_config",
    "build_conv_config",
)


def _to_cpu(obj: Any) -> Any:
    """Every tensor in a ModelOpt layer config (nested dataclasses, lists, dicts) copied to
    host memory, in place where it can be. Always a copy, also of a host tensor: nothing in
    the config aliases the module's weights then, exactly as on a GPU (and the CPU tests see
    what the GPU runs see)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            setattr(obj, f.name, _to_cpu(getattr(obj, f.name)))
        return obj
    if isinstance(obj, list):
        return [_to_cpu(x) for x in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def offload_aware_trtllm_export():
    """ModelOpt's TensorRT-LLM export over an accelerate-offloaded model.

    ModelOpt builds the whole checkpoint in memory from each module's weights, which are
    ``meta`` on offloaded modules ("Cannot copy out of meta tensor"). For the duration, each
    of its per-module converters (:data:`TRTLLM_BUILDERS`) runs with that module's weights
    materialized (:func:`optimizer.models.weights_materialized`, nothing written back), and
    what it returns is moved to host memory at once, so the GPUs hold at most one module's
    weights more than the placement gave them (ModelOpt moves every tensor to the host
    before writing anyway; the FP8/INT packing then runs there). Process-wide for the
    duration: the converters are names in ModelOpt's module, restored on exit.
    """
    from modelopt.torch.export import model_config_export as mce

    from optimizer.models import weights_materialized

    originals = {name: getattr(mce, name) for name in TRTLLM_BUILDERS if hasattr(mce, name)}

    def opened(convert):
        @functools.wraps(convert)
        def build(module, *args, **kwargs):
            with weights_materialized(module):
                return _to_cpu(convert(module, *args, **kwargs))

        return build

    for name, convert in originals.items():
        setattr(mce, name, opened(convert))
    try:
        yield
    finally:
        for name, convert in originals.items():
            setattr(mce, name, convert)


def export_trtllm_checkpoint(model, out: Path, *, dtype: str, tp: int = 1, pp: int = 1) -> dict:
    """Write a TensorRT-LLM checkpoint of ``model`` into ``out`` and validate it; returns its
    summary (quant_algo, kv cache algo, world size, bytes). RuntimeError if ModelOpt wrote a
    checkpoint trtllm-build would reject."""
    from modelopt.torch.export import export_tensorrt_llm_checkpoint
    from modelopt.torch.export.model_utils import get_model_type

    from optimizer import trtllm
    from optimizer.models import is_offloaded, torch_dtype

    with offload_aware_trtllm_export() if is_offloaded(model) else contextlib.nullcontext():
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


def _pre_quant_scaled(model) -> list[str]:
    """Modules whose input quantizer carries an AWQ / SmoothQuant pre-quant scale."""
    return [
        name
        for name, module in model.named_modules()
        if getattr(getattr(module, "input_quantizer", None), "pre_quant_scale", None) is not None
    ]


def export_unified_hf_checkpoint(model, out: Path, *, dtype: str) -> dict[str, Any]:
    """Write the unified HF checkpoint (``hf_quant_config.json`` when quantized). An
    offloaded model takes ModelOpt's streaming path (one layer materialized at a time)."""
    from modelopt.torch.export import export_hf_checkpoint

    from optimizer.models import is_offloaded, torch_dtype

    if is_offloaded(model) and (smoothed := _pre_quant_scaled(model)):
        raise OptimizerError(
            f"the unified HF export of an offloaded model with AWQ / SmoothQuant pre-quant "
            f"scales ({smoothed[0]}, {len(smoothed)} in all) fails in ModelOpt 0.47: it "
            "re-smooths fused layers with a forward over their offloaded (meta) weights. The "
            "quantized model is saved: resume with a model.max_memory.gpu that holds the "
            "model (no offload), or quantize to a format without pre-quant scales (fp8, nvfp4)"
        )
    export_hf_checkpoint(model, dtype=torch_dtype(dtype), export_dir=out)
    return {"bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file())}
