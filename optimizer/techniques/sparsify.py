"""2:4 weight sparsity with ModelOpt (``modelopt.torch.sparsity``): :class:`SparsifyConfig` and
:func:`sparsify`, usable without the runner.

Two methods: ``sparsegpt`` chooses each group's zeros from a Hessian of the layer inputs on
calibration batches; ``magnitude`` zeroes the two smallest-magnitude weights of every 4 along
the input dimension (no data). ``lm_head`` is never sparsified. (ModelOpt 0.47's SparseGPT
uses its error-compensating update only to choose the zeros: the surviving weights keep their
values. A ``distill`` stage after it recovers the accuracy.)

The masks are baked into the weights at once (``mtsp.export``): the model leaves with plain
``nn.Linear`` layers whose zeros *are* the mask. That is the order ModelOpt supports
(sparsify -> export_sparse -> quantize: it refuses ``export_sparse`` after ``quantize``, and
its unified HF exporter writes a quantized *sparse* linear unquantized, masks included; and a
save with sparse modules does not load back under transformers 5, whose meta-device init
meets the mask buffer), so
quantization, training and export need no sparse modules; the training technique
(:mod:`optimizer.techniques.train`) keeps the zeros of every 2:4 layer it finds
(:func:`sparse_masks`). Example, without the runner::

    from optimizer.techniques.sparsify import SparsifyConfig, sparsify
    report = sparsify(model, SparsifyConfig(method="magnitude", exclude=["*layers.0.*"]))
"""

from __future__ import annotations

import fnmatch
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from optimizer.errors import OptimizerError

#: ModelOpt's mode name for each method.
MODES = {"sparsegpt": "sparsegpt", "magnitude": "sparse_magnitude"}
#: Never sparsified (ModelOpt's default rule, kept whatever ``exclude`` says).
ALWAYS_EXCLUDED = "*lm_head*"
#: Shape rules of ModelOpt 0.47 (its searchers skip other layers with only a warning):
#: (rows multiple, columns multiple).
SHAPE_RULES = {"magnitude": (8, 16), "sparsegpt": (4, 4)}
#: Model types whose linear layers follow the Llama layout (names checked before loading).
LLAMA_LAYOUT = ("llama", "mistral", "qwen2", "qwen3")


