"""What the machine can do, answered without importing torch (validation must stay fast):
is there a CUDA GPU, and does the CPU do half-precision math natively."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def gpu_present() -> bool:
    """True when an NVIDIA GPU is visible to this process (driver present, not hidden)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        return True
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
            return out.returncode == 0 and "GPU" in out.stdout
        except (OSError, subprocess.TimeoutExpired):
            return False
    return False


#: CPU flags (Linux /proc/cpuinfo) that mean native half-precision matrix math. Without them
#: torch emulates bf16/fp16 matmuls: measured 5x slower than float32 on a 2-core AVX2 EPYC.
NATIVE_HALF_FLAGS = {
    "bfloat16": {"avx512_bf16", "amx_bf16", "bf16"},  # x86 AVX512-BF16 / AMX; aarch64 BF16
    "float16": {"avx512_fp16", "amx_fp16", "fphp"},  # x86 AVX512-FP16 / AMX-FP16; aarch64 FP16
}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (x86 ``flags``, aarch64 ``Features``); empty where unknown."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_has_native(dtype: str, flags: set[str] | None = None) -> bool:
    """Does this CPU do ``dtype`` (bfloat16/float16) matrix math natively?"""
    wanted = NATIVE_HALF_FLAGS.get(dtype)
    if wanted is None:
        return True  # float32
    return bool(wanted & (cpu_flags() if flags is None else flags))


def compute_dtype(
    storage: str, requested: str = "auto", *, cuda: bool, flags: set[str] | None = None
) -> str:
    """The dtype that calibration, training and evaluation compute in.

    ``requested`` other than ``auto`` wins. ``auto`` keeps the storage dtype on a GPU and on
    a CPU that has native support for it; on a CPU without (no AVX512-BF16/AMX for bf16) it
    computes half-precision models in float32, which is exact for the stored weights and
    several times faster there. Saved and exported artifacts keep ``storage`` either way.
    """
    if requested != "auto":
        return requested
    if cuda or cpu_has_native(storage, flags):
        return storage
    return "float32"


def release_memory() -> None:
    """Give back what dropped models held, before the next one loads.

    Dropping a model frees its tensors only once nothing references them, and modules that
    reference each other wait for the cyclic garbage collector; CUDA's caching allocator keeps
    freed blocks besides. On the H200 the gate's baseline load peaked at 23.1 GiB allocated
    after the 8B-shaped export (bench/results/pipeline_vs_bare-gpu.md; the model is 15 GB), so
    every stage boundary that drops a model collects and empties the cache here (a CPU run
    shows no model or tensor surviving a stage; the GPU peak is not re-measured since). torch
    is not imported here unless a stage already did."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
