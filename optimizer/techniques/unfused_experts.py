"""Mixture-of-experts blocks with one module per expert, as ModelOpt 0.47 quantizes and exports
them.

transformers 5 keeps the experts of a block fused: one ``*Experts`` module with 3D
parameters ``gate_up_proj`` [E, 2F, H] and ``down_proj`` [E, H, F]. ModelOpt 0.47 quantizes
that module as a whole (``_QuantFusedExperts``: one input quantizer per block), and its
exporter then fails or degrades on it: AWQ's re-smoothing indexes experts one by one
(``get_experts_list``) and crashes, SmoothQuant leaves the experts unsmoothed, an exclusion of
one projection is exported half-quantized. ModelOpt's per-expert path
(``_QuantSparseSequentialMoe``, what it was written for under transformers 4) needs an
iterable ``experts`` of per-expert MLPs.

:func:`unfuse_experts` gives it that: every fused experts module of the families below is
replaced in place by :class:`UnfusedExperts`, an ``nn.ModuleList`` of per-expert MLPs with
transformers 4's attribute names (Qwen3-MoE ``gate_proj`` / ``up_proj`` / ``down_proj``,
Mixtral ``w1`` / ``w3`` / ``w2``: ModelOpt's exporter finds experts by these names, keyed on
the model's class name) and the weights copied (gate = ``gate_up_proj[e, :F]``, up =
``gate_up_proj[e, F:]``, down = ``down_proj[e]``). Its forward is transformers 5's fused
forward, expert by expert: the unfused model computes exactly what the fused one computes.

It is applied before every quantization of such a model, whatever the format (one layout for
every format, so the save, the reload, the export and the gate's rebuild have one path; an
FP8 export has the same per-expert tensors either way), and before ModelOpt's state is restored
onto a reloaded hand-over checkpoint (:func:`optimizer.models.load_model`): that state names
the per-expert modules, and transformers 5 loads the per-expert tensors back into fused
experts otherwise.

What ModelOpt's exporter then does to the per-expert quantizers: it syncs an expert's gate
and up weight amaxes to their element-wise maximum (serving engines fuse the two into one
GEMM; for INT4's per-block amaxes it also coarsens blocks that needed no sync: gate/up
relative weight error 0.11 against 0.10 without the sync on the tiny models), it shares the input scales
of a block's experts, and it averages AWQ's ``pre_quant_scale`` over a block's experts (an
expert no calibration token reached gets 1 from AWQ, then the block's average);
:mod:`optimizer.techniques.moe` reports such experts.

This module imports torch at the top: import it inside the functions that have a model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from optimizer.errors import OptimizerError

#: Fused experts class -> the per-expert (gate, up, down) linear names ModelOpt 0.47 expects
#: for the model (modelopt/torch/export/layer_utils.py: get_experts_list).
EXPERT_LINEARS = {
    "Qwen3MoeExperts": ("gate_proj", "up_proj", "down_proj"),
    "MixtralExperts": ("w1", "w3", "w2"),
}


#: The HF ``model_type`` values of the models with those experts classes.
UNFUSED_MODEL_TYPES = ("qwen3_moe", "mixtral")


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, its linears under ``names``."""

    def __init__(self, hidden: int, inner: int, act_fn, names: tuple[str, str, str]):
        super().__init__()
        gate, up, down = names
        self.names = names
        self.add_module(gate, nn.Linear(hidden, inner, bias=False))
        self.add_module(up, nn.Linear(hidden, inner, bias=False))
        self.add_module(down, nn.Linear(inner, hidden, bias=False))
        self.act_fn = act_fn

    def forward(self, x):
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class UnfusedExperts(nn.ModuleList):
    """The experts of one block, one :class:`ExpertMLP` each, called as transformers 5 calls
    its fused experts: ``forward(hidden_states, top_k_index, top_k_weights)``."""

    def __init__(self, hidden: int, inner: int, n: int, act_fn, names: tuple[str, str, str]):
        super().__init__([ExpertMLP(hidden, inner, act_fn, names) for _ in range(n)])
        self.num_experts = n
        self.hidden_dim = hidden
        self.intermediate_dim = inner

    def forward(self, hidden_states, top_k_index, top_k_weights):
        # transformers 5's Qwen3MoeExperts / MixtralExperts.forward, one module per expert
        out = torch.zeros_like(hidden_states)
        for e, pos, tok in routed_tokens(top_k_index, self.num_experts):
            h = self[e](hidden_states[tok]) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, h.to(out.dtype))
        return out


def routed_tokens(top_k_index, num_experts: int):
    """(expert, top-k slot, token) indices of a routing, expert by expert, as transformers
    5's experts forward walks them (experts without tokens and the expert-parallel sentinel
    skipped); shared by the unfused experts and the gate's rebuilt ones."""
    with torch.no_grad():
        mask = nn.functional.one_hot(top_k_index, num_classes=num_experts).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for (e,) in hit.tolist():
        if e == num_experts:  # the expert-parallel sentinel: not on this rank
            continue
        pos, tok = torch.where(mask[e])
        yield e, pos, tok


def _is_fused(module) -> bool:
    p = getattr(module, "gate_up_proj", None)
    return isinstance(p, nn.Parameter) and p.dim() == 3


def fused_blocks(model) -> dict[str, Any]:
    """``{block name: block}`` of the MoE blocks whose ``experts`` are fused (any family)."""
    return {name: m for name, m in model.named_modules() if _is_fused(getattr(m, "experts", None))}


