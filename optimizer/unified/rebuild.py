"""Rebuild the model a ModelOpt unified Hugging Face checkpoint describes, from its files alone.

The gate must score the artifact that ships. ``from_pretrained`` cannot: transformers ignores
ModelOpt's ``quantization_config`` and drops the scale tensors (an FP8 export loads with
warnings only and agrees with the real quantized model on 0.2 % of next-token argmaxes; INT4
and NVFP4 fail with shape errors). This module reads the checkpoint as a serving runtime
would:

- the architecture from its own ``config.json`` (rope base and scaling, norm epsilon, tied
  embeddings: a dropped or wrong field changes the rebuilt model, as it changes the served one);
- every quantized linear's stored weights dequantized with its stored scales (packed INT4,
  FP8, INT8, packed NVFP4 with FP8 block scales and the global scale);
- activations fake-quantized as the quantization config says, with the stored
  ``input_scale`` (static FP8 / INT8; NVFP4 blocks under the stored global scale), after the
  stored AWQ / SmoothQuant ``pre_quant_scale``;
- an FP8 KV cache through ModelOpt's own attention quantizers, set to the stored
  ``k_scale`` / ``v_scale``.

Dequantized weights are exact (they are what the runtime multiplies by), so the weight side
needs no fake quantization. The activation side is written here rather than by re-running
ModelOpt's calibrated quantizers on purpose: a reading independent of the code that wrote
the checkpoint is what catches an export that wrote the wrong numbers. NVFP4's block format
comes from ModelOpt's ``NVFP4QTensor`` (the format's reference implementation).

Anything this reader does not understand — an algorithm it cannot rebuild, a tensor it did
not consume, a tensor the architecture needs that is missing — is refused with
:class:`OptimizerError`, never evaluated approximately.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimizer.errors import OptimizerError
from optimizer.unified import experts

log = logging.getLogger(__name__)

#: quant_algo values this reader rebuilds -> (weight kind, activation kind).
ALGORITHMS: dict[str, tuple[str, str | None]] = {
    "FP8": ("fp8", "fp8"),
    "W8A8_SQ_PER_CHANNEL": ("int8", "int8"),
    "W8A16": ("int8", None),
    "W4A16_AWQ": ("int4", None),
    "W4A8_AWQ": ("int4_fp8", "fp8"),
    "NVFP4": ("nvfp4", "nvfp4"),
    "NVFP4_AWQ": ("nvfp4", "nvfp4"),
    "W4A16_NVFP4": ("nvfp4", None),
}
KV_ALGORITHMS = (None, "FP8")
FP8_MAX = 448.0
NVFP4_BLOCK = 16


#: Stored dtype of the weight and of weight_scale per weight kind (what ModelOpt 0.47 writes).
STORED_DTYPES = {
    "fp8": ("float8_e4m3fn", "float32"),
    "int8": ("int8", "float32"),
    "int4": ("uint8", "float32"),
    "int4_fp8": ("uint8", "float32"),
    "nvfp4": ("uint8", "float8_e4m3fn"),
}


@dataclass(frozen=True)
class QuantScheme:
    """What a unified checkpoint's quantization config says."""

    quant_algo: str
    kv_cache_quant_algo: str | None = None
    #: MIXED_PRECISION: quant_algo per module name.
    per_layer: dict[str, str] = field(default_factory=dict)
    #: Module-name patterns left unquantized (``exclude_modules``).
    exclude: tuple[str, ...] = ()
    group_size: int | None = None

    def excluded(self, module: str) -> bool:
        from fnmatch import fnmatch

        return any(fnmatch(module, pattern) for pattern in self.exclude)

    def algo_of(self, module: str) -> str | None:
        if self.quant_algo == "MIXED_PRECISION":
            return self.per_layer.get(module)
        return self.quant_algo


