"""``prune``: structured pruning of a Llama-family model (Minitron-style importance from the
recipe's calibration data), see :mod:`optimizer.techniques.prune`.

The recipe section is :class:`~optimizer.techniques.prune.PruneConfig`: explicit sizes
(``ffn_hidden_size``, ``num_attention_heads``, ``num_key_value_heads``, ``hidden_size``,
``num_layers``) and/or ``params_fraction``. The plan after it carries the new dimensions, so
later stages check group sizes, tp and layer indices against the pruned model. The result is
a plain HF model (the runner saves it with ``save_pretrained``); follow it with ``distill``
(teacher: the model as loaded) to recover quality.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from optimizer.plan import Environment, ModelPlan
from optimizer.stages.base import Stage, StageProblem, StageResult
from optimizer.techniques.prune import (
    HF_KEY,
    SUPPORTED_MODEL_TYPES,
    PruneConfig,
    prune,
    resolve_targets,
)

if TYPE_CHECKING:
    from optimizer.context import StageContext


def new_dims(new: dict) -> dict:
    """The plan fields pruning changes (None: decided by the run), head_dim kept explicit."""
    return {k: new[k] for k in (*HF_KEY.values(), "head_dim") if k in new}


class Prune(Stage, PruneConfig):
    """Remove MLP neurons, attention heads, hidden channels and/or layers."""

    name = "prune"
    transforms_model = True
    imports = ("modelopt.torch.prune",)
    needs_calibration = True

    def plan(self, prev: ModelPlan, env: Environment) -> tuple[ModelPlan, list[StageProblem]]:
        plan, problems = super().plan(prev, env)
        # Pruning slices plain weights: ModelOpt state (quantizers, masks, a draft head) is
        # shaped for the unpruned model and would not survive it.
        if prev.quantization is not None:
            problems.append(
                (
                    "",
                    f"'prune' comes after a quantizing stage ({prev.quantization.by}): prune "
                    "the unquantized model, and put ptq after prune (and distill)",
                )
            )
        for what, present in (("sparsity", prev.sparsity), ("a draft head", prev.draft)):
            if present:
                problems.append(
                    ("", f"'prune' comes after a stage that added {what} ({present}); prune first")
                )
        dims = prev.dims
        if dims is None:
            return plan, problems
        if dims.model_type and dims.model_type not in SUPPORTED_MODEL_TYPES:
            problems.append(
                (
                    "",
                    f"prune knows the Llama layout ({', '.join(SUPPORTED_MODEL_TYPES)}); this "
                    f"model is {dims.model_type!r}",
                )
            )
            return plan, problems
        new, found, _ = resolve_targets(self, dims.model_dump())
        problems += found
        if new is None:  # the config lacks dimensions: what the stage sets is all it knows
            new = {HF_KEY[k]: v for k, v in self.explicit().items()}
            if self.params_fraction is not None:
                new |= {HF_KEY[a]: None for a in self.search if a not in self.explicit()}
            if self.num_key_value_heads is not None and self.num_attention_heads is None:
                new["num_attention_heads"] = None  # its query heads go with each KV group
        return plan.but(dims=dims.but(**new_dims(new))), problems

    def run(self, ctx: StageContext) -> StageResult:
        from optimizer import calibration

        assert ctx.recipe.calibration is not None  # plan() refuses a recipe without it
        model = ctx.model()
        batches = calibration.batches(ctx.calibration_tokens(), ctx.calibration_batch_size())
        summary = prune(model, self, batches)
        ctx.log.info(
            "pruned to %s: %.1f %% of %s parameters%s",
            ", ".join(f"{k} {v}" for k, v in summary["after"].items()),
            100 * summary["params_fraction"],
            f"{summary['params_before']:,}",
            f"; dropped layers {summary['removed_layers']}" if summary["removed_layers"] else "",
        )
        out = ctx.new_output("pruning")
        # Every kept index (large for MLP neurons): a file, not run.json.
        (out / "pruning.json").write_text(json.dumps(summary, indent=1) + "\n")
        metrics = {k: v for k, v in summary.items() if k != "kept"}
        return StageResult(outputs={"pruning": out}, metrics=metrics)
