"""Is there a CUDA GPU here? Answered without importing torch (validation must stay fast)."""

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