def read_scheme(path: Path) -> QuantScheme | None:
    """The quantization of the checkpoint at ``path``; None when it is not a ModelOpt export."""
    block = None
    hf_quant = path / "hf_quant_config.json"
    if hf_quant.is_file():
        data = _json(hf_quant)
        block = data.get("quantization") if isinstance(data, dict) else None
        if not isinstance(block, dict):
            raise OptimizerError(f"{hf_quant} has no 'quantization' object")
    else:
        config = _json(path / "config.json")
        quant = config.get("quantization_config") if isinstance(config, dict) else None
        if not (isinstance(quant, dict) and quant.get("quant_method") == "modelopt"):
            return None
        block = quant
    algo = block.get("quant_algo")
    if not isinstance(algo, str):
        raise OptimizerError(f"{path}: the quantization config has no quant_algo")
    per_layer = {}
    if algo == "MIXED_PRECISION":
        layers = block.get("quantized_layers")
        if not isinstance(layers, dict):
            raise OptimizerError(f"{path}: MIXED_PRECISION without a quantized_layers table")
        for name, spec in layers.items():
            if not isinstance(spec, dict) or not isinstance(spec.get("quant_algo"), str):
                raise OptimizerError(f"{path}: quantized_layers[{name!r}] has no quant_algo")
            per_layer[name] = spec["quant_algo"]
    exclude = block.get("exclude_modules", block.get("ignore")) or []
    if not isinstance(exclude, list) or not all(isinstance(x, str) for x in exclude):
        raise OptimizerError(f"{path}: exclude_modules is not a list of module names")
    group = block.get("group_size")
    return QuantScheme(
        algo,
        block.get("kv_cache_quant_algo"),
        per_layer,
        tuple(exclude),
        group if isinstance(group, int) and group > 0 else None,
    )


def scheme_problem(scheme: QuantScheme) -> str | None:
    """Why a checkpoint of ``scheme`` cannot be rebuilt faithfully, or None."""
    algos = set(scheme.per_layer.values()) if scheme.per_layer else {scheme.quant_algo}
    unknown = sorted(a for a in algos if a not in ALGORITHMS)
    if unknown:
        return (
            f"quant_algo {', '.join(unknown)} cannot be rebuilt from the checkpoint (supported: "
            f"{', '.join(ALGORITHMS)}, and MIXED_PRECISION of them)"
        )
    if scheme.kv_cache_quant_algo not in KV_ALGORITHMS:
        return (
            f"kv_cache_quant_algo {scheme.kv_cache_quant_algo} cannot be rebuilt from the "
            "checkpoint (supported: none, FP8)"
        )
    return None


def plan_problem(formats: list[str], kv_cache: str | None) -> str | None:
    """Why an export of these simple formats (optimizer/formats.py names) and KV cache could
    not be rebuilt, or None: the plan-time twin of :func:`scheme_problem`."""
    from optimizer.serving.facts import FORMAT_QUANT_ALGOS

    per_layer = {f: FORMAT_QUANT_ALGOS.get(f, f) for f in formats}
    scheme = QuantScheme(
        "MIXED_PRECISION" if len(per_layer) > 1 else next(iter(per_layer.values()), "FP8"),
        kv_cache.upper() if kv_cache else None,  # KV_CACHE_FORMATS key -> kv_cache_quant_algo
        per_layer if len(per_layer) > 1 else {},
    )
    return scheme_problem(scheme)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise OptimizerError(f"{path} is not readable JSON ({e})") from e


# --------------------------------------------------------------------------- numerics


def unpack_int4_rows(packed):
    """ModelOpt's INT4 packing: byte [i, j] holds rows 2i (low nibble) and 2i+1 (high nibble)
    of column j, signed two's complement."""
    import torch

    low = (packed & 0x0F).to(torch.int16)
    high = (packed >> 4).to(torch.int16)
    rows = torch.stack([low, high], dim=1).reshape(packed.shape[0] * 2, packed.shape[1])
    return torch.where(rows >= 8, rows - 16, rows).to(torch.float32)