class SparsifyConfig(BaseModel):
    """How to sparsify: the method, the pattern and the layers left dense."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["sparsegpt", "magnitude"] = Field(
        "sparsegpt",
        description="sparsegpt (calibration data, Hessian-aware) or magnitude (no data)",
    )
    pattern: Literal["2:4"] = Field(
        "2:4", description="N:M pattern along the input dimension (ModelOpt supports 2:4)"
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="module-name globs left dense, e.g. '*layers.0.*' (lm_head always is)",
    )


def linear_names(model) -> list[str]:
    import torch

    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def targeted(names: list[str], exclude: list[str]) -> list[str]:
    """The linear layers a config sparsifies (fnmatch globs, as ModelOpt's rules match)."""
    globs = [ALWAYS_EXCLUDED, *exclude]
    return [n for n in names if not any(fnmatch.fnmatch(n, g) for g in globs)]


def unmatched_exclusions(names: list[str], exclude: list[str]) -> list[str]:
    return [g for g in exclude if not any(fnmatch.fnmatch(n, g) for n in names)]


def llama_linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]] | None:
    """``{module name: (out, in)}`` of a Llama-layout model from its config, or None when the
    layout (or a dimension) is unknown before the model loads."""
    if config.get("model_type") not in LLAMA_LAYOUT:
        return None
    hidden, inter = config.get("hidden_size"), config.get("intermediate_size")
    layers, heads = config.get("num_hidden_layers"), config.get("num_attention_heads")
    if not all(isinstance(v, int) and v > 0 for v in (hidden, inter, layers, heads)):
        return None
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    shapes = {"lm_head": (config.get("vocab_size") or 0, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.self_attn.q_proj": (heads * head_dim, hidden),
            f"{p}.self_attn.k_proj": (kv * head_dim, hidden),
            f"{p}.self_attn.v_proj": (kv * head_dim, hidden),
            f"{p}.self_attn.o_proj": (hidden, heads * head_dim),
            f"{p}.mlp.gate_proj": (inter, hidden),
            f"{p}.mlp.up_proj": (inter, hidden),
            f"{p}.mlp.down_proj": (hidden, inter),
        }
    return shapes


def shape_problems(shapes: dict[str, tuple[int, int]], method: str) -> list[str]:
    """Targeted layers ModelOpt's searcher would skip (leaving them dense) for their shape."""
    rows, cols = SHAPE_RULES[method]
    bad = [n for n, (o, i) in shapes.items() if o % rows or i % cols]
    if not bad:
        return []
    o, i = shapes[bad[0]]
    return [
        f"{len(bad)} layer(s) cannot be 2:4 sparsified by {method} (it needs out_features "
        f"divisible by {rows} and in_features by {cols}), e.g. {bad[0]} ({o}x{i}); "
        "exclude them"
    ]


def is_24_sparse(weight) -> bool:
    """Every group of 4 consecutive weights along the input dimension has at least 2 zeros
    (and the weight is not all zeros: a zero-initialised layer is not a sparse one)."""
    if weight.ndim != 2 or weight.shape[1] % 4 or not weight.numel():
        return False
    zeros = weight.detach() == 0
    if bool(zeros.all()):
        return False
    return bool((zeros.reshape(weight.shape[0], -1, 4).sum(-1) >= 2).all())


def sparse_masks(model) -> dict[str, Any]:
    """``{module name: keep-mask}`` of the linear layers whose weight is 2:4 sparse: the zeros
    a later stage must keep (the weights carry the masks after :func:`sparsify`)."""
    import torch

    return {
        n: m.weight.detach() != 0
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and is_24_sparse(m.weight)
    }


def lost_zeros(model, masks: dict[str, Any]) -> list[str]:
    """The layers of ``masks`` (from :func:`sparse_masks`) whose weight as the model computes
    it — fake-quantized, once quantized — is no longer zero wherever the mask says."""
    import torch

    modules = dict(model.named_modules())
    lost = []
    with torch.no_grad():
        for name, keep in masks.items():
            module = modules[name]
            weight = module.weight
            quantizer = getattr(module, "weight_quantizer", None)
            if quantizer is not None and getattr(quantizer, "is_enabled", False):
                weight = quantizer(weight)
            if bool((weight[~keep] != 0).any()):
                lost.append(name)
    return lost


def sparsify(model, config: SparsifyConfig, batches: list[Any] | None = None) -> dict[str, Any]:
    """Make ``model``'s linear layers 2:4 sparse in place with ModelOpt and bake the masks into
    the weights; ``batches`` are ``[batch, seq]`` token tensors (needed by ``sparsegpt``).

    Returns a summary (method, layers sparsified, layers left dense, zero fraction, seconds).
    Raises OptimizerError for an exclusion that matches nothing, missing calibration data, or
    a targeted layer ModelOpt cannot sparsify.
    """
    import modelopt.torch.sparsity as mtsp
    import torch
    from modelopt.torch.sparsity.weight_sparsity.module import SparseModule

    names = linear_names(model)
    unmatched = unmatched_exclusions(names, config.exclude)
    if unmatched:
        raise OptimizerError(
            f"exclude {unmatched[0]!r} matches no linear layer (they look like {names[0]!r})"
        )
    targets = targeted(names, config.exclude)
    if not targets:
        raise OptimizerError("exclude leaves no linear layer to sparsify")
    search: dict[str, Any] = {}
    if config.method == "sparsegpt":
        if not batches:
            raise OptimizerError("sparsegpt needs calibration batches (or use method: magnitude)")
        device = next(model.parameters()).device
        search = {"data_loader": batches, "collect_func": lambda b: b.to(device)}

    # Later globs win in ModelOpt's rules: the exclusions (None = leave dense) come last.
    rules = {"*": {}, ALWAYS_EXCLUDED: None, **{g: None for g in config.exclude}}
    t0 = time.time()
    with torch.no_grad():
        mtsp.sparsify(model, [(MODES[config.method], {"nn.Linear": rules})], config=search)
    done = {
        n
        for n, m in model.named_modules()
        if isinstance(m, SparseModule) and m.is_sparse and m._weight_mask is not None
    }
    skipped = [n for n in targets if n not in done]
    if skipped:
        raise OptimizerError(
            f"ModelOpt left {len(skipped)} targeted layer(s) dense (their shape does not fit "
            f"{config.method}), e.g. {skipped[0]}; exclude them"
        )
    # Bake the masks into the weights and return plain linear layers (see the module doc).
    mtsp.export(model)
    seconds = time.time() - t0
    modules = dict(model.named_modules())
    zeros = sum(int((modules[n].weight == 0).sum()) for n in targets)
    total = sum(modules[n].weight.numel() for n in targets)
    from optimizer.techniques.moe import fused_experts

    experts = fused_experts(model)
    expert_params = sum(p.numel() for m in experts.values() for p in m.parameters())
    return {
        "method": config.method,
        "pattern": config.pattern,
        "sparsified_layers": len(targets),
        "dense_layers": [n for n in names if n not in set(targets)],
        # ModelOpt sparsifies nn.Linear layers; transformers 5's fused experts are not
        "dense_experts": sorted(experts),
        "dense_expert_fraction": round(
            expert_params / sum(p.numel() for p in model.parameters()), 4
        ),
        "zero_fraction": round(zeros / total, 4),
        "seconds": round(seconds, 3),
    }
