"""Structured pruning of a Llama-family Hugging Face model (Minitron-style), usable without
the runner::

    from optimizer.techniques.prune import PruneConfig, prune
    summary = prune(model, PruneConfig(params_fraction=0.75), calibration_batches)

Four axes, each uniform over the layers so the result is a standard HF config: MLP
intermediate size (``ffn_hidden_size``), attention heads (``num_attention_heads`` /
``num_key_value_heads``: whole KV groups, or the same number of query heads inside every
group; ``head_dim`` never changes), ``hidden_size`` (embedding channels, through every layer,
norm, embedding and lm_head, tied or not) and depth (``num_layers``: decoder layers dropped).
Targets are explicit sizes, or ``params_fraction`` of the parameter count: a grid search over
the ``search`` axes (multiples of ``size_multiple``, at most ``max_width_pruning`` of a width
and ``max_depth_pruning`` of the layers, as ModelOpt's Minitron searcher) picks the largest
model at or under the target; the chosen sizes are in the summary. The choice depends on the
config alone, so validation predicts the same sizes (:func:`resolve_targets`).

Importance, from one pass over the calibration data on the unpruned model:

- MLP neurons and hidden channels: Minitron's activation statistic (mean |x| over the
  sequence, L2 over the samples) through ModelOpt's own ``L2NormHook``
  (``modelopt.torch.prune.importance_hooks``): on the ``down_proj`` input for neurons, on the
  outputs of the two RMSNorms of every layer (the ``q_proj`` and ``gate_proj`` inputs) for
  hidden channels, summed over the kept layers as ModelOpt's Minitron does.
- Attention heads: the same statistic of each head's contribution through ``o_proj``
  (``||W_o[:, head] a_head||``), per query head and per KV group (the norm of the group's summed
  contribution, what ModelOpt's ``IndependentKvHeadContributionHook`` measures). A head's raw
  activation would not do: under GQA the query heads of a group share V, and a head whose
  ``o_proj`` columns are ~0 contributes nothing whatever its activation.
- Depth: ``1 - cos(input, output)`` of each decoder layer's hidden states, averaged over the
  calibration tokens (Minitron's / ShortGPT's block importance, as ModelOpt's
  ``mcore_minitron`` scores layers). Chosen over "loss increase when the layer is skipped"
  because it needs one forward pass for all layers instead of one per layer, and a layer that
  barely changes the residual stream is exactly what dropping it costs least.

What no library provides, and is written here: ModelOpt 0.47's structured pruning for LLMs
(``mcore_minitron``) works on Megatron-Core models only (the module imports
``megatron.core`` at the top; its search, hooks and slicing are Megatron dynamic modules);
``fastnas`` on an HF Llama finds only per-layer MLP widths, produces heterogeneous layers no HF
or TensorRT-LLM config can express, cannot prune heads (GQA) or hidden channels consistently
across embeddings, norms and residual stream, and needs ``torchprofile``. So the parts here
are: the head-contribution statistic, the layer scoring on HF decoder layers, the size search
(ModelOpt's ``_generate_search_space_combos`` and param counter live in the Megatron module),
and the physical slicing of ``nn.Linear`` / embeddings / norms with the config update.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from itertools import product
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from optimizer.errors import OptimizerError

log = logging.getLogger(__name__)

#: Model types with the Llama tensor layout (q/k/v/o, gate/up/down, two RMSNorms per layer;
#: Qwen2's q/k/v biases are sliced with their rows, Qwen3's q/k norms act on head_dim, which
#: pruning never changes).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: The axes ``params_fraction`` may shrink (recipe names, Megatron-style as ModelOpt's).
Axis = Literal["ffn_hidden_size", "hidden_size", "num_attention_heads", "num_layers"]
#: Recipe field -> HF config key.
HF_KEY = {
    "ffn_hidden_size": "intermediate_size",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "num_layers": "num_hidden_layers",
}
TARGETS = tuple(HF_KEY)

Size = Annotated[int, Field(gt=0)]


class PruneConfig(BaseModel):
    """What to prune to: explicit sizes, a parameter-count fraction, or both (explicit sizes
    stay fixed, the search picks the other ``search`` axes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ffn_hidden_size: Size | None = Field(None, description="MLP intermediate size after pruning")
    num_attention_heads: Size | None = Field(
        None, description="query heads after pruning (a multiple of the KV heads)"
    )
    num_key_value_heads: Size | None = Field(
        None, description="KV heads (GQA groups) after pruning; their query heads go with them"
    )
    hidden_size: Size | None = Field(None, description="hidden (embedding) size after pruning")
    num_layers: Size | None = Field(None, description="decoder layers kept")
    params_fraction: Annotated[float, Field(gt=0, lt=1)] | None = Field(
        None, description="target share of the parameter count, e.g. 0.75"
    )
    search: list[Axis] = Field(
        default_factory=lambda: ["ffn_hidden_size", "hidden_size"],
        description="axes params_fraction may shrink (Minitron: width before depth)",
    )
    size_multiple: Size = Field(64, description="searched hidden / MLP sizes are multiples of this")
    max_width_pruning: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.4, description="the search removes at most this share of any width (ModelOpt's default)"
    )
    max_depth_pruning: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.2, description="the search drops at most this share of the layers (ModelOpt's default)"
    )

    @model_validator(mode="after")
    def _some_target(self) -> PruneConfig:
        if self.params_fraction is None and all(getattr(self, k) is None for k in TARGETS):
            raise ValueError("set a target: params_fraction, or one of " + ", ".join(TARGETS))
        searched = {"search", "size_multiple", "max_width_pruning", "max_depth_pruning"}
        extra = sorted(searched & self.model_fields_set)
        if self.params_fraction is None and extra:
            verb = "applies" if len(extra) == 1 else "apply"
            raise ValueError(f"{', '.join(extra)} {verb} only with params_fraction")
        return self

    def explicit(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in TARGETS if getattr(self, k) is not None}