def fake_fp8(x, scale):
    import torch

    s = scale.to(torch.float32)
    return ((x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s).to(
        x.dtype
    )


def fake_int8(x, scale):
    s = scale.float()
    return ((x.float() / s).round().clamp(-128, 127) * s).to(x.dtype)


def fake_nvfp4(x, global_scale):
    """NVFP4 round trip of ``x`` in blocks of 16 along the last dimension under the stored
    global scale (per-block scales are computed from the data, as the runtime does)."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    q, block_scale, _ = NVFP4QTensor.quantize(
        x.float(), NVFP4_BLOCK, weights_scaling_factor_2=global_scale.float()
    )
    return q.dequantize(
        dtype=x.dtype,
        scale=block_scale,
        double_scale=global_scale.float(),
        block_sizes={-1: NVFP4_BLOCK},
    )


def dequantize_weight(kind: str, t: dict[str, Any], name: str):
    """The float32 weight of module ``name`` from its stored tensors ``t``."""
    import torch

    w, scale = t["weight"], t["weight_scale"]
    want_w, want_s = STORED_DTYPES[kind]
    if (
        str(w.dtype).removeprefix("torch.") != want_w
        or str(scale.dtype).removeprefix("torch.") != want_s
    ):
        raise OptimizerError(
            f"{name}: weight {w.dtype} / weight_scale {scale.dtype}, the format stores "
            f"{want_w} / {want_s}"
        )
    out_rows = w.shape[0] * (2 if kind in ("int4", "int4_fp8") else 1)
    if w.ndim != 2 or (scale.ndim > 0 and scale.shape[0] != out_rows and scale.numel() != 1):
        raise OptimizerError(f"{name}: weight_scale {tuple(scale.shape)} does not fit the weight")
    if kind == "fp8":
        s = scale.float()
        return w.float() * (s[:, None] if s.ndim == 1 else s)
    if kind == "int8":
        return w.float() * scale.float().reshape(-1, 1)
    if kind in ("int4", "int4_fp8"):
        values = unpack_int4_rows(w)
        groups = scale.shape[-1] if scale.ndim == 2 else 0
        if scale.ndim != 2 or groups == 0 or values.shape[1] % groups:
            raise OptimizerError(
                f"{name}: weight_scale {tuple(scale.shape)} does not tile the weight"
            )
        out = values * scale.float().repeat_interleave(values.shape[1] // groups, dim=1)
        if kind == "int4_fp8":  # W4A8: the INT4 weight is cast to FP8 under weight_scale_2
            out = fake_fp8(out, t["weight_scale_2"])
        return out
    if kind == "nvfp4":
        from modelopt.torch.quantization.qtensor import NVFP4QTensor

        shape = torch.Size((w.shape[0], w.shape[1] * 2))
        if tuple(scale.shape) != (shape[0], shape[1] // NVFP4_BLOCK):
            raise OptimizerError(
                f"{name}: NVFP4 weight_scale {tuple(scale.shape)}, the weight needs "
                f"{(shape[0], shape[1] // NVFP4_BLOCK)}"
            )
        return NVFP4QTensor(shape, torch.float32, w).dequantize(
            dtype=torch.float32,
            scale=scale,
            double_scale=t["weight_scale_2"].float(),
            block_sizes={-1: NVFP4_BLOCK},
        )
    raise AssertionError(kind)


#: Tensors each weight kind consumes besides ``weight`` (``input_scale`` and
#: ``pre_quant_scale`` follow the activation kind and the file).
WEIGHT_TENSORS = {
    "fp8": ("weight_scale",),
    "int8": ("weight_scale",),
    "int4": ("weight_scale",),
    "int4_fp8": ("weight_scale", "weight_scale_2"),
    "nvfp4": ("weight_scale", "weight_scale_2"),
}


def _activation_hook(kind: str | None):
    """A forward pre-hook applying the module's stored ``pre_quant_scale`` and activation
    fake quantization; the scales are non-persistent buffers on the module, so they move
    with the model to its device."""

    def hook(module, args):
        x = args[0]
        pqs = getattr(module, "stored_pre_quant_scale", None)
        if pqs is not None:
            x = x * pqs.to(x.dtype)
        if kind is not None:
            x = fake_activation(kind, x, module.stored_input_scale)
        return (x, *args[1:])

    return hook


def fake_activation(kind: str, x, scale):
    """``x`` fake-quantized as a runtime quantizes a layer's input (``kind``: fp8, int8,
    nvfp4) with the stored ``input_scale``."""
    if kind == "fp8":
        return fake_fp8(x, scale)
    if kind == "int8":
        return fake_int8(x, scale)
    if kind == "nvfp4":
        return fake_nvfp4(x, scale)
    raise ValueError(f"unknown activation kind {kind!r}")


def _read_quantized(path, scheme, tensors: dict[str, Any], name: str, consumed: set[str]):
    """The dequantized weight of the stored quantized linear ``name``, its activation kind,
    scalar ``input_scale`` and ``pre_quant_scale`` (None where the format has none)."""
    prefix = f"{name}." if name else ""
    algo = scheme.algo_of(name) if scheme else None
    if algo is None:
        raise OptimizerError(
            f"{path}: {name} has quantized tensors but the quantization config does not "
            "name its algorithm"
        )
    weight_kind, act_kind = ALGORITHMS[algo]
    local = {}
    for key in ("weight", *WEIGHT_TENSORS[weight_kind]):
        if f"{prefix}{key}" not in tensors:
            raise OptimizerError(f"{path}: {name} ({algo}) lacks {key}")
        local[key] = tensors[f"{prefix}{key}"]
        consumed.add(f"{prefix}{key}")
    try:
        weight = dequantize_weight(weight_kind, local, name)
    except (RuntimeError, ValueError, IndexError) as e:  # malformed packed data
        raise OptimizerError(f"{path}: {name} ({algo}) cannot be dequantized: {e}") from e
    input_scale = tensors.get(f"{prefix}input_scale")
    if act_kind is not None:
        if input_scale is None or input_scale.numel() != 1:
            raise OptimizerError(f"{path}: {name} ({algo}) lacks a scalar input_scale")
        consumed.add(f"{prefix}input_scale")
    pqs = tensors.get(f"{prefix}pre_quant_scale")
    if pqs is not None:
        consumed.add(f"{prefix}pre_quant_scale")
    return weight, act_kind, input_scale if act_kind is not None else None, pqs


# --------------------------------------------------------------------------- the model


#: Read a checkpoint straight onto the GPU (and dequantize there) when its free memory holds
#: this many times the files: the stored tensors, the dequantized weights (2x an FP8 file's
#: bytes in bf16, 4x an INT4 one's) and the temporaries of one layer's dequantization.
GPU_READ_HEADROOM = 5


def read_device(device: str, file_bytes: int, free_bytes: int | None) -> str:
    """Where the stored tensors are read: ``device`` when it is a GPU with room for
    :data:`GPU_READ_HEADROOM` x ``file_bytes`` free (the dequantization then runs there:
    ~5x faster for an 8B model's FP8 export than on the host), else the host."""
    if device == "cpu" or free_bytes is None:
        return "cpu"
    return device if free_bytes >= GPU_READ_HEADROOM * file_bytes else "cpu"


def _load_tensors(path: Path, device: str = "cpu") -> dict[str, Any]:
    """Every tensor of the checkpoint's safetensors files, read onto ``device`` (the host's
    memory when the GPU runs out: another process may have taken what was measured free)."""
    import torch

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise OptimizerError(f"{path} has no *.safetensors files")
    if device != "cpu":
        try:
            return _read_all(files, device)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            log.warning(
                "%s: no room on %s for the checkpoint; reading it on the host", path, device
            )
    return _read_all(files, "cpu")


def _read_all(files: list[Path], device: str) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f), device=device))
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # a corrupt file: the user's to fix
            raise OptimizerError(f"{f} is not a readable safetensors file ({e})") from e
    return tensors