def unfuse_experts(model, *, copy_weights: bool = True) -> list[str]:
    """Replace every fused experts module of a known family by :class:`UnfusedExperts`, in
    place; the names of the replaced modules (empty for a dense model, or one already
    unfused). ``copy_weights=False`` leaves the per-expert weights uninitialised (a model
    about to load its state from a checkpoint)."""
    done = []
    for name, block in fused_blocks(model).items():
        fused = block.experts
        names = EXPERT_LINEARS.get(type(fused).__name__)
        if names is None:
            continue
        extra = sorted(set(dict(fused.named_parameters())) - {"gate_up_proj", "down_proj"})
        if extra:
            raise OptimizerError(
                f"{name}.experts ({type(fused).__name__}) has parameters besides gate_up_proj "
                f"and down_proj ({extra[0]}); it cannot be unfused for ModelOpt's per-expert "
                "quantization"
            )
        weight = fused.gate_up_proj
        if weight.is_meta and copy_weights:
            raise OptimizerError(
                f"{name}.experts is offloaded to host memory (model.max_memory): ModelOpt "
                "quantizes MoE experts one module each, and offloaded experts cannot be "
                "unfused yet; remove model.max_memory or use a larger GPU"
            )
        n, two_f, hidden = weight.shape
        f = two_f // 2
        unfused = UnfusedExperts(hidden, f, n, fused.act_fn, names)
        unfused.to(device=weight.device, dtype=weight.dtype)
        if copy_weights:
            gate, up, down = names
            with torch.no_grad():
                for e, mlp in enumerate(unfused):
                    getattr(mlp, gate).weight.copy_(weight[e, :f])
                    getattr(mlp, up).weight.copy_(weight[e, f:])
                    getattr(mlp, down).weight.copy_(fused.down_proj[e])
        block.experts = unfused
        done.append(f"{name}.experts")
    return done


def unfused_experts(model) -> dict[str, UnfusedExperts]:
    """The model's :class:`UnfusedExperts` modules by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, UnfusedExperts)}


#: Hub block names of an in-memory ``mlp`` (Mixtral's checkpoints say block_sparse_moe);
#: transformers renames them on load and back on save.
_HUB_BLOCKS = {".block_sparse_moe.": ".mlp."}


def _unfusable_family(path) -> bool:
    """Whether ``path``'s config.json names a family :func:`unfuse_experts` knows
    (unreadable: False, the ordinary load reports it)."""
    import json
    from pathlib import Path

    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") in UNFUSED_MODEL_TYPES


def fused_moe_checkpoint(path) -> bool:
    """Whether ``path`` holds a model of a family :func:`unfuse_experts` knows, not yet
    unfused (transformers 5 loads its experts fused)."""
    return _unfusable_family(path) and not is_unfused_checkpoint(path)


def is_unfused_checkpoint(path) -> bool:
    """Whether the checkpoint at ``path`` is a quantized model saved with unfused experts:
    ModelOpt state next to per-expert quantizer tensors (``experts.0.<proj>.*_quantizer.*``)."""
    from pathlib import Path

    from optimizer.safetensors_header import read_safetensors_header

    path = Path(path)
    if not (path / "modelopt_state.pth").is_file():
        return False
    # Only the families unfuse_experts knows (natively per-expert MoE checkpoints, remote code
    # included, keep the ordinary from_pretrained path).
    if not _unfusable_family(path):
        return False
    for f in sorted(path.glob("*.safetensors")):
        try:
            names = read_safetensors_header(f)
        except (OSError, ValueError):
            return False  # the ordinary load reports it
        if any(".experts.0." in n and "_quantizer." in n for n in names):
            return True
    return False


def load_unfused_checkpoint(path, dtype, device=None):
    """The quantized model a hand-over checkpoint with unfused experts holds (see
    :func:`is_unfused_checkpoint`), computing in ``dtype`` (a torch dtype) on ``device``
    (default: where it was built, host memory).

    ``from_pretrained`` cannot load it: ModelOpt restores its state inside the model's
    ``__init__``, before anything could unfuse the experts its state names, and transformers 5
    merges the per-expert tensors back into fused experts. So the architecture is built from
    the config, unfused, given ModelOpt's state, then the stored tensors (strictly: every
    tensor the model has, nothing else)."""
    from pathlib import Path

    import modelopt.torch.opt as mto
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    # ModelOpt's patched from_config restores the state found at the config's path, before
    # the experts are unfused: the architecture must not know where it came from.
    config._name_or_path = ""
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    unfuse_experts(model, copy_weights=False)
    mto.restore_from_modelopt_state(model, modelopt_state_path=path / "modelopt_state.pth")
    # One shard at a time (each at most 4 GB, models.save_in_dtype): host memory peaks at the
    # model plus one shard, not twice the model.
    expected = set(model.state_dict())
    loaded: set[str] = set()
    unexpected: list[str] = []
    for f in sorted(path.glob("*.safetensors")):
        shard = {}
        for key, value in load_file(str(f)).items():
            for hub, ours in _HUB_BLOCKS.items():
                key = key.replace(hub, ours)
            shard[key] = value
        result = model.load_state_dict(shard, strict=False)
        unexpected += result.unexpected_keys
        loaded.update(k for k in shard if k in expected)
        del shard, result
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = sorted(k for k in expected - loaded if not (tied and k == "lm_head.weight"))
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise OptimizerError(
            f"{path}: the saved tensors do not fit the model with unfused experts "
            f"({len(missing)} missing, {len(unexpected)} unexpected; first: {first})"
        )
    if tied:
        model.tie_weights()
    if device is not None:
        model.to(device)
    return model
