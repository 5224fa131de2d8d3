"""Mixture-of-experts calibration coverage: how many calibration tokens each expert received.

The ptq stage quantizes MoE experts one module each (optimizer/techniques/unfused_experts.py):
ModelOpt 0.47 then gives every expert projection its own weight quantizer, calibrated from
the expert's weights (so an expert that no calibration token reached still gets a weight
scale), and syncs the input scales of a block's experts to their maximum; AWQ gives an expert
without tokens a ``pre_quant_scale`` of 1, then the export averages it over the block's
experts. What ModelOpt does not report is which experts the calibration data never reached
(it counts tokens per expert only with ``moe_calib_experts_ratio`` set): their activations
were never seen, so their share of the block's scales is a guess. This module counts the
tokens each router sends to each expert, with forward hooks on the routers (transformers 5's
``*TopKRouter`` modules return ``(logits, scores, indices)``; unfusing keeps them), so the
ptq stage can report the experts that got none. The counts add up every forward pass of the
calibration (algorithms that run the data more than once count it more than once): zero is
what they tell exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


def fused_experts(model) -> dict[str, Any]:
    """The model's fused expert modules (transformers 5: ``gate_up_proj`` [E, 2F, H] and
    ``down_proj`` [E, H, F] parameters) by name; empty for a dense model."""
    import torch

    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(getattr(m, "gate_up_proj", None), torch.nn.Parameter)
        and isinstance(getattr(m, "down_proj", None), torch.nn.Parameter)
        and m.gate_up_proj.dim() == 3
    }


def quantized_expert_projections(model) -> list[str]:
    """``<experts>.<e>.<proj>`` of every expert projection ModelOpt quantizes inside fused
    experts (a ``<proj>_weight_quantizers`` list, one per expert: families ptq does not unfuse,
    or a hand-over saved before it did); unfused experts are plain quantized linears, counted
    with the others."""
    names = []
    for name, module in model.named_modules():
        for child, quantizers in module.named_children():
            if child.endswith("_weight_quantizers"):
                proj = child.removesuffix("_weight_quantizers")
                names += [
                    f"{name}.{e}.{proj}"
                    for e, q in enumerate(quantizers)
                    if getattr(q, "is_enabled", False)
                ]
    return names


def routers(model) -> dict[str, Any]:
    """The model's expert routers by module name (empty for a dense model)."""
    return {
        name: module
        for name, module in model.named_modules()
        if type(module).__name__.endswith("TopKRouter")
        and getattr(module, "weight", None) is not None
        and module.weight.dim() == 2
    }


def _indices(output) -> Any:
    """The routed expert indices in a router's output (its integer tensor)."""
    import torch

    items = output if isinstance(output, tuple) else (output,)
    for item in reversed(items):
        if isinstance(item, torch.Tensor) and not item.is_floating_point():
            return item
    return None


@contextlib.contextmanager
def count_routed_tokens(model) -> Iterator[dict[str, list[int]]]:
    """Count, while in the context, the tokens each router sends to each of its experts:
    ``{router name: [tokens of expert 0, 1, ...]}`` (filled in place)."""
    import torch

    counts: dict[str, list[int]] = {}
    handles = []
    for name, router in routers(model).items():
        n = router.weight.shape[0]
        counts[name] = [0] * n

        def hook(module, args, output, name=name, n=n):
            idx = _indices(output)
            if idx is not None:
                got = torch.bincount(idx.flatten().cpu(), minlength=n).tolist()
                counts[name] = [a + b for a, b in zip(counts[name], got, strict=True)]

        handles.append(router.register_forward_hook(hook))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def coverage(counts: dict[str, list[int]]) -> dict[str, Any] | None:
    """The summary the ptq stage records: experts, those without tokens, the fewest tokens."""
    if not counts:
        return None
    cold = [f"{name}[{e}]" for name, per in counts.items() for e, c in enumerate(per) if c == 0]
    every = [c for per in counts.values() for c in per]
    return {
        "routers": len(counts),
        "experts": len(every),
        "experts_without_tokens": cold,
        "fewest_tokens": min(every),
        "tokens_per_expert_median": sorted(every)[len(every) // 2],
    }