def _bare_model(config, dtype):
    """The architecture ``config`` describes, without its quantization config (transformers
    would try to apply it) and without random initialisation."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


@dataclass
class Rebuilt:
    """What :func:`rebuild` made: the model and a summary for logs and reports."""

    model: Any
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    quantized_layers: int


def rebuild(path: Path, dtype: str, device: str | None = None) -> Rebuilt:
    """The model in ``path`` (a ModelOpt unified HF checkpoint, or a plain one) computing in
    ``dtype`` on ``device`` (default: CUDA when available)."""
    import torch
    from transformers import AutoConfig

    path = Path(path)
    scheme = read_scheme(path)
    if scheme is not None:
        problem = scheme_problem(scheme)
        if problem:
            raise OptimizerError(f"{path}: {problem}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    free = torch.cuda.mem_get_info(torch.device(device))[0] if device != "cpu" else None
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    tensors = _load_tensors(path, read_device(device, size, free))
    return assemble(path, AutoConfig.from_pretrained(path), scheme, tensors, dtype, device)


def assemble(
    path: Path | str,
    config,
    scheme: QuantScheme | None,
    tensors: dict[str, Any],
    dtype: str,
    device: str | None = None,
) -> Rebuilt:
    """The model of the transformers ``config`` with the unified-checkpoint-named ``tensors``
    (``<module>.weight``, ``weight_scale``, ``weight_scale_2``, ``input_scale``,
    ``pre_quant_scale``, ``k_proj.k_scale`` / ``v_proj.v_scale``) quantized as ``scheme``
    says, computing in ``dtype`` on ``device``. ``path`` names the source in messages. Shared
    with :mod:`optimizer.trtllm.rebuild`, which translates a TensorRT-LLM checkpoint into
    these names."""
    import torch

    from optimizer.models import torch_dtype

    target = torch_dtype(dtype)
    model = _bare_model(config, target)
    state: dict[str, Any] = {}
    consumed: set[str] = set()
    quantized: set[str] = set()
    hooks = 0
    if experts.fused_experts(model):
        tensors = experts.rename_blocks(tensors, model)

        def read_projection(name: str):
            """(weight, input_scale, activation kind, quantized, pre_quant_scale) of one
            stored expert projection, by its on-disk name."""
            if f"{name}.weight" not in tensors:
                raise OptimizerError(f"{path}: the checkpoint lacks {name}.weight")
            if f"{name}.weight_scale" not in tensors:  # stored unquantized
                weight = tensors[f"{name}.weight"]
                if not weight.is_floating_point() or weight.element_size() == 1:
                    raise OptimizerError(
                        f"{path}: {name}.weight is stored as {weight.dtype} without the "
                        "weight_scale that gives it meaning"
                    )
                if scheme is not None and scheme.algo_of(name) and not scheme.excluded(name):
                    raise OptimizerError(
                        f"{path}: {name} is neither quantized ({scheme.quant_algo} scales "
                        "missing) nor in exclude_modules"
                    )
                consumed.add(f"{name}.weight")
                return weight.to(target), None, None, False, None
            weight, act_kind, input_scale, pqs = _read_quantized(
                path, scheme, tensors, name, consumed
            )
            quantized.add(name)  # (a MIXED_PRECISION config names experts one by one)
            if pqs is not None and tuple(pqs.shape) != (weight.shape[1],):
                raise OptimizerError(
                    f"{path}: {name}.pre_quant_scale {tuple(pqs.shape)}, the expert takes "
                    f"{weight.shape[1]} inputs"
                )
            return weight, input_scale, act_kind, True, pqs

        expert_state, hooks = experts.rebuild_experts(
            model, tensors, read_projection, fake_activation, consumed, target, path
        )
        state.update(expert_state)
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if not isinstance(module, torch.nn.Linear) or f"{prefix}weight_scale" not in tensors:
            continue
        weight, act_kind, input_scale, pqs = _read_quantized(path, scheme, tensors, name, consumed)
        if tuple(weight.shape) != tuple(module.weight.shape):
            raise OptimizerError(
                f"{path}: {name} dequantizes to {tuple(weight.shape)}, the architecture "
                f"needs {tuple(module.weight.shape)}"
            )
        state[f"{prefix}weight"] = weight.to(target)
        if input_scale is not None:
            module.register_buffer("stored_input_scale", input_scale.float(), persistent=False)
        if pqs is not None:
            if tuple(pqs.shape) != (module.in_features,):
                raise OptimizerError(
                    f"{path}: {name}.pre_quant_scale {tuple(pqs.shape)}, the layer takes "
                    f"{module.in_features} inputs"
                )
            module.register_buffer("stored_pre_quant_scale", pqs.to(target), persistent=False)
        module.register_forward_pre_hook(_activation_hook(act_kind))
        quantized.add(name)
        hooks += 1
    _check_coverage(model, scheme, quantized, path)
    kv_scales = _kv_scales(scheme, tensors, consumed, path)
    for key, value in tensors.items():
        if key not in consumed and key not in state:
            state[key] = value
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise OptimizerError(
            f"{path}: tensors the architecture has no place for (first: {unexpected[0]}; "
            f"{len(unexpected)} in all) — not a checkpoint this reader understands"
        )
    missing = sorted(set(expected) - set(state))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied and any(k.startswith("lm_head.") for k in tensors):
        raise OptimizerError(
            f"{path}: config.json ties lm_head to the embeddings, yet the checkpoint stores "
            "lm_head tensors: which one a runtime uses is ambiguous"
        )
    if tied:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing:
        raise OptimizerError(
            f"{path}: the checkpoint lacks {len(missing)} tensors the architecture needs "
            f"(first: {missing[0]})"
        )
    for key, value in state.items():
        need = expected[key]
        if value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise OptimizerError(
                f"{path}: {key} is stored in {value.dtype} without the scales that give it "
                "meaning (a quantized layer whose weight_scale is missing?)"
            )
        if tuple(value.shape) != tuple(need.shape) or (
            need.is_floating_point() and not value.is_floating_point()
        ):
            raise OptimizerError(
                f"{path}: {key} is {value.dtype} {tuple(value.shape)}, the architecture needs "
                f"{need.dtype} {tuple(need.shape)} (a quantized tensor without its scales?)"
            )
        if value.is_floating_point() and value.dtype != target:
            state[key] = value.to(target)
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    if kv_scales:
        _quantize_kv_cache(model, kv_scales)
    model.eval()
    log.info(
        "rebuilt %s from %s: %d quantized linears, kv cache %s",
        type(model).__name__,
        path,
        hooks,
        scheme.kv_cache_quant_algo if scheme else None,
    )
    return Rebuilt(
        model,
        scheme.quant_algo if scheme else None,
        scheme.kv_cache_quant_algo if scheme else None,
        hooks,
    )


def _check_coverage(model, scheme, quantized: set[str], path: Path) -> None:
    """Every linear the config says is quantized carried its scales, and no other did."""
    import torch

    if scheme is None:
        return
    if scheme.per_layer:
        missing = sorted(set(scheme.per_layer) - quantized)
        if missing:
            raise OptimizerError(
                f"{path}: quantized_layers names {missing[0]} ({len(missing)} in all), which "
                "has no quantized weight in the checkpoint"
            )
        return
    for name, module in model.named_modules():
        if (
            isinstance(module, torch.nn.Linear)
            and name not in quantized
            and not scheme.excluded(name)
        ):
            raise OptimizerError(
                f"{path}: {name} is neither quantized ({scheme.quant_algo} scales missing) nor "
                "in exclude_modules"
            )


def _kv_scales(scheme, tensors, consumed, path) -> dict[str, tuple[Any, Any]]:
    """``{attention module: (k_scale, v_scale)}`` for an FP8 KV cache (ModelOpt stores them on
    ``k_proj`` / ``v_proj``)."""
    found = {k for k in tensors if k.endswith((".k_scale", ".v_scale"))}
    if scheme is None or scheme.kv_cache_quant_algo is None:
        if found:
            raise OptimizerError(
                f"{path}: KV-cache scales ({sorted(found)[0]}) without a kv_cache_quant_algo"
            )
        return {}
    scales: dict[str, list] = {}
    for key in found:
        proj, which = key.rsplit(".", 1)
        attention = proj.rsplit(".", 1)[0]
        scales.setdefault(attention, [None, None])[0 if which == "k_scale" else 1] = tensors[key]
        consumed.add(key)
    if not scales or any(k is None or v is None for k, v in scales.values()):
        raise OptimizerError(
            f"{path}: kv_cache_quant_algo {scheme.kv_cache_quant_algo} but the k_scale/v_scale "
            "tensors are missing or incomplete"
        )
    return {name: (k, v) for name, (k, v) in scales.items()}


def _quantize_kv_cache(model, scales: dict[str, tuple[Any, Any]]) -> None:
    """ModelOpt's KV-cache quantizers (after RoPE, where the runtime's cache is), with the
    stored scales as their range and nothing else quantized."""
    import modelopt.torch.quantization as mtq

    cfg = {
        "quant_cfg": [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": (4, 3), "axis": None}},
        ],
        "algorithm": "max",
    }
    mtq.quantize(model, cfg, forward_loop=None)
    modules = dict(model.named_modules())
    for name, (k_scale, v_scale) in scales.items():
        attention = modules.get(name)
        if attention is None or not hasattr(attention, "k_bmm_quantizer"):
            raise OptimizerError(f"KV-cache scales for {name}, which is not an attention module")
        device = next(model.parameters()).device
        attention.k_bmm_quantizer.amax = (k_scale.float() * FP8_MAX).to(device)
        attention.v_bmm_quantizer.amax = (v_scale.float() * FP8_MAX).to(device)
    unset = [
        n
        for n, m in model.named_modules()
        if n.endswith(("k_bmm_quantizer", "v_bmm_quantizer")) and getattr(m, "amax", None) is None
    ]
    if unset:
        raise OptimizerError(f"no stored KV-cache scale for {unset[0].rsplit('.', 1)[0]}")
