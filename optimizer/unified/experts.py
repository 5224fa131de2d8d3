"""Mixture-of-experts layers of a unified HF checkpoint, rebuilt into transformers 5's fused
experts (part of :mod:`optimizer.unified.rebuild`).

ModelOpt writes each expert of a fused ``*Experts`` module (``gate_up_proj`` [E, 2F, H],
``down_proj`` [E, H, F] in memory) under its per-expert hub names: Qwen3-MoE
``mlp.experts.E.{gate,up,down}_proj``, Mixtral ``block_sparse_moe.experts.E.{w1,w3,w2}`` with
the router at ``block_sparse_moe.gate``. This module dequantizes every expert's projections
with the rebuild's own readers, stacks them into the fused parameters, and gives the module a
forward that scales each expert's inputs by its stored ``pre_quant_scale`` (AWQ, SmoothQuant)
and fake-quantizes them with its stored ``input_scale`` — what a serving engine applies, which
transformers' own fused forward has no place for (hence a forward written here, the same
routing arithmetic as transformers 5's ``MixtralExperts`` / ``Qwen3MoeExperts``).
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

from optimizer.errors import OptimizerError
from optimizer.techniques.moe import fused_experts

#: On-disk (gate, up, down) projection names, in the order tried.
PROJECTIONS = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
#: On-disk name of an in-memory MoE block (Mixtral's hub checkpoints say block_sparse_moe).
BLOCK_ALIASES = {"mlp": ("mlp", "block_sparse_moe")}


def disk_names(tensors: dict[str, Any], experts: str) -> tuple[str, tuple[str, str, str]]:
    """The on-disk prefix of expert 0's block and the projection names, for the in-memory
    experts module ``experts`` (``model.layers.N.mlp.experts``)."""
    block_path, leaf = experts.rsplit(".", 1)
    parent, block = block_path.rsplit(".", 1)
    for alias in BLOCK_ALIASES.get(block, (block,)):
        for names in PROJECTIONS:
            if f"{parent}.{alias}.{leaf}.0.{names[0]}.weight" in tensors:
                return f"{parent}.{alias}.{leaf}", names
    raise OptimizerError(f"no per-expert tensors for {experts} (looked for {experts}.0.gate_proj)")


def rename_blocks(tensors: dict[str, Any], model) -> dict[str, Any]:
    """Plain tensors of aliased MoE blocks under their in-memory names (Mixtral's router:
    ``block_sparse_moe.gate.weight`` -> ``mlp.gate.weight``); expert tensors keep their
    on-disk names, which the quantization config's per-layer names and exclusions use."""
    modules = {n for n, _ in model.named_modules()}
    out = {}
    for key, value in tensors.items():
        for block, aliases in BLOCK_ALIASES.items():
            for alias in aliases:
                tag = f".{alias}."
                if (
                    alias != block
                    and tag in key
                    and ".experts." not in key
                    and key.split(tag)[0] + tag[:-1] not in modules
                ):
                    key = key.replace(tag, f".{block}.")
        out[key] = value
    return out


