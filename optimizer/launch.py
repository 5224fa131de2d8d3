"""Where this process stands in a multi-process launch (``torchrun`` / ``accelerate launch``
set ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``), and the few collective steps the runner and
the training technique take. One process without a launcher is rank 0 of a world of 1.

Standard library at import; torch only inside the collective helpers.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, str(default)))
    except ValueError:
        return default


def rank() -> int:
    """This process's rank in the job (0 when there is none)."""
    return _env_int("RANK", 0)


def local_rank() -> int:
    """This process's rank on its machine: the GPU it uses."""
    return _env_int("LOCAL_RANK", 0)


def world_size() -> int:
    return _env_int("WORLD_SIZE", 1)


def join_process_group() -> None:
    """Set up the process group now (the Trainer reuses it), so that the ranks can agree on
    things before rank 0 writes anything."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (identity in a single process)."""
    if world_size() == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _group():
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    dist = _group()
    if dist is not None:
        dist.barrier()


def leave_process_group() -> None:
    """Wait for every rank, then leave the process group, so that what rank 0 runs alone
    afterwards sees one process (ModelOpt's exporters gather over an initialised group and
    would wait for ranks that have finished)."""
    dist = _group()
    if dist is not None:
        dist.barrier()
        dist.destroy_process_group()
