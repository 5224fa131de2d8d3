"""What the model is after each stage, as validation sees it before anything loads.

A recipe is validated by threading a :class:`ModelPlan` through its stages: each stage's
``plan(prev, env)`` returns the plan after it and the problems it sees, so stage *i* checks
itself against what stages *0..i-1* made of the model (its dimensions after a prune, its
quantization, its sparsity, a draft head, the exports) — never by looking at another stage
by name or attribute.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def but(self, **changes: Any):
        """A copy with ``changes`` (plans are immutable: every stage makes a new one)."""
        return self.model_copy(update=changes)


#: HF config keys a plan carries (Llama-style names; other families map onto them).
DIM_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
)


class ModelDims(_Frozen):
    """The dimensions checks need; None where the config does not say."""

    model_type: str | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    #: The model scales its rope (it may run beyond max_position_embeddings).
    rope_scaling: bool = False
    #: lm_head shares the embedding (None: the config does not say); parameter counts need it.
    tie_word_embeddings: bool | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> ModelDims | None:
        if config is None:
            return None
        values = {k: config.get(k) for k in DIM_KEYS}
        values = {
            k: v for k, v in values.items() if isinstance(v, str if k == "model_type" else int)
        }
        tied = config.get("tie_word_embeddings")
        return cls(
            **values,
            rope_scaling=_scales_rope(config),
            tie_word_embeddings=tied if isinstance(tied, bool) else None,
        )

    def as_config(self) -> dict[str, Any]:
        """The dimensions as an HF-config-shaped dict (what the format checks read)."""
        return self.model_dump(exclude_none=True, exclude={"rope_scaling", "tie_word_embeddings"})


def _scales_rope(config: dict[str, Any]) -> bool:
    """Whether the config scales its rope: ``rope_scaling`` (transformers 4) or a
    ``rope_parameters`` whose ``rope_type`` is not the default (transformers 5 saves only
    that; Gemma 3 nests one per attention type)."""
    if config.get("rope_scaling"):
        return True
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        return False
    nested = [v for v in params.values() if isinstance(v, dict)] or [params]
    return any(p.get("rope_type") not in (None, "default") for p in nested)


class LayerFormat(_Frozen):
    """One quantization format present in the model and its weight block size."""

    format: str
    group_size: int | None = None


class Quantization(_Frozen):
    """How the model is quantized."""

    #: What did it, for messages: "format fp8", "auto_quantize over fp8, int4_awq".
    by: str
    #: The simple formats present (several for a per-layer mix); empty when unknown (a
    #: ModelOpt recipe: its export is checked by the checkpoint validator).
    formats: tuple[LayerFormat, ...] = ()
    #: ``quant_algo`` of a TensorRT-LLM 1.2 checkpoint of it; None if TensorRT-LLM has none
    #: (``trtllm_note`` says why); "unknown" if only the export will tell.
    trtllm_algo: str | None = None
    trtllm_note: str = ""
    #: KV-cache format (a key of formats.KV_CACHE_FORMATS), or None.
    kv_cache: str | None = None
    #: Module globs left unquantized.
    exclude: tuple[str, ...] = ()

    @property
    def trtllm_kv_algo(self) -> str | None:
        return self.kv_cache.upper() if self.kv_cache else None


class TrtllmCheckpoint(_Frozen):
    tp: int = 1
    pp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp


class Exports(_Frozen):
    """What an export stage wrote; the model cannot change after it (the artifacts would not
    show the change)."""

    trtllm_checkpoint: TrtllmCheckpoint | None = None
    hf_checkpoint: bool = False


class ModelPlan(_Frozen):
    """The model as it stands after a stage (the first plan is the source model's)."""

    #: None when the config is not on this machine yet (checks that need it wait for the run).
    dims: ModelDims | None = None
    quantization: Quantization | None = None
    #: Weight sparsity pattern, e.g. "2:4".
    sparsity: str | None = None
    #: A speculative-decoding draft: "eagle3", "medusa" or "draft_target".
    draft: str | None = None
    #: Draft tokens per step the draft was trained and measured for.
    draft_len: int | None = None
    exports: Exports | None = None
    #: TensorRT engines were built.
    engine: bool = False

    @classmethod
    def of_source(cls, config: dict[str, Any] | None) -> ModelPlan:
        return cls(dims=ModelDims.from_config(config))

    @property
    def config(self) -> dict[str, Any] | None:
        """The dimensions as an HF-config-shaped dict, or None if unknown."""
        return self.dims.as_config() if self.dims is not None else None


@dataclass(frozen=True)
class Environment:
    """Where and with what the recipe will run (the model itself is in the plan).

    ``gpu`` is whether a CUDA GPU is (or will be) there; None means "do not check".
    """

    gpu: bool | None = None
    #: Directory of the recipe file; relative paths resolve against it.
    base_dir: Path = Path(".")
    #: The recipe has a ``calibration`` section.
    has_calibration: bool = False
