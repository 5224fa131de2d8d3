"""``sparsify``: 2:4 weight sparsity with ModelOpt (optimizer/techniques/sparsify.py).

``method: sparsegpt`` (the default) reads the recipe's calibration data; ``magnitude`` needs
none. The plan records ``sparsity: "2:4"``: a ``build`` passes ``--weight_sparsity`` to
trtllm-build (TensorRT-LLM <= 1.2 engines, the only runtime that uses it) and ``deploy`` warns
that TensorRT-LLM >= 1.3, vLLM and SGLang serve the unified HF checkpoint dense.

Put it before quantization: ``sparsify -> [distill] -> ptq -> [qat] -> export`` keeps the zeros
(training keeps them, quantization maps 0 to 0); sparsifying a quantized model is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from optimizer.plan import Environment, ModelPlan
from optimizer.stages.base import Stage, StageProblem, StageResult
from optimizer.techniques.sparsify import (
    SparsifyConfig,
    llama_linear_shapes,
    shape_problems,
    sparsify,
    targeted,
    unmatched_exclusions,
)

if TYPE_CHECKING:
    from optimizer.context import StageContext


class Sparsify(Stage, SparsifyConfig):
    """Zero two of every four weights along the input dimension of the linear layers."""

    name = "sparsify"
    transforms_model = True
    imports = ("modelopt.torch.sparsity",)

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.method == "sparsegpt"

    def plan(self, prev: ModelPlan, env: Environment) -> tuple[ModelPlan, list[StageProblem]]:
        plan, problems = super().plan(prev, env)
        if prev.quantization is not None:
            problems.append(
                (
                    "",
                    f"sparsify comes after a quantizing stage ({prev.quantization.by}): the "
                    "scales were calibrated on the dense weights and ModelOpt cannot sparsify a "
                    "quantized model; put sparsify before ptq (sparsify -> ptq keeps the zeros)",
                )
            )
        if prev.sparsity is not None:
            problems.append(
                ("", f"the model is already {prev.sparsity} sparse (an earlier sparsify stage)")
            )
        shapes = llama_linear_shapes(prev.config) if prev.config else None
        if shapes is not None:  # other layouts are checked on the loaded model
            names = list(shapes)
            unmatched = unmatched_exclusions(names, self.exclude)
            if unmatched:
                problems.append(
                    (
                        "exclude",
                        f"{unmatched[0]!r} matches no linear layer of the model (they look "
                        f"like 'model.layers.0.mlp.down_proj'; globs match whole names, "
                        "e.g. '*layers.0.*')",
                    )
                )
            targets = targeted(names, self.exclude)
            if not targets:
                problems.append(("exclude", "leaves no linear layer to sparsify"))
            problems += [
                ("exclude", m) for m in shape_problems({n: shapes[n] for n in targets}, self.method)
            ]
        return plan.but(sparsity=self.pattern), problems

    def run(self, ctx: StageContext) -> StageResult:
        from optimizer.calibration import batches

        data = None
        if self.method == "sparsegpt":
            assert ctx.recipe.calibration is not None  # plan() refuses a recipe without it
            data = list(batches(ctx.calibration_tokens(), ctx.calibration_batch_size()))
        metrics = sparsify(ctx.model(), self, data)
        ctx.log.info(
            "%s: %d linear layers %s sparse (%.1f %% zeros) in %.1f s; dense: %s",
            self.method,
            metrics["sparsified_layers"],
            self.pattern,
            100 * metrics["zero_fraction"],
            metrics["seconds"],
            ", ".join(metrics["dense_layers"]) or "none",
        )
        if metrics["dense_experts"]:
            ctx.log.warning(
                "the experts of %d MoE blocks (%.0f %% of the parameters) stay dense: ModelOpt "
                "sparsifies nn.Linear layers, and transformers 5 fuses the experts",
                len(metrics["dense_experts"]),
                100 * metrics["dense_expert_fraction"],
            )
        return StageResult(metrics=metrics)
