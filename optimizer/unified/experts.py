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

#: On-disk (gate, up, down) projection names, in the order tried.
PROJECTIONS = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
#: On-disk name of an in-memory MoE block (Mixtral's hub checkpoints say block_sparse_moe).
BLOCK_ALIASES = {"mlp": ("mlp", "block_sparse_moe")}


def fused_experts(model) -> dict[str, Any]:
    """The model's fused expert modules by name (empty for a dense model)."""
    import torch

    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(getattr(m, "gate_up_proj", None), torch.nn.Parameter)
        and isinstance(getattr(m, "down_proj", None), torch.nn.Parameter)
        and m.gate_up_proj.dim() == 3
    }


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
    ``block_sparse_moe.gate.weight`` -> ``mlp.gate.weight``)."""
    modules = {n for n, _ in model.named_modules()}
    out = {}
    for key, value in tensors.items():
        for block, aliases in BLOCK_ALIASES.items():
            for alias in aliases:
                tag = f".{alias}."
                if alias != block and tag in key and key.split(tag)[0] + tag[:-1] not in modules:
                    key = key.replace(tag, f".{block}.")
        out[key] = value
    return out


def rebuild_experts(
    model,
    tensors: dict[str, Any],
    read_projection,
    consumed: set[str],
    target,
    path: Path,
) -> tuple[dict[str, Any], int]:
    """The fused parameters of every experts module (``{state key: tensor}``) and how many
    expert projections were quantized. ``read_projection(disk_name)`` returns ``(weight,
    input_scale or None, act_kind or None)`` for one stored linear and marks its tensors
    consumed."""
    import torch

    state: dict[str, Any] = {}
    quantized = 0
    for name, module in fused_experts(model).items():
        prefix, (gate, up, down) = disk_names(tensors, name)
        n = module.gate_up_proj.shape[0]
        gate_up, downs, scales_in, scales_mid, kinds = [], [], [], [], set()
        for e in range(n):
            g, s_g, k_g = read_projection(f"{prefix}.{e}.{gate}")
            u, s_u, k_u = read_projection(f"{prefix}.{e}.{up}")
            d, s_d, k_d = read_projection(f"{prefix}.{e}.{down}")
            gate_up.append(torch.cat([g, u], dim=0))
            downs.append(d)
            # gate and up read the same input: one scale (ModelOpt shares the quantizer)
            scales_in.append(s_g if s_g is not None else s_u)
            scales_mid.append(s_d)
            kinds |= {k_g, k_u, k_d}
            quantized += sum(k is not None for k in (k_g, k_u, k_d)) or 0
        fused = torch.stack(gate_up)
        if tuple(fused.shape) != tuple(module.gate_up_proj.shape):
            raise OptimizerError(
                f"{path}: {prefix} experts stack to {tuple(fused.shape)}, the architecture "
                f"needs {tuple(module.gate_up_proj.shape)}"
            )
        state[f"{name}.gate_up_proj"] = fused.to(target)
        state[f"{name}.down_proj"] = torch.stack(downs).to(target)
        kinds.discard(None)
        if len(kinds) > 1:
            raise OptimizerError(f"{path}: {prefix} mixes activation formats {sorted(kinds)}")
        if kinds:
            _fake_quant_inputs(module, kinds.pop(), scales_in, scales_mid)
    return state, quantized


def _fake_quant_inputs(module, kind: str, scales_in: list, scales_mid: list) -> None:
    """Give ``module`` the fused forward with each expert's inputs fake-quantized."""
    import torch

    from optimizer.unified.rebuild import fake_activation

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
            pos, tok = torch.where(mask[e])
            x = fake_activation(kind, hidden_states[tok], self.stored_input_scales[e])
            g, u = torch.nn.functional.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
            h = fake_activation(kind, self.act_fn(g) * u, self.stored_down_input_scales[e])
            h = torch.nn.functional.linear(h, self.down_proj[e]) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, h.to(out.dtype))
        return out

    module.forward = types.MethodType(forward, module)
