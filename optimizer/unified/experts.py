"""Mixture-of-experts layers of a unified HF checkpoint, rebuilt into transformers 5's fused
experts (part of :mod:`optimizer.unified.rebuild`).

ModelOpt writes each expert of a fused ``*Experts`` module (``gate_up_proj`` [E, 2F, H],
``down_proj`` [E, H, F] in memory) under its per-expert hub names: Qwen3-MoE
``mlp.experts.E.{gate,up,down}_proj``, Mixtral ``block_sparse_moe.experts.E.{w1,w3,w2}`` with
the router at ``block_sparse_moe.gate``. This module dequantizes every expert's projections
with the rebuild's own readers, stacks them into the fused parameters, and gives the module a
forward that fake-quantizes each expert's inputs with its stored ``input_scale`` — the
activation quantization a serving engine applies, which transformers' own fused forward has
no place for (hence a forward written here, the same routing arithmetic as transformers 5's
``MixtralExperts`` / ``Qwen3MoeExperts``).
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
    ``(weight, input_scale or None, act_kind or None, quantized)`` for one stored linear and
    marks its tensors consumed; ``fake_activation(kind, x, scale)`` is the rebuild's input
    quantization (passed in: this module is part of the rebuild, not above it)."""
    import torch

    state: dict[str, Any] = {}
    quantized = 0
    for name, module in fused_experts(model).items():
        prefix, (gate, up, down) = disk_names(tensors, name)
        n, two_f, hidden = module.gate_up_proj.shape
        f = two_f // 2
        want = {gate: (f, hidden), up: (f, hidden), down: (hidden, f)}
        gate_up, downs, scales_in, scales_mid, kinds = [], [], [], [], set()
        for e in range(n):
            read = {}
            for proj in (gate, up, down):
                where = f"{prefix}.{e}.{proj}"
                weight, scale, kind, stored_quantized = read_projection(where)
                if tuple(weight.shape) != want[proj]:
                    raise OptimizerError(
                        f"{path}: {where}.weight is {tuple(weight.shape)}, the architecture "
                        f"needs {want[proj]}"
                    )
                read[proj] = (weight, scale, kind)
                kinds.add(kind)
                quantized += stored_quantized
            (g, s_g, _), (u, s_u, _), (d, s_d, _) = read[gate], read[up], read[down]
            if s_g is not None and s_u is not None and not torch.equal(s_g, s_u):
                # Runtimes fuse gate and up into one GEMM with one input scale.
                raise OptimizerError(
                    f"{path}: {prefix}.{e}: {gate} and {up} read the same input but store "
                    f"different input_scales ({s_g.item():g}, {s_u.item():g})"
                )
            gate_up.append(torch.cat([g, u], dim=0))
            downs.append(d)
            scales_in.append(s_g if s_g is not None else s_u)
            scales_mid.append(s_d)
        state[f"{name}.gate_up_proj"] = torch.stack(gate_up).to(target)
        state[f"{name}.down_proj"] = torch.stack(downs).to(target)
        if len(kinds) > 1:
            # ModelOpt quantizes fused experts as a whole (architectures.moe_exclude_problem)
            raise OptimizerError(
                f"{path}: {prefix} mixes quantized and unquantized expert projections "
                f"({', '.join(sorted(str(k) for k in kinds))})"
            )
        kind = kinds.pop()
        if kind is not None:
            _fake_quant_inputs(module, kind, scales_in, scales_mid, fake_activation)
    return state, quantized


def _fake_quant_inputs(module, kind: str, scales_in: list, scales_mid: list, fake_activation):
    """Give ``module`` the fused forward with each expert's inputs fake-quantized."""
    import torch

    module.register_buffer(
        "stored_input_scales", torch.stack([s.float().reshape(()) for s in scales_in]), False
    )
    module.register_buffer(
        "stored_down_input_scales",
        torch.stack([s.float().reshape(()) for s in scales_mid]),
        False,
    )

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts)
            mask = mask.permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for (e,) in hit.tolist():
            if e == self.num_experts:  # the expert-parallel sentinel: not on this rank
                continue
            pos, tok = torch.where(mask[e])
            x = fake_activation(kind, hidden_states[tok], self.stored_input_scales[e])
            g, u = torch.nn.functional.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
            h = fake_activation(kind, self.act_fn(g) * u, self.stored_down_input_scales[e])
            h = torch.nn.functional.linear(h, self.down_proj[e]) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, h.to(out.dtype))
        return out

    module.forward = types.MethodType(forward, module)
