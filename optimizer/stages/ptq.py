"""``ptq``: post-training quantization with ModelOpt (``mtq.quantize`` + calibration).

Either a simple ``format`` name (see optimizer/formats.py) with options, or one of ModelOpt's
own shipped recipes by name (``modelopt_recipe: general/ptq/fp8_default-kv_fp8``) for anything
the simple names do not cover.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from optimizer.errors import OptimizerError
from optimizer.formats import (
    ALGORITHMS,
    FORMAT_NAMES,
    FORMATS,
    KV_CACHE_FORMATS,
    add_kv_and_exclusions,
    build_config,
    check_block_size,
    trtllm_layout_problems,
)
from optimizer.stages.base import Stage, StageResult, register

if TYPE_CHECKING:
    from optimizer.context import StageContext

FormatName = Literal[FORMAT_NAMES]  # type: ignore[valid-type]
KVCacheName = Literal[("none", *KV_CACHE_FORMATS)]  # type: ignore[valid-type]
AlgorithmName = Literal[ALGORITHMS]  # type: ignore[valid-type]
QUANTIZING_STAGES = ("ptq", "auto_quantize")


def modelopt_recipe_path(name: str):
    """The YAML file of a ModelOpt shipped recipe, found without importing ModelOpt."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("modelopt_recipes")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    for candidate in (root / name, root / f"{name}.yaml", root / f"{name}.yml"):
        if candidate.is_file():
            return candidate
    return None


@register
class PTQ(Stage):
    """Quantize the model and calibrate its scales on the recipe's calibration data."""

    name = "ptq"
    transforms_model = True
    needs_calibration = True

    format: FormatName | None = Field(
        None, description="simple format name (see `optimize formats`)"
    )
    modelopt_recipe: str | None = Field(
        None,
        description="a ModelOpt shipped PTQ recipe instead of `format`, e.g. general/ptq/fp8_default-kv_fp8",
    )
    algorithm: AlgorithmName | None = Field(
        None, description="calibration algorithm (default: the format's)"
    )
    group_size: int | None = Field(
        None, gt=0, description="weight block size for int4_awq / w4a8_awq"
    )
    kv_cache: KVCacheName = Field(
        "none", description="KV-cache quantization, combinable with any format"
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="module-name globs left unquantized, e.g. '*layers.0.mlp*' (lm_head always is)",
    )

    @model_validator(mode="after")
    def _one_source(self):
        if (self.format is None) == (self.modelopt_recipe is None):
            raise ValueError("set exactly one of `format` (a simple name) or `modelopt_recipe`")
        if self.format is not None:
            spec = FORMATS[self.format]
            if self.algorithm is not None and self.algorithm not in spec.algorithms:
                raise ValueError(
                    f"algorithm {self.algorithm!r} does not apply to {self.format}; "
                    f"choose one of: {', '.join(spec.algorithms)}"
                )
            if self.group_size is not None and not spec.group_size_choosable:
                raise ValueError(
                    f"group_size is fixed for {self.format}"
                    + (f" ({spec.block_size})" if spec.block_size else " (not blockwise)")
                )
        elif self.algorithm is not None or self.group_size is not None:
            raise ValueError(
                "algorithm and group_size go with `format`; a modelopt_recipe sets its own"
            )
        return self

    @property
    def needs_gpu(self) -> bool:
        fmt = FORMATS.get(self.format) if self.format else None
        return bool(
            (fmt and fmt.needs_gpu)
            or (self.kv_cache != "none" and KV_CACHE_FORMATS[self.kv_cache].needs_gpu)
        )

    def check(self, recipe, before, env):
        problems = super().check(recipe, before, env)
        if any(s.name in QUANTIZING_STAGES for s in before):
            problems.append(("", "the model is already quantized by an earlier stage"))
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
                for m in check_block_size(self.format, self.group_size, env.model_config)
            ]
        return problems

    def trtllm_quant_algo(self):
        if self.format is None:
            return ("unknown", f"modelopt_recipe {self.modelopt_recipe}")  # checked after export
        spec = FORMATS[self.format]
        return spec.trtllm_algo, f"format {self.format}" + (
            f" ({spec.trtllm_note})" if spec.trtllm_note else ""
        )

    def trtllm_problems(self, tp: int, model_config: dict | None) -> list[str]:
        """Why a TensorRT-LLM checkpoint of this stage's result would not build."""
        if self.format is None:
            return []
        if check_block_size(self.format, self.group_size, model_config):
            return []  # already reported against the format; one message per cause
        problems = trtllm_layout_problems(self.format, self.group_size, tp, model_config)
        if self.format == "fp8_pc_pt" and self.exclude:
            problems.append(
                "TensorRT-LLM quantizes whole attention/MLP blocks for fp8_pc_pt, so per-layer "
                "`exclude` is not honoured and tensors would go missing; drop `exclude`"
            )
        return problems

    def quant_config(self) -> dict[str, Any]:
        """The ModelOpt config for this stage."""
        if self.format is not None:
            return build_config(
                self.format,
                algorithm=self.algorithm,
                group_size=self.group_size,
                kv_cache=self.kv_cache,
                exclude=self.exclude,
            )
        from modelopt.recipe import load_recipe

        recipe = load_recipe(self.modelopt_recipe)
        cfg = getattr(recipe, "quantize", None)
        if cfg is None:
            raise OptimizerError(f"ModelOpt recipe {self.modelopt_recipe!r} is not a PTQ recipe")
        cfg = cfg.model_dump(exclude_none=True) if hasattr(cfg, "model_dump") else dict(cfg)
        return add_kv_and_exclusions(cfg, self.kv_cache, self.exclude)

    def run(self, ctx: StageContext) -> StageResult:
        import modelopt.torch.quantization as mtq
        import torch

        if self.needs_gpu and not torch.cuda.is_available():
            raise OptimizerError(f"{self.describe()} needs a CUDA GPU; none is available")
        model = ctx.model()
        if self.format is not None:
            problems = check_block_size(self.format, self.group_size, model.config.to_dict())
            if problems:
                raise OptimizerError("; ".join(problems))
        cfg = self.quant_config()
        loop = ctx.forward_loop()
        t0 = time.time()
        mtq.quantize(model, cfg, loop)
        seconds = time.time() - t0
        quantized = [
            name
            for name, module in model.named_modules()
            if getattr(getattr(module, "weight_quantizer", None), "is_enabled", False)
        ]
        ctx.log.info("quantized %d linear layers in %.1f s", len(quantized), seconds)
        return StageResult(
            metrics={
                "format": self.format or self.modelopt_recipe,
                "algorithm": _algorithm_name(cfg.get("algorithm")),
                "kv_cache": self.kv_cache,
                "quantized_layers": len(quantized),
                "calibration_seconds": round(seconds, 3),
            }
        )


def _algorithm_name(algorithm: Any) -> str | None:
    if isinstance(algorithm, dict):
        return algorithm.get("method")
    return algorithm
