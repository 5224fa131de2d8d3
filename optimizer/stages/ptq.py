"""``ptq``: post-training quantization with ModelOpt (``mtq.quantize`` + calibration).

The recipe section is :class:`~optimizer.techniques.quantize.QuantizeConfig`: a simple
``format`` name (see optimizer/formats.py) with options, or one of ModelOpt's own shipped
recipes by name (``modelopt_recipe: general/ptq/fp8_default-kv_fp8``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from optimizer import architectures
from optimizer.errors import OptimizerError
from optimizer.formats import FORMATS, check_block_size
from optimizer.plan import Environment, LayerFormat, ModelPlan, Quantization
from optimizer.stages.base import Stage, StageProblem, StageResult, quantizing_problems
from optimizer.techniques.quantize import QuantizeConfig, modelopt_recipe_path, quantize

if TYPE_CHECKING:
    from optimizer.context import StageContext


class PTQ(Stage, QuantizeConfig):
    """Quantize the model and calibrate its scales on the recipe's calibration data."""

    name = "ptq"
    transforms_model = True
    imports = ("modelopt.torch.quantization",)
    needs_calibration = True

    def plan(self, prev: ModelPlan, env: Environment) -> tuple[ModelPlan, list[StageProblem]]:
        plan, problems = super().plan(prev, env)
        problems += quantizing_problems(prev)
        if self.modelopt_recipe is not None and modelopt_recipe_path(self.modelopt_recipe) is None:
            problems.append(
                (
                    "modelopt_recipe",
                    f"no ModelOpt recipe named {self.modelopt_recipe!r} in "
                    "modelopt_recipes (e.g. general/ptq/fp8_default-kv_fp8)",
                )
            )
        if self.needs_gpu and env.gpu is False:
            what = (
                self.format
                if self.format in FORMATS and FORMATS[self.format].needs_gpu
                else f"kv_cache {self.kv_cache}"
            )
            problems.append(
                (
                    "",
                    f"{what} needs a CUDA GPU (ModelOpt's FP4 kernels), and this machine "
                    "has none; run it on a GPU machine (validate for one with "
                    "`optimize validate --device gpu`)",
                )
            )
        if self.format is not None:
            problems += [
                ("group_size" if self.group_size else "format", m)
                for m in check_block_size(self.format, self.group_size, prev.config)
            ]
        model_type = prev.dims.model_type if prev.dims is not None else None
        if problem := architectures.moe_exclude_problem(model_type, list(self.exclude)):
            problems.append(("exclude", problem))
        return plan.but(quantization=self._quantization()), problems

    def _quantization(self) -> Quantization:
        kv = None if self.kv_cache == "none" else self.kv_cache
        if self.format is None:
            return Quantization(
                by=f"modelopt_recipe {self.modelopt_recipe}",
                trtllm_algo="unknown",  # the checkpoint validator checks it after export
                kv_cache=kv,
                exclude=tuple(self.exclude),
            )
        spec = FORMATS[self.format]
        return Quantization(
            by=f"format {self.format}",
            formats=(LayerFormat(format=self.format, group_size=self.group_size),),
            trtllm_algo=spec.trtllm_algo,
            trtllm_note=spec.trtllm_note,
            kv_cache=kv,
            exclude=tuple(self.exclude),
        )

    def run(self, ctx: StageContext) -> StageResult:
        from optimizer.techniques.sparsify import lost_zeros, sparse_masks
        from optimizer.techniques.unfused_experts import unfuse_experts

        model = ctx.model()
        # ModelOpt quantizes and exports MoE experts one module each (techniques.unfused_experts)
        if unfused := unfuse_experts(model):
            ctx.log.info("unfused the experts of %d MoE blocks for quantization", len(unfused))
        # A 2:4-sparse model must stay so: quantization maps 0 to 0, but an algorithm that
        # rewrites weights (GPTQ in a ModelOpt recipe) would not.
        masks = sparse_masks(model) if ctx.plan is not None and ctx.plan.sparsity else {}
        metrics = quantize(model, self, ctx.forward_loop())
        lost = lost_zeros(model, masks)
        if lost:
            raise OptimizerError(
                f"quantizing lost the {ctx.plan.sparsity} zeros of {len(lost)} layer(s), e.g. "
                f"{lost[0]}: {self.format or self.modelopt_recipe} rewrites the weights; choose "
                "a format and algorithm that keep them (fp8, int4_awq and int8_sq do)"
            )
        if masks:
            metrics["sparse_layers"] = len(masks)
        metrics["calibration_batch_size"] = ctx.calibration_choice.batch_size
        ctx.log.info(
            "quantized %d linear layers in %.1f s",
            metrics["quantized_layers"],
            metrics["calibration_seconds"],
        )
        cold = (metrics.get("moe_calibration") or {}).get("experts_without_tokens")
        if cold:
            ctx.log.warning(
                "%d of %d experts received no calibration tokens (first: %s): ModelOpt "
                "calibrated their weight scales from their weights, but their activations were "
                "never seen; more (or more varied) calibration data covers them",
                len(cold),
                metrics["moe_calibration"]["experts"],
                cold[0],
            )
        return StageResult(metrics=metrics)
