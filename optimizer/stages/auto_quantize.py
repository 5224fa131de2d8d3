"""``auto_quantize``: per-layer mixed precision under an effective-bits budget.

ModelOpt's ``mtq.auto_quantize`` scores each layer's sensitivity to each candidate format on
the calibration data (gradient or KL-divergence) and picks, per layer, the format (or none)
that minimises the loss while the model's effective weight bits stay under the budget. The
TensorRT-LLM export is ``quant_algo: MIXED_PRECISION`` with the per-layer choice in
``quant_cfg.json``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from optimizer.errors import OptimizerError
from optimizer.formats import FORMATS, build_config, check_block_size, trtllm_layout_problems
from optimizer.stages.base import Stage, StageResult, register

if TYPE_CHECKING:
    from optimizer.context import StageContext

#: Formats TensorRT-LLM 1.2 can build per layer inside MIXED_PRECISION.
MIXABLE = ("fp8", "int8_sq", "int4_awq", "w4a8_awq", "nvfp4")


@register
class AutoQuantize(Stage):
    """Search per-layer formats under an effective-bits budget."""

    name = "auto_quantize"
    transforms_model = True
    needs_calibration = True

    effective_bits: float = Field(4.8, gt=0, le=16, description="average weight bits budget")
    formats: list[str] = Field(
        default_factory=lambda: ["fp8", "int4_awq"],
        min_length=1,
        description=f"candidate formats per layer, from: {', '.join(MIXABLE)}",
    )
    method: Literal["gradient", "kl_div"] = Field("gradient", description="sensitivity score")
    group_size: int | None = Field(
        None, gt=0, description="weight block size for int4_awq / w4a8_awq"
    )
    num_score_steps: int | None = Field(
        None, gt=0, description="batches used for scoring (default: all)"
    )

    @field_validator("formats")
    @classmethod
    def _known(cls, formats: list[str]) -> list[str]:
        unknown = [f for f in formats if f not in MIXABLE]
        if unknown:
            raise ValueError(
                f"{', '.join(unknown)} cannot be mixed per layer; choose from {', '.join(MIXABLE)}"
            )
        return formats

    def _group(self, fmt: str) -> int | None:
        return self.group_size if FORMATS[fmt].group_size_choosable else None

    def check(self, recipe, before, env):
        problems = super().check(recipe, before, env)
        if any(s.name in ("ptq", "auto_quantize") for s in before):
            problems.append(("", "the model is already quantized by an earlier stage"))
        for fmt in self.formats:
            if FORMATS[fmt].needs_gpu and env.gpu is False:
                problems.append(("formats", f"{fmt} needs a CUDA GPU and this machine has none"))
            problems += [
                ("formats", m) for m in check_block_size(fmt, self._group(fmt), env.model_config)
            ]
        lowest = 4.0 if any(f in ("int4_awq", "w4a8_awq", "nvfp4") for f in self.formats) else 8.0
        if self.effective_bits < lowest:
            problems.append(
                (
                    "effective_bits",
                    f"{self.effective_bits} is below {lowest}, the fewest bits "
                    "the candidate formats can reach; the search would be infeasible",
                )
            )
        return problems

    def trtllm_quant_algo(self):
        return "MIXED_PRECISION", f"auto_quantize over {', '.join(self.formats)}"

    def trtllm_problems(self, tp, model_config):
        problems = []
        for fmt in self.formats:
            problems += trtllm_layout_problems(fmt, self._group(fmt), tp, model_config)
        return problems

    def run(self, ctx: StageContext) -> StageResult:
        import modelopt.torch.quantization as mtq

        from optimizer.calibration import batches

        model = ctx.model()
        tokens = ctx.calibration_tokens()
        assert ctx.recipe.calibration is not None
        loader = [
            {"input_ids": b, "labels": b}
            for b in batches(tokens, ctx.recipe.calibration.batch_size)
        ]
        device = next(model.parameters()).device
        candidates = [build_config(f, group_size=self._group(f)) for f in self.formats]

        def forward_step(m, batch):
            return m(**{k: v.to(device) for k, v in batch.items()})

        t0 = time.time()
        try:
            model, state = self._search(mtq, model, loader, candidates, forward_step)
        except ValueError as e:
            if "infeasible" in str(e):  # the budget is the user's choice: bad input, not a crash
                raise OptimizerError(
                    f"effective_bits {self.effective_bits}: {e} Raise the budget."
                ) from None
            raise
        ctx.state.model = model
        seconds = time.time() - t0
        best = state.get("best", {})
        chosen = _format_counts(best.get("recipe", {}))
        ctx.log.info(
            "auto_quantize chose %s at %.2f effective bits in %.1f s",
            chosen,
            best.get("constraints", {}).get("effective_bits", float("nan")),
            seconds,
        )
        return StageResult(
            metrics={
                "effective_bits_budget": self.effective_bits,
                "effective_bits": best.get("constraints", {}).get("effective_bits"),
                "formats_chosen": chosen,
                "search_seconds": round(seconds, 3),
            }
        )

    def _search(self, mtq, model, loader, candidates, forward_step):
        return mtq.auto_quantize(
            model,
            constraints={"effective_bits": self.effective_bits},
            quantization_formats=candidates,
            data_loader=loader,
            forward_step=forward_step,
            loss_func=lambda output, batch: output.loss,
            disabled_layers=["*lm_head*"],  # TensorRT-LLM keeps lm_head in 16 bits
            num_calib_steps=len(loader),
            num_score_steps=min(self.num_score_steps or len(loader), len(loader)),
            method=self.method,
        )


def _format_counts(recipe: dict) -> dict[str, int]:
    """How many layers got each format (ModelOpt reports a per-layer recipe object)."""
    counts: dict[str, int] = {}
    for choice in recipe.values():
        label = str(choice)
        counts[label] = counts.get(label, 0) + 1
    return counts
