"""``export``: TensorRT-LLM checkpoint and/or unified Hugging Face checkpoint via ModelOpt
(optimizer/exporters.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from optimizer import architectures
from optimizer.formats import FORMATS, check_block_size, trtllm_layout_problems
from optimizer.plan import (
    Environment,
    Exports,
    ModelDims,
    ModelPlan,
    Quantization,
    TrtllmCheckpoint,
)
from optimizer.stages.base import Stage, StageProblem, StageResult
from optimizer.trtllm import facts

if TYPE_CHECKING:
    from optimizer.context import StageContext


class TrtllmCheckpointSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tp: int = Field(1, ge=1, description="tensor-parallel size (one rank file per GPU)")
    pp: int = Field(1, ge=1, description="pipeline-parallel size")


def parallelism_problems(tp: int, pp: int, dims: ModelDims) -> list[str]:
    """TP must split attention and KV heads evenly; PP must split the layers evenly."""
    problems = []
    heads, kv = dims.num_attention_heads, dims.num_key_value_heads
    kv = kv or heads
    if heads and heads % tp:
        problems.append(f"tp={tp} does not divide the model's {heads} attention heads")
    elif kv and kv % tp:
        # TensorRT-LLM could replicate KV heads, but ModelOpt splits K/V rows evenly instead.
        problems.append(
            f"tp={tp} does not divide the model's {kv} KV heads (ModelOpt's export "
            "cannot replicate KV heads across ranks)"
        )
    layers = dims.num_hidden_layers
    if layers and layers % pp:
        problems.append(f"pp={pp} does not divide the model's {layers} layers")
    return problems


def trtllm_quantization_problems(quant: Quantization, tp: int, config: dict | None) -> list[str]:
    """Why a TensorRT-LLM (engine path) checkpoint of a model quantized as ``quant`` would
    not build."""
    if quant.trtllm_algo is None:
        note = f" ({quant.trtllm_note})" if quant.trtllm_note else ""
        return [
            f"{quant.by}{note} has no {facts.TRTLLM} quant_algo, so trtllm-build would "
            "reject the checkpoint; set trtllm_checkpoint: null and hf_checkpoint: true "
            "(TensorRT-LLM PyTorch backend, vLLM, SGLang)"
        ]
    problems = []
    for layer in quant.formats:
        if check_block_size(layer.format, layer.group_size, config):
            continue  # already reported against the format; one message per cause
        problems += trtllm_layout_problems(layer.format, layer.group_size, tp, config)
    if quant.exclude:
        problems += [
            p
            for p in (
                facts.exclusion_problem(FORMATS[layer.format].trtllm_algo)
                for layer in quant.formats
            )
            if p
        ]
    return problems


class Export(Stage):
    """Write deployable checkpoints of the current model."""

    name = "export"
    invalidates_model = True  # export_hf_checkpoint packs the weights of the live model
    artifact_keys = ("trtllm_checkpoint", "hf_checkpoint")
    imports = ("modelopt.torch.export",)

    trtllm_checkpoint: TrtllmCheckpointSpec | None = Field(
        default_factory=TrtllmCheckpointSpec,
        description="TensorRT-LLM checkpoint for trtllm-build (null to skip)",
    )
    hf_checkpoint: bool = Field(
        False, description="unified HF checkpoint for TensorRT-LLM's PyTorch backend, vLLM, SGLang"
    )

    def model_copies(self, before: ModelPlan | None) -> float:
        # a quantized export is at least a quarter of the model (4-bit weights)
        size = 0.25 if before is not None and before.quantization is not None else 1.0
        return size * ((self.trtllm_checkpoint is not None) + self.hf_checkpoint)

    def plan(self, prev: ModelPlan, env: Environment) -> tuple[ModelPlan, list[StageProblem]]:
        plan, problems = super().plan(prev, env)
        if self.trtllm_checkpoint is None and not self.hf_checkpoint:
            problems.append(("", "exports nothing: enable trtllm_checkpoint or hf_checkpoint"))
        spec = self.trtllm_checkpoint
        model_type = prev.dims.model_type if prev.dims is not None else None
        family_problem = architectures.trtllm_checkpoint_problem(model_type)
        if spec is not None and family_problem:
            problems.append(("trtllm_checkpoint", family_problem))
        if prev.quantization is not None and (
            problem := architectures.moe_export_problem(
                model_type, [f.format for f in prev.quantization.formats]
            )
        ):
            problems.append(("", problem))
        if spec is not None and not family_problem:  # (one message: no layout for no writer)
            if prev.quantization is not None:
                problems += [
                    ("trtllm_checkpoint", m)
                    for m in trtllm_quantization_problems(prev.quantization, spec.tp, prev.config)
                ]
            if prev.dims is not None:
                problems += [
                    ("trtllm_checkpoint", m)
                    for m in parallelism_problems(spec.tp, spec.pp, prev.dims)
                ]
        exports = Exports(
            trtllm_checkpoint=TrtllmCheckpoint(tp=spec.tp, pp=spec.pp) if spec else None,
            hf_checkpoint=self.hf_checkpoint,
        )
        return plan.but(exports=exports), problems

    def run(self, ctx: StageContext) -> StageResult:
        from optimizer.exporters import export_trtllm_checkpoint, export_unified_hf_checkpoint
        from optimizer.models import cast_to_storage

        model = ctx.model()
        dtype = ctx.recipe.model.dtype
        # A model computing in float32 for a bf16 recipe (optimizer.hardware.compute_dtype) is
        # rounded first: export_hf_checkpoint writes unquantized tensors in the model's own
        # dtype, whatever `dtype` says. Export invalidates the live model anyway.
        cast_to_storage(model, dtype, ctx.state.compute_dtype)
        result = StageResult()
        if self.trtllm_checkpoint is not None:
            out = ctx.new_output("trtllm_checkpoint")
            spec = self.trtllm_checkpoint
            summary = export_trtllm_checkpoint(model, out, dtype=dtype, tp=spec.tp, pp=spec.pp)
            ctx.tokenizer().save_pretrained(out)
            result.outputs["trtllm_checkpoint"] = out
            result.metrics["trtllm_checkpoint"] = summary
            if self.hf_checkpoint:
                # ModelOpt's TensorRT-LLM export fuses q/k/v and gate/up in place (shared
                # amax, re-smoothed weights and pre-quant scales), which the unified export
                # would then write: the HF checkpoint would depend on whether a TensorRT-LLM
                # checkpoint was asked for, and differ from what a search trial judged. The
                # unified export starts from the saved hand-over state instead.
                del model  # (the only other reference is ctx.state.model)
                model = self._reloaded(ctx)
                cast_to_storage(model, dtype, ctx.state.compute_dtype)
        if self.hf_checkpoint:
            out = ctx.new_output("hf_checkpoint")
            summary = export_unified_hf_checkpoint(model, out, dtype=dtype)
            ctx.tokenizer().save_pretrained(out)
            result.outputs["hf_checkpoint"] = out
            result.metrics["hf_checkpoint_bytes"] = summary["bytes"]
        return result

    @staticmethod
    def _reloaded(ctx: StageContext):
        """The model as the previous stage left it, read back from its hand-over checkpoint
        (``ctx.state.checkpoint``), the one in memory dropped first (two copies may not fit)."""
        ctx.state.drop_model()
        return ctx.model()
