"""Per-layer mixed precision under an effective-bits budget (ModelOpt's ``mtq.auto_quantize``).

ModelOpt scores each layer's sensitivity to each candidate format on calibration batches
(gradient or KL-divergence) and picks, per layer, the format (or none) that minimises the
loss while the model's effective weight bits stay under the budget.

On a mixture-of-experts model (experts unfused first: techniques.unfused_experts) ModelOpt
groups every expert projection of a block into one choice, so a block's experts share one
format, and its ``active_moe`` cost model weighs the routed experts' weights by the share of
experts a token runs through (``top_k / num_experts`` from the config unless given): the
budget is then on the bits a token's computation reads, not on the bits stored.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from optimizer.errors import OptimizerError
from optimizer.formats import FORMAT_NAMES, FORMATS, build_config
from optimizer.trtllm.facts import MIXED_PRECISION_LAYER_ALGOS

#: Formats TensorRT-LLM 1.2 can build per layer inside MIXED_PRECISION (optimizer/trtllm/facts.py).
MIXABLE = tuple(f for f in FORMAT_NAMES if FORMATS[f].trtllm_algo in MIXED_PRECISION_LAYER_ALGOS)


class AutoQuantizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

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
    cost_model: Literal["auto", "weight", "active_moe"] = Field(
        "auto",
        description="what effective_bits averages over: weight (every stored weight), "
        "active_moe (routed experts' weights scaled by the share of experts a token uses); "
        "auto: active_moe on a mixture-of-experts model, weight otherwise",
    )
    active_moe_expert_ratio: float | None = Field(
        None,
        gt=0,
        le=1,
        description="experts a token uses / experts per block, for active_moe (default: "
        "top_k / num_experts from the model config)",
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

    def group_for(self, fmt: str) -> int | None:
        """The group size that applies to ``fmt`` (only formats that let one choose it)."""
        return self.group_size if FORMATS[fmt].group_size_choosable else None

    @property
    def lowest_bits(self) -> float:
        """The fewest effective bits the candidate formats can reach."""
        return 4.0 if any(f in ("int4_awq", "w4a8_awq", "nvfp4") for f in self.formats) else 8.0


def resolved_cost_model(config: AutoQuantizeConfig, moe: bool) -> str:
    """The cost model ``config`` asks for on a model that is (or is not) an MoE."""
    if config.cost_model == "auto":
        return "active_moe" if moe else "weight"
    return config.cost_model


def auto_quantize(
    model, config: AutoQuantizeConfig, batches: list[Any], *, moe: bool = False
) -> tuple[Any, dict]:
    """Search and apply per-layer formats; ``batches`` are ``[batch, seq]`` token tensors;
    ``moe``: the model's experts are routed (what ``cost_model: auto`` follows).

    Returns the quantized model (ModelOpt may return a new object) and a summary. An
    infeasible budget is the user's choice: OptimizerError, not a crash.
    """
    import modelopt.torch.quantization as mtq

    from optimizer.models import input_device

    loader = [{"input_ids": b, "labels": b} for b in batches]
    device = input_device(model)  # (not meta when the first layers are offloaded)
    candidates = [build_config(f, group_size=config.group_for(f)) for f in config.formats]

    def forward_step(m, batch):
        return m(**{k: v.to(device) for k, v in batch.items()})

    cost_model = resolved_cost_model(config, moe)
    constraints: dict[str, Any] = {
        "effective_bits": config.effective_bits,
        "cost_model": cost_model,
    }
    if config.active_moe_expert_ratio is not None:
        constraints["cost"] = {"active_moe_expert_ratio": config.active_moe_expert_ratio}
    t0 = time.time()
    try:
        model, state = mtq.auto_quantize(
            model,
            constraints=constraints,
            quantization_formats=candidates,
            data_loader=loader,
            forward_step=forward_step,
            loss_func=lambda output, batch: output.loss,
            disabled_layers=["*lm_head*"],  # TensorRT-LLM keeps lm_head in 16 bits
            num_calib_steps=len(loader),
            num_score_steps=min(config.num_score_steps or len(loader), len(loader)),
            method=config.method,
        )
    except ValueError as e:
        if "infeasible" in str(e):
            raise OptimizerError(
                f"effective_bits {config.effective_bits}: {e} Raise the budget."
            ) from None
        if "active_moe_expert_ratio" in str(e) or "cost constraints" in str(e):
            # ModelOpt's cost model refuses this model (e.g. no top-k / expert count in its
            # config): the recipe's cost_model / active_moe_expert_ratio are the user's to fix
            raise OptimizerError(f"cost_model {cost_model}: {e}") from None
        raise
    best = state.get("best", {})
    return model, {
        "effective_bits_budget": config.effective_bits,
        "cost_model": cost_model,
        "active_moe_expert_ratio": state.get("active_moe_expert_ratio"),
        "effective_bits": best.get("constraints", {}).get("effective_bits"),
        "formats_chosen": format_counts(best.get("recipe", {})),
        "search_seconds": round(time.time() - t0, 3),
    }


def format_counts(recipe: dict) -> dict[str, int]:
    """How many layers got each format (ModelOpt reports a per-layer recipe object)."""
    counts: dict[str, int] = {}
    for choice in recipe.values():
        label = str(choice)
        counts[label] = counts.get(label, 0) + 1
    return counts