# --------------------------------------------------------------------------- sizes


def dims_of(config: dict[str, Any]) -> dict[str, Any] | None:
    """The HF config keys pruning reads (head_dim and KV heads filled in), or None if the
    config lacks one."""
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    if any(not isinstance(config.get(k), int) for k in need):
        return None
    d = {k: config[k] for k in need}
    d["num_key_value_heads"] = config.get("num_key_value_heads") or d["num_attention_heads"]
    d["head_dim"] = config.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
    d["vocab_size"] = config.get("vocab_size")
    d["tie_word_embeddings"] = config.get("tie_word_embeddings")
    return d


def param_count(d: dict[str, Any]) -> int:
    """Weights of a Llama with dims ``d`` (biases, rare in this family, not counted)."""
    h, f, n = d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"]
    q, kv, hd = d["num_attention_heads"], d["num_key_value_heads"], d["head_dim"]
    layer = 2 * h * q * hd + 2 * h * kv * hd + 3 * h * f + 2 * h
    embeddings = (d["vocab_size"] or 0) * h * (1 if d["tie_word_embeddings"] else 2)
    return embeddings + h + n * layer


def _grid(size: int, multiple: int, floor: float) -> list[int]:
    lo = math.ceil(floor * size)
    return sorted({size, *(m for m in range(multiple, size, multiple) if m >= lo)})


