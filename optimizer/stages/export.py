"""``export``: TensorRT-LLM checkpoint and/or unified Hugging Face checkpoint via ModelOpt."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from optimizer.stages.base import Stage, StageResult, register
from optimizer.trtllm import facts

if TYPE_CHECKING:
    from optimizer.context import StageContext


class TrtllmCheckpointSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tp: int = Field(1, ge=1, description="tensor-parallel size (one rank file per GPU)")
    pp: int = Field(1, ge=1, description="pipeline-parallel size")


def _check_parallelism(spec: TrtllmCheckpointSpec, config: dict) -> list[str]:
    """TP must split attention and KV heads evenly; PP must split the layers evenly."""
    problems = []
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    kv = kv or heads
    if heads and heads % spec.tp:
        problems.append(f"tp={spec.tp} does not divide the model's {heads} attention heads")
    elif kv and kv % spec.tp:
        # TensorRT-LLM could replicate KV heads, but ModelOpt splits K/V rows evenly instead.
        problems.append(
            f"tp={spec.tp} does not divide the model's {kv} KV heads (ModelOpt's export "
            "cannot replicate KV heads across ranks)"
        )
    layers = config.get("num_hidden_layers")
    if layers and layers % spec.pp:
        problems.append(f"pp={spec.pp} does not divide the model's {layers} layers")
    return problems


@register
class Export(Stage):
    """Write deployable checkpoints of the current model."""

    name = "export"
    invalidates_model = True  # export_hf_checkpoint packs the weights of the live model
    artifact_keys = ("trtllm_checkpoint", "hf_checkpoint")

    trtllm_checkpoint: TrtllmCheckpointSpec | None = Field(
        default_factory=TrtllmCheckpointSpec,
        description="TensorRT-LLM checkpoint for trtllm-build (null to skip)",
    )
    hf_checkpoint: bool = Field(
        False, description="unified HF checkpoint for TensorRT-LLM's PyTorch backend, vLLM, SGLang"
    )

    def check(self, recipe, before, env):
        problems = super().check(recipe, before, env)
        if self.trtllm_checkpoint is None and not self.hf_checkpoint:
            problems.append(("", "exports nothing: enable trtllm_checkpoint or hf_checkpoint"))
        spec = self.trtllm_checkpoint
        if spec is not None:
            for stage in before:
                problems += [
                    ("trtllm_checkpoint", m)
                    for m in stage.trtllm_problems(spec.tp, env.model_config)
                ]
                algo = stage.trtllm_quant_algo()
                if algo is not None and algo[0] is None:
                    problems.append(
                        (
                            "trtllm_checkpoint",
                            f"{algo[1]} has no {facts.TRTLLM} "
                            "quant_algo, so trtllm-build would reject the checkpoint; set "
                            "trtllm_checkpoint: null and hf_checkpoint: true (TensorRT-LLM "
                            "PyTorch backend, vLLM, SGLang)",
                        )
                    )
            if env.model_config is not None:
                problems += [
                    ("trtllm_checkpoint", m) for m in _check_parallelism(spec, env.model_config)
                ]
        return problems

    def run(self, ctx: StageContext) -> StageResult:
        from optimizer import trtllm
        from optimizer.models import cast_to_storage, torch_dtype

        model = ctx.model()
        dtype = torch_dtype(ctx.recipe.model.dtype)
        # A model computing in float32 for a bf16 recipe (optimizer.hardware.compute_dtype) is
        # rounded first: export_hf_checkpoint writes unquantized tensors in the model's own
        # dtype, whatever `dtype` says. Export invalidates the live model anyway.
        cast_to_storage(model, ctx.recipe.model.dtype, ctx.state.compute_dtype)
        result = StageResult()
        if self.trtllm_checkpoint is not None:
            from modelopt.torch.export import export_tensorrt_llm_checkpoint
            from modelopt.torch.export.model_utils import get_model_type

            out = ctx.new_output("trtllm_checkpoint")
            spec = self.trtllm_checkpoint
            export_tensorrt_llm_checkpoint(
                model,
                get_model_type(model),
                dtype,
                out,
                inference_tensor_parallel=spec.tp,
                inference_pipeline_parallel=spec.pp,
            )
            # ModelOpt reads rope settings from attributes transformers 5 no longer sets.
            trtllm.apply_rope_settings(out, model.config)
            problems = trtllm.check_checkpoint(out)
            if problems:
                raise RuntimeError(
                    "exported TensorRT-LLM checkpoint is invalid:\n  "
                    + "\n  ".join(p.message for p in problems)
                )
            ctx.tokenizer().save_pretrained(out)
            result.outputs["trtllm_checkpoint"] = out
            result.metrics["trtllm_checkpoint"] = trtllm.summarize(out)
        if self.hf_checkpoint:
            from modelopt.torch.export import export_hf_checkpoint

            out = ctx.new_output("hf_checkpoint")
            export_hf_checkpoint(model, dtype=dtype, export_dir=out)
            ctx.tokenizer().save_pretrained(out)
            result.outputs["hf_checkpoint"] = out
            result.metrics["hf_checkpoint_bytes"] = sum(
                f.stat().st_size for f in out.rglob("*") if f.is_file()
            )
        return result
