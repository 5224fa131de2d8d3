"""``ptq``: post-training quantization with ModelOpt (``mtq.quantize`` + calibration)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from optimizer.stages.base import Stage, StageResult, register

if TYPE_CHECKING:
    from optimizer.context import StageContext


@dataclass(frozen=True)
class Format:
    """A simple format name and the ModelOpt preset that implements it."""

    preset: str
    trtllm_quant_algo: str
    summary: str


FORMATS: dict[str, Format] = {
    "fp8": Format(
        "FP8_DEFAULT_CFG", "FP8", "FP8 (E4M3) weights and activations, per-tensor scales"
    ),
}
KV_CACHE_PRESETS = {"fp8": "FP8_KV_CFG"}


@register
class PTQ(Stage):
    """Quantize the model and calibrate its scales on the recipe's calibration data."""

    name = "ptq"
    transforms_model = True
    needs_calibration = True

    format: Literal["fp8"] = Field(description="quantization format of weights and activations")
    kv_cache: Literal["none", "fp8"] = Field("none", description="KV-cache quantization")
    exclude: list[str] = Field(
        default_factory=list,
        description="module-name globs left unquantized, e.g. '*layers.0.mlp*' (lm_head always is)",
    )

    def check(self, recipe, before):
        problems = super().check(recipe, before)
        for s in before:
            if s.name == "ptq":
                problems.append(("", "the model is already quantized by an earlier ptq stage"))
        return problems

    def quant_config(self) -> dict[str, Any]:
        """The ModelOpt config for this stage: preset, plus KV cache, plus exclusions."""
        import modelopt.torch.quantization as mtq

        cfg = copy.deepcopy(getattr(mtq, FORMATS[self.format].preset))
        if self.kv_cache != "none":
            kv = getattr(mtq, KV_CACHE_PRESETS[self.kv_cache])["quant_cfg"]
            cfg = mtq.update_quant_cfg_with_kv_cache_quant(cfg, kv)
        # Entries apply in order and later ones win, so exclusions go last.
        for pattern in self.exclude:  # module globs; quantizer names extend module names
            glob = pattern if pattern.endswith("*") else f"{pattern}*"
            cfg["quant_cfg"].append({"quantizer_name": glob, "enable": False})
        return cfg

    def run(self, ctx: StageContext) -> StageResult:
        import modelopt.torch.quantization as mtq

        model = ctx.model()
        loop = ctx.forward_loop()
        t0 = time.time()
        mtq.quantize(model, self.quant_config(), loop)
        seconds = time.time() - t0
        quantized = sorted(
            name
            for name, module in model.named_modules()
            if getattr(getattr(module, "weight_quantizer", None), "is_enabled", False)
        )
        if not quantized:
            raise RuntimeError(
                "no layer was quantized: check `exclude` against the model's module names"
            )
        ctx.log.info(
            "quantized %d linear layers (%s) in %.1f s", len(quantized), self.format, seconds
        )
        return StageResult(
            metrics={
                "format": self.format,
                "kv_cache": self.kv_cache,
                "quantized_layers": len(quantized),
                "calibration_seconds": round(seconds, 3),
            }
        )
