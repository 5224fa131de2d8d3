"""``auto_quantize``: per-layer mixed precision under an effective-bits budget.

The technique is :func:`optimizer.techniques.auto_quantize.auto_quantize`. The TensorRT-LLM
export is ``quant_algo: MIXED_PRECISION`` with the per-layer choice in ``quant_cfg.json``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from optimizer import architectures
from optimizer.formats import FORMATS, check_block_size
from optimizer.plan import Environment, LayerFormat, ModelPlan, Quantization
from optimizer.stages.base import Stage, StageProblem, StageResult, quantizing_problems
from optimizer.techniques.auto_quantize import (
    AutoQuantizeConfig,
    auto_quantize,
    resolved_cost_model,
)

if TYPE_CHECKING:
    from optimizer.context import StageContext


class AutoQuantize(Stage, AutoQuantizeConfig):
    """Search per-layer formats under an effective-bits budget."""

    name = "auto_quantize"
    transforms_model = True
    imports = ("modelopt.torch.quantization",)
    needs_calibration = True

    def plan(self, prev: ModelPlan, env: Environment) -> tuple[ModelPlan, list[StageProblem]]:
        plan, problems = super().plan(prev, env)
        # (an MoE is fine: ModelOpt makes one choice for all expert projections of a block,
        # the one format per block the gate's rebuild reads)
        problems += quantizing_problems(prev)
        model_type = prev.dims.model_type if prev.dims is not None else None
        if prev.dims is not None:
            moe = architectures.is_moe(model_type)
            if self.cost_model == "active_moe" and not moe:
                problems.append(
                    (
                        "cost_model",
                        f"active_moe weighs routed experts' weights; a {model_type} model has "
                        "no routed experts (use weight or auto)",
                    )
                )
            if self.active_moe_expert_ratio is not None and (
                resolved_cost_model(self, moe) != "active_moe"
            ):
                problems.append(
                    (
                        "active_moe_expert_ratio",
                        "applies to cost_model active_moe only (auto means active_moe on a "
                        "mixture-of-experts model)",
                    )
                )
        for fmt in self.formats:
            if FORMATS[fmt].needs_gpu and env.gpu is False:
                problems.append(("formats", f"{fmt} needs a CUDA GPU and this machine has none"))
            problems += [
                ("formats", m) for m in check_block_size(fmt, self.group_for(fmt), prev.config)
            ]
        if self.effective_bits < self.lowest_bits:
            problems.append(
                (
                    "effective_bits",
                    f"{self.effective_bits} is below {self.lowest_bits}, the fewest bits "
                    "the candidate formats can reach; the search would be infeasible",
                )
            )
        quantization = Quantization(
            by=f"auto_quantize over {', '.join(self.formats)}",
            formats=tuple(
                LayerFormat(format=f, group_size=self.group_for(f)) for f in self.formats
            ),
            trtllm_algo="MIXED_PRECISION",
        )
        return plan.but(quantization=quantization), problems

    def run(self, ctx: StageContext) -> StageResult:
        from optimizer.calibration import batches
        from optimizer.techniques.unfused_experts import unfuse_experts, unfused_experts

        assert ctx.recipe.calibration is not None
        tokens = ctx.calibration_tokens()
        model = ctx.model()
        # ModelOpt quantizes, scores and exports MoE experts one module each, as in ptq
        unfused = unfuse_experts(model)
        if unfused:
            ctx.log.info("unfused the experts of %d MoE blocks for quantization", len(unfused))
        model, metrics = auto_quantize(
            model,
            self,
            list(batches(tokens, ctx.calibration_batch_size())),
            # (under model.max_memory the loader has unfused them already)
            moe=bool(unfused_experts(model)),
        )
        ctx.state.model = model
        ctx.log.info(
            "auto_quantize chose %s at %.2f effective bits in %.1f s",
            metrics["formats_chosen"],
            metrics["effective_bits"] or float("nan"),
            metrics["search_seconds"],
        )
        return StageResult(metrics=metrics)