def rebuild_experts(
    model,
    tensors: dict[str, Any],
    read_projection,
    fake_activation,
    consumed: set[str],
    target,
    path: Path,
) -> tuple[dict[str, Any], int]:
    """The fused parameters of every experts module (``{state key: tensor}``) and how many
    expert projections were stored quantized. ``read_projection(disk_name)`` returns
    ``(weight, input_scale or None, act_kind or None, quantized, pre_quant_scale or None)``
    for one stored linear and marks its tensors consumed; ``fake_activation(kind, x, scale)``
    is the rebuild's input quantization (passed in: this module is part of the rebuild, not
    above it)."""
    import torch

    state: dict[str, Any] = {}
    quantized = 0
    for name, module in fused_experts(model).items():
        prefix, (gate, up, down) = disk_names(tensors, name)
        n, two_f, hidden = module.gate_up_proj.shape
        f = two_f // 2
        want = {gate: (f, hidden), up: (f, hidden), down: (hidden, f)}
        gate_up, downs, kinds = [], [], set()
        inputs: dict[str, list] = {"scale": [], "mid_scale": [], "pqs": [], "mid_pqs": []}
        for e in range(n):
            read = {}
            for proj in (gate, up, down):
                where = f"{prefix}.{e}.{proj}"
                weight, scale, kind, stored_quantized, pqs = read_projection(where)
                if tuple(weight.shape) != want[proj]:
                    raise OptimizerError(
                        f"{path}: {where}.weight is {tuple(weight.shape)}, the architecture "
                        f"needs {want[proj]}"
                    )
                read[proj] = (weight, scale, pqs)
                kinds.add(kind)
                quantized += stored_quantized
            (g, s_g, p_g), (u, s_u, p_u), (d, s_d, p_d) = read[gate], read[up], read[down]
            # Runtimes fuse gate and up into one GEMM over one input: one scale of each kind.
            for what, a, b in (("input_scales", s_g, s_u), ("pre_quant_scales", p_g, p_u)):
                if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                    raise OptimizerError(
                        f"{path}: {prefix}.{e}: {gate} and {up} read the same input but store "
                        f"different {what}"
                        + (
                            f" ({a.item():g}, {b.item():g})"
                            if a is not None and a.numel() == 1 and b is not None
                            else ""
                        )
                    )
            gate_up.append(torch.cat([g, u], dim=0))
            downs.append(d)
            inputs["scale"].append(s_g)
            inputs["mid_scale"].append(s_d)
            inputs["pqs"].append(p_g)
            inputs["mid_pqs"].append(p_d)
        state[f"{name}.gate_up_proj"] = torch.stack(gate_up).to(target)
        state[f"{name}.down_proj"] = torch.stack(downs).to(target)
        if len(kinds) > 1:
            # the forward below reads a block's experts in one format
            # (architectures.moe_exclude_problem refuses exclusions of single experts)
            raise OptimizerError(
                f"{path}: {prefix} mixes quantized and unquantized expert projections "
                f"({', '.join(sorted(str(k) for k in kinds))})"
            )
        kind = kinds.pop()
        for key, values in inputs.items():
            present = {v is not None for v in values}
            if present == {True, False}:
                raise OptimizerError(
                    f"{path}: {prefix}: some experts store a "
                    f"{'pre_quant_scale' if 'pqs' in key else 'input_scale'} and others not"
                )
            inputs[key] = values if present == {True} else None
        if kind is not None or inputs["pqs"] is not None or inputs["mid_pqs"] is not None:
            _quantize_inputs(module, kind, inputs, fake_activation, target)
    return state, quantized


def _quantize_inputs(module, kind: str | None, inputs: dict, fake_activation, target):
    """Give ``module`` the fused forward with each expert's inputs scaled by their stored
    ``pre_quant_scale`` (AWQ) and then fake-quantized (``kind``), as the dense layers'
    activation hook does (rebuild.py)."""
    import torch

    def buffer(key: str, values, dtype):
        if values is not None:
            stacked = torch.stack(
                [v.to(dtype).reshape(v.shape if v.numel() > 1 else ()) for v in values]
            )
            module.register_buffer(key, stacked, False)
        else:
            setattr(module, key, None)

    buffer("stored_input_scales", inputs["scale"], torch.float32)
    buffer("stored_down_input_scales", inputs["mid_scale"], torch.float32)
    buffer("stored_pre_quant_scales", inputs["pqs"], target)
    buffer("stored_down_pre_quant_scales", inputs["mid_pqs"], target)

    def quantize_input(x, e, pqs, scale):
        if pqs is not None:
            x = x * pqs[e].to(x.dtype)
        if kind is not None:
            x = fake_activation(kind, x, scale[e])
        return x

    def forward(self, hidden_states, top_k_index, top_k_weights):
        from optimizer.techniques.unfused_experts import routed_tokens

        out = torch.zeros_like(hidden_states)
        for e, pos, tok in routed_tokens(top_k_index, self.num_experts):
            x = quantize_input(
                hidden_states[tok], e, self.stored_pre_quant_scales, self.stored_input_scales
            )
            g, u = torch.nn.functional.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
            h = quantize_input(
                self.act_fn(g) * u,
                e,
                self.stored_down_pre_quant_scales,
                self.stored_down_input_scales,
            )
            h = torch.nn.functional.linear(h, self.down_proj[e]) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, h.to(out.dtype))
        return out

    module.forward = types.MethodType(forward, module)
