"""Post-training quantization: :class:`QuantizeConfig` (a simple format name, or a ModelOpt
shipped recipe) and :func:`quantize` (``mtq.quantize`` with a calibration forward loop).

Example, without the runner::

    from optimizer.techniques.quantize import QuantizeConfig, quantize
    report = quantize(model, QuantizeConfig(format="fp8"), forward_loop)
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from optimizer.errors import OptimizerError
from optimizer.formats import (
    ALGORITHMS,
    FORMAT_NAMES,
    FORMATS,
    KV_CACHE_FORMATS,
    add_kv_and_exclusions,
    build_config,
    check_block_size,
)

FormatName = Literal[FORMAT_NAMES]  # type: ignore[valid-type]
KVCacheName = Literal[("none", *KV_CACHE_FORMATS)]  # type: ignore[valid-type]
AlgorithmName = Literal[ALGORITHMS]  # type: ignore[valid-type]


def modelopt_recipe_path(name: str) -> Path | None:
    """The YAML file of a ModelOpt shipped recipe, found without importing ModelOpt."""
    spec = importlib.util.find_spec("modelopt_recipes")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    for candidate in (root / name, root / f"{name}.yaml", root / f"{name}.yml"):
        if candidate.is_file():
            return candidate
    return None


class QuantizeConfig(BaseModel):
    """What to quantize to: ``format`` (see optimizer/formats.py) with options, or one of
    ModelOpt's shipped recipes by name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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
        fmt = FORMATS[self.format] if self.format else None
        return bool(
            (fmt and fmt.needs_gpu)
            or (self.kv_cache != "none" and KV_CACHE_FORMATS[self.kv_cache].needs_gpu)
        )

    def modelopt_config(self) -> dict[str, Any]:
        """The ``mtq.quantize`` config."""
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


def quantized_layers(model) -> list[str]:
    """Names of the modules whose weight quantizer is enabled; fused MoE experts (ModelOpt's
    per-expert ``<proj>_weight_quantizers``) count once per expert projection."""
    from optimizer.techniques.moe import quantized_expert_projections

    names = [
        name
        for name, module in model.named_modules()
        if getattr(getattr(module, "weight_quantizer", None), "is_enabled", False)
    ]
    return names + quantized_expert_projections(model)


def quantize(
    model, config: QuantizeConfig, forward_loop: Callable[[Any], None] | None
) -> dict[str, Any]:
    """Quantize ``model`` in place with ModelOpt and calibrate it with ``forward_loop(model)``.

    Returns a summary (format, algorithm, kv cache, layers quantized, seconds). Raises
    OptimizerError for a configuration this model or machine cannot take.
    """
    import modelopt.torch.quantization as mtq
    import torch

    if config.needs_gpu and not torch.cuda.is_available():
        raise OptimizerError(
            f"{config.format or config.modelopt_recipe} (kv_cache {config.kv_cache}) needs a "
            "CUDA GPU; none is available"
        )
    if config.format is not None:
        problems = check_block_size(config.format, config.group_size, model.config.to_dict())
        if problems:
            raise OptimizerError("; ".join(problems))
    from optimizer.techniques.moe import count_routed_tokens, coverage

    cfg = config.modelopt_config()
    t0 = time.time()
    with count_routed_tokens(model) as routed:
        mtq.quantize(model, cfg, forward_loop)
    seconds = time.time() - t0
    algorithm = cfg.get("algorithm")
    summary = {
        "format": config.format or config.modelopt_recipe,
        "algorithm": algorithm.get("method") if isinstance(algorithm, dict) else algorithm,
        "kv_cache": config.kv_cache,
        "quantized_layers": len(quantized_layers(model)),
        "calibration_seconds": round(seconds, 3),
    }
    moe = coverage(routed)
    if moe is not None:
        summary["moe_calibration"] = moe
    return summary