def resolve_targets(
    config: PruneConfig, model: dict[str, Any]
) -> tuple[dict[str, Any] | None, list[tuple[str, str]], dict[str, Any]]:
    """The dims after pruning ``model`` (an HF config dict) to ``config``, the problems
    (``(field, message)``) that make it impossible, and how the sizes were chosen. The dims
    are None when the config lacks the Llama dimensions; the searched sizes are None when
    the config does not say whether the embeddings are tied (validation of a builtin model
    not yet converted: the run decides)."""
    d = dims_of(model)
    if d is None:
        return None, [], {}
    problems: list[tuple[str, str]] = []
    current = {k: d[HF_KEY[k]] for k in TARGETS}
    for key, want in config.explicit().items():
        if want > current[key]:
            problems.append(
                (
                    key,
                    f"{key} {want} is larger than the model's {HF_KEY[key]} ({current[key]}); "
                    "pruning only removes",
                )
            )
    if problems:
        return None, problems, {}
    q, kv = d["num_attention_heads"], d["num_key_value_heads"]
    group = q // kv
    new_kv = config.num_key_value_heads or kv
    new_q = config.num_attention_heads or new_kv * group
    if new_q % new_kv:
        problems.append(
            (
                "num_attention_heads",
                f"num_attention_heads {new_q} is not a multiple of the {new_kv} KV heads: under "
                "GQA every KV head serves the same number of query heads; choose a multiple of "
                f"{new_kv}",
            )
        )
    elif new_q // new_kv > group:
        problems.append(
            (
                "num_attention_heads",
                f"{new_q} query heads over {new_kv} KV heads would be {new_q // new_kv} per KV "
                f"group, more than the model's {group}; pruning removes whole KV groups or "
                "query heads inside each group, it cannot move heads between groups",
            )
        )
    if problems:
        return None, problems, {}
    hidden = config.hidden_size or d["hidden_size"]
    if hidden % new_q:
        problems.append(
            (
                "hidden_size",
                f"hidden_size {hidden} is not a multiple of the {new_q} attention heads: "
                "transformers' Llama config refuses it (even with head_dim set); choose a "
                f"multiple of {new_q}",
            )
        )
    if problems:
        return None, problems, {}
    new = {
        **d,
        "hidden_size": config.hidden_size or d["hidden_size"],
        "intermediate_size": config.ffn_hidden_size or d["intermediate_size"],
        "num_hidden_layers": config.num_layers or d["num_hidden_layers"],
        "num_attention_heads": new_q,
        "num_key_value_heads": new_kv,
    }
    info: dict[str, Any] = {}
    if config.params_fraction is not None:
        axes = [a for a in config.search if a not in config.explicit()]
        if d["tie_word_embeddings"] is None or d["vocab_size"] is None:
            return {**new, **{HF_KEY[a]: None for a in axes}}, [], {}
        before = param_count(d)
        target = config.params_fraction * before
        w, dep = 1 - config.max_width_pruning, 1 - config.max_depth_pruning
        grids = {
            "hidden_size": _grid(new["hidden_size"], config.size_multiple, w),
            "intermediate_size": _grid(new["intermediate_size"], config.size_multiple, w),
            "num_attention_heads": sorted(
                new_kv * g for g in range(1, new_q // new_kv + 1) if new_kv * g >= w * new_q
            ),
            "num_hidden_layers": list(
                range(math.ceil(dep * new["num_hidden_layers"]), new["num_hidden_layers"] + 1)
            ),
        }
        keys = [HF_KEY[a] for a in axes]
        # The largest count at or under the target, as ModelOpt's Minitron searcher ranks its
        # candidates (it then scores its top 10 with a user metric, which a recipe has not);
        # among equal counts: larger hidden, then MLP, heads, layers (the order of `grids`).
        order = [k for k in grids if k in keys]
        best, best_key, smallest = None, None, None
        for values in product(*(grids[k] for k in order)):
            cand = {**new, **dict(zip(order, values, strict=True))}
            if cand["hidden_size"] % cand["num_attention_heads"]:
                continue  # transformers' Llama config refuses it (see above)
            n = param_count(cand)
            smallest = n if smallest is None else min(smallest, n)
            if n <= target and (best_key is None or (n, values) > best_key):
                best, best_key = cand, (n, values)
        if best is None:
            hint = ""
            heads = grids["num_attention_heads"] if "num_attention_heads" in order else [new_q]
            if "hidden_size" in order and all(
                h % q for h in grids["hidden_size"][:-1] for q in heads
            ):
                hint = (
                    f" (hidden_size cannot shrink at all: no multiple of size_multiple "
                    f"{config.size_multiple} within reach is also a multiple of the attention "
                    "heads, which transformers' Llama config requires; lower size_multiple)"
                )
            problems.append(
                (
                    "params_fraction",
                    f"params_fraction {config.params_fraction} is out of reach: shrinking "
                    f"{', '.join(axes) or 'nothing'} by at most {config.max_width_pruning:.0%} "
                    f"of a width and {config.max_depth_pruning:.0%} of the layers gets down to "
                    f"{(smallest or before) / before:.1%} of the parameters at best; raise "
                    "params_fraction, add axes to `search`, or raise max_width_pruning / "
                    f"max_depth_pruning{hint}",
                )
            )
            return None, problems, {}
        new = best
        info = {
            "searched": axes,
            "target_params_fraction": config.params_fraction,
            "params_fraction": round(param_count(new) / before, 4),
        }
    if all(new[k] == d[k] for k in HF_KEY.values()):
        problems.append(("", "prunes nothing: every target equals the model's size"))
        return None, problems, {}
    return new, [], info


# --------------------------------------------------------------------------- importance


def _l2_hook():
    """ModelOpt's Minitron statistic, for HF's batch-first tensors (the hook reads
    Megatron's [seq, batch, ...] layout: ``_get_input_tensor`` is its override point)."""
    from modelopt.torch.prune.importance_hooks import L2NormHook

    class BatchFirstL2NormHook(L2NormHook):
        def _get_input_tensor(self, args):
            return args[0].detach().transpose(0, 1)

    return BatchFirstL2NormHook()


class _HeadContribution:
    """Per query head and per KV group: mean over the sequence, L2 over the samples of
    ``||W_o[:, head] a_head||`` (the group's: of its heads' summed contribution)."""

    def __init__(self, heads: int, kv: int, head_dim: int):
        self.heads, self.kv, self.head_dim = heads, kv, head_dim
        self.head_sq = None
        self.group_sq = None

    def __call__(self, module, args, output) -> None:
        import torch

        a = args[0].detach().float()
        b, t, _ = a.shape
        g = self.heads // self.kv
        a = a.view(b, t, self.kv, g, self.head_dim)
        w = module.weight.detach().float().view(-1, self.kv, g, self.head_dim)
        head_sq = torch.zeros(self.kv, g, device=a.device)
        group_sq = torch.zeros(self.kv, device=a.device)
        for k in range(self.kv):  # one group at a time: [b, t, g, hidden] at most
            out = torch.einsum("btjd,hjd->btjh", a[:, :, k], w[:, k])
            head_sq[k] = out.norm(dim=-1).mean(dim=1).pow(2).sum(dim=0)
            group_sq[k] = out.sum(dim=2).norm(dim=-1).mean(dim=1).pow(2).sum()
        self.head_sq = head_sq if self.head_sq is None else self.head_sq + head_sq
        self.group_sq = group_sq if self.group_sq is None else self.group_sq + group_sq


def _check_structure(model) -> None:
    import torch.nn as nn

    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise OptimizerError(
            f"prune knows the Llama layout ({', '.join(SUPPORTED_MODEL_TYPES)}); this model is "
            f"{model_type!r}"
        )
    from modelopt.torch.opt.conversion import ModeloptStateManager

    if ModeloptStateManager.is_converted(model):
        raise OptimizerError(
            "the model carries ModelOpt state (quantizers, sparsity masks, ...); prune the "
            "plain model, before any quantizing or sparsifying stage"
        )
    known = {
        f"{m}.{p}.{t}"
        for m, ps in (
            ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            ("mlp", ("gate_proj", "up_proj", "down_proj")),
        )
        for p in ps
        for t in ("weight", "bias")
    } | {
        f"{n}.weight"
        for n in (
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.q_norm",
            "self_attn.k_norm",
        )
    }
    inner = model.model
    for i, layer in enumerate(inner.layers):
        for name, _ in layer.named_parameters():
            if name not in known:
                raise OptimizerError(
                    f"prune knows Llama decoder layers (q/k/v/o, gate/up/down, two norms, "
                    f"Qwen3's q/k norms); "
                    f"layer {i} also has {name}"
                )
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not isinstance(getattr(layer.self_attn, p), nn.Linear):
                raise OptimizerError(f"layer {i} self_attn.{p} is not a plain nn.Linear")


def _importance(model, d: dict, new: dict, batches: Iterable) -> dict[str, Any]:
    """One calibration pass with only the hooks the targets need."""
    import torch
    import torch.nn.functional as F

    layers = list(model.model.layers)
    want_ffn = new["intermediate_size"] < d["intermediate_size"]
    want_hidden = new["hidden_size"] < d["hidden_size"]
    want_heads = (
        new["num_attention_heads"] < d["num_attention_heads"]
        or new["num_key_value_heads"] < d["num_key_value_heads"]
    )
    want_depth = new["num_hidden_layers"] < d["num_hidden_layers"]
    ffn, hidden, heads = {}, {}, {}
    depth = [0.0] * len(layers)
    handles = []

    def depth_hook(i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(x.detach().float(), y.detach().float(), dim=-1)
            depth[i] += float((1 - cos).sum())

        return hook

    for i, layer in enumerate(layers):
        if want_ffn:
            ffn[i] = _l2_hook()
            handles.append(layer.mlp.down_proj.register_forward_hook(ffn[i]))
        if want_hidden:
            hidden[i] = (_l2_hook(), _l2_hook())
            handles.append(layer.self_attn.q_proj.register_forward_hook(hidden[i][0]))
            handles.append(layer.mlp.gate_proj.register_forward_hook(hidden[i][1]))
        if want_heads:
            heads[i] = _HeadContribution(
                d["num_attention_heads"], d["num_key_value_heads"], d["head_dim"]
            )
            handles.append(layer.self_attn.o_proj.register_forward_hook(heads[i]))
        if want_depth:
            handles.append(layer.register_forward_hook(depth_hook(i), with_kwargs=True))
    device = next(model.parameters()).device
    samples = tokens = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch.to(device), use_cache=False)
                samples += batch.shape[0]
                tokens += batch.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if samples == 0:
        raise OptimizerError("prune needs calibration data: no batches were given")
    # (On the CPU: a model spread over GPUs keeps each layer's statistics on its device.)
    return {
        "ffn": {i: h.accumulate().cpu() for i, h in ffn.items()},
        "hidden": {i: (a.accumulate().cpu(), b.accumulate().cpu()) for i, (a, b) in hidden.items()},
        "heads": {i: (h.head_sq.sqrt().cpu(), h.group_sq.sqrt().cpu()) for i, h in heads.items()},
        "depth": [s / tokens for s in depth] if want_depth else None,
        "samples": samples,
    }


def _top(scores, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, in their original order (ties: lower index)."""
    import torch

    order = torch.argsort(scores.float().cpu(), descending=True, stable=True)
    return sorted(order[:k].tolist())


# --------------------------------------------------------------------------- slicing


def _take(param, dim: int, index) -> None:
    """Keep ``index`` along ``dim`` of ``param`` in place: the same Parameter object, so a
    tied lm_head keeps sharing the embedding."""
    if param is not None:
        param.data = param.data.index_select(dim, index.to(param.device)).contiguous()


def _linear(linear, out_idx=None, in_idx=None) -> None:
    if out_idx is not None:
        _take(linear.weight, 0, out_idx)
        _take(linear.bias, 0, out_idx)
        linear.out_features = len(out_idx)
    if in_idx is not None:
        _take(linear.weight, 1, in_idx)
        linear.in_features = len(in_idx)


def prune(model, config: PruneConfig, calibration_batches: Iterable) -> dict[str, Any]:
    """Prune ``model`` in place to ``config``; ``calibration_batches`` are ``[batch, seq]``
    token tensors. Returns the summary: dims and parameter counts before and after, the
    chosen sizes, the dropped layers and heads, importance of the layers, and every kept
    index (``kept``). Raises OptimizerError for targets this model cannot take."""
    import torch

    t0 = time.time()
    _check_structure(model)
    cfg = model.config
    d = dims_of(cfg.to_dict())
    if d is None:
        raise OptimizerError("the model's config lacks the Llama dimensions prune needs")
    new, problems, info = resolve_targets(config, d)
    if problems:
        raise OptimizerError("; ".join(f"{k}: {m}" if k else m for k, m in problems))
    assert new is not None
    params_before = sum(p.numel() for p in model.parameters())
    scores = _importance(model, d, new, calibration_batches)

    n_layers = d["num_hidden_layers"]
    kept_layers = list(range(n_layers))
    if scores["depth"] is not None:
        kept_layers = _top(torch.tensor(scores["depth"]), new["num_hidden_layers"])
    hd, q, kv = d["head_dim"], d["num_attention_heads"], d["num_key_value_heads"]
    group, new_kv = q // kv, new["num_key_value_heads"]
    new_group = new["num_attention_heads"] // new_kv
    kept: dict[str, Any] = {"layers": kept_layers, "kv_heads": {}, "query_heads": {}, "ffn": {}}
    layers = model.model.layers
    rows = torch.arange(hd)
    for i in kept_layers:
        layer = layers[i]
        attn, mlp = layer.self_attn, layer.mlp
        if i in scores["heads"]:
            head_score, group_score = scores["heads"][i]
            groups = _top(group_score, new_kv)
            heads = [k * group + j for k in groups for j in _top(head_score[k], new_group)]
            kept["kv_heads"][i], kept["query_heads"][i] = groups, heads
            q_rows = torch.cat([h * hd + rows for h in heads])
            kv_rows = torch.cat([k * hd + rows for k in groups])
            _linear(attn.q_proj, out_idx=q_rows)
            _linear(attn.k_proj, out_idx=kv_rows)
            _linear(attn.v_proj, out_idx=kv_rows)
            _linear(attn.o_proj, in_idx=q_rows)
            attn.num_key_value_groups = new_group
        if i in scores["ffn"]:
            keep = _top(scores["ffn"][i], new["intermediate_size"])
            kept["ffn"][i] = keep
            idx = torch.tensor(keep)
            _linear(mlp.gate_proj, out_idx=idx)
            _linear(mlp.up_proj, out_idx=idx)
            _linear(mlp.down_proj, in_idx=idx)
            mlp.intermediate_size = len(keep)
    if scores["hidden"]:
        total = sum(a + b for i, (a, b) in scores["hidden"].items() if i in kept_layers)
        kept["hidden"] = _top(total, new["hidden_size"])
        idx = torch.tensor(kept["hidden"])
        inner = model.model
        embed, lm_head = inner.embed_tokens, model.get_output_embeddings()
        _take(embed.weight, 1, idx)
        embed.embedding_dim = len(idx)
        _take(inner.norm.weight, 0, idx)
        for i in kept_layers:
            layer = layers[i]
            attn, mlp = layer.self_attn, layer.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                _linear(lin, in_idx=idx)
            _linear(attn.o_proj, out_idx=idx)
            _linear(mlp.down_proj, out_idx=idx)
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                _take(norm.weight, 0, idx)
            layer.hidden_size = mlp.hidden_size = len(idx)
        if lm_head.weight is not embed.weight:  # tied: already sliced with the embedding
            _take(lm_head.weight, 1, idx)
        lm_head.in_features = len(idx)
    if len(kept_layers) < n_layers:
        import torch.nn as nn

        model.model.layers = nn.ModuleList(layers[i] for i in kept_layers)
        for new_i, layer in enumerate(model.model.layers):
            layer.self_attn.layer_idx = new_i  # the KV cache is indexed by position
        layer_types = getattr(cfg, "layer_types", None)
        if isinstance(layer_types, list) and len(layer_types) == n_layers:
            cfg.layer_types = [layer_types[i] for i in kept_layers]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers"):
        setattr(cfg, key, new[key])
    cfg.num_attention_heads = new["num_attention_heads"]
    cfg.num_key_value_heads = new["num_key_value_heads"]
    cfg.head_dim = hd  # explicit: hidden_size / heads no longer gives it
    params_after = sum(p.numel() for p in model.parameters())

    keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
    )
    removed_layers = [i for i in range(n_layers) if i not in kept_layers]
    summary = {
        "before": {k: d[k] for k in keys},
        "after": {k: new[k] for k in keys},
        "params_before": params_before,
        "params_after": params_after,
        "params_fraction": round(params_after / params_before, 4),
        **{k: v for k, v in info.items() if k != "params_fraction"},
        "removed_layers": removed_layers,
        "layer_importance": (
            [round(s, 6) for s in scores["depth"]] if scores["depth"] is not None else None
        ),
        "removed_kv_heads": {
            str(i): [k for k in range(kv) if k not in g] for i, g in kept["kv_heads"].items()
        },
        "removed_query_heads": {
            str(i): [h for h in range(q) if h not in hs] for i, hs in kept["query_heads"].items()
        },
        "calibration_samples": scores["samples"],
        "seconds": round(time.time() - t0, 3),
        "kept": kept,
    }
    log.info(
        "pruned %s -> %s: %d -> %d parameters (%.1f %%)",
        summary["before"],
        summary["after"],
        params_before,
        params_after,
        100 * params_after / params_before,
    )
    return summary
