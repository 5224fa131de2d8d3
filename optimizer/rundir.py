"""The run directory contract: ``run.json``, ``recipe.yaml``, ``logs/``, a lock, atomic writes.

Layout (DESIGN.md): ``DIR/run.json`` (status, resolved recipe and its sha256, versions, device,
per-stage records, artifacts), ``DIR/recipe.yaml``, ``DIR/logs/run.log``; artifacts at
``DIR/<key>`` (``trtllm_checkpoint``, ``hf_checkpoint``, ...); intermediate models at
``DIR/stages/NN-<stage>/model``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from optimizer.errors import OptimizerError
from optimizer.models import sha256_file

RUN_JSON = "run.json"
SCHEMA_VERSION = 1


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see the old or the new content, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def sha256_tree(path: Path) -> str:
    """Content hash of a file or a directory (relative paths and file contents, sorted)."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temporary output over its final location."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        stale = final.with_name(f".stale-{final.name}-{os.getpid()}")
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)


class RunDirectory:
    def __init__(self, path: Path):
        self.path = path.resolve()
        self._lock_fh = None

    @property
    def run_json(self) -> Path:
        return self.path / RUN_JSON

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def stage_dir(self, index: int, name: str) -> Path:
        return self.path / "stages" / f"{index:02d}-{name}"

    def lock(self) -> None:
        """Refuse a second concurrent run on this directory (the OS drops the lock if we die)."""
        self.path.mkdir(parents=True, exist_ok=True)
        fh = open(self.path / ".lock", "a+")  # noqa: SIM115 (held until unlock())
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise OptimizerError(
                f"{self.path} is in use by another optimize run (pid {holder}); wait for it or "
                "choose another output directory with -o"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._lock_fh = fh

    def unlock(self) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.run_json.read_text())
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise OptimizerError(
                f"{self.run_json} is not valid JSON ({e}); cannot resume from it"
            ) from None

    def write(self, record: dict[str, Any]) -> None:
        write_atomic(self.run_json, json.dumps(record, indent=2, default=str) + "\n")

    def remove_temporaries(self) -> None:
        """Drop what an interrupted run left half-written (never trusted, never reused)."""
        for p in self.path.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in self.path.glob(".stale-*"):
            shutil.rmtree(p, ignore_errors=True)

    def clear(self) -> None:
        """Delete a previous run's contents (for --force), keeping the lock file."""
        for p in self.path.iterdir():
            if p.name == ".lock":
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
