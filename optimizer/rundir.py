"""The run directory contract: ``run.json``, ``recipe.yaml``, ``logs/``, a lock, atomic writes.

Layout (DESIGN.md): ``DIR/run.json`` (status, resolved recipe and its sha256, versions, device,
per-stage records, artifacts), ``DIR/recipe.yaml``, ``DIR/logs/run.log``; artifacts at
``DIR/<key>`` (``trtllm_checkpoint``, ``hf_checkpoint``, ...); intermediate models at
``DIR/stages/NN-<stage>/model``.

Rank-aware: in a multi-process job (``torchrun`` sets ``RANK``) only rank 0 locks, writes
and commits; the other ranks read, and their scratch outputs are per rank and never
committed, so processes of one stage cannot collide on a file. (How ranks agree — on the
previous run, and after the last multi-process stage — is the runner's: optimizer/pipeline.py.)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

from optimizer import launch
from optimizer.errors import OptimizerError
from optimizer.models import sha256_file
from optimizer.run_record import READABLE_VERSIONS, RunRecord

RUN_JSON = "run.json"


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see the old or the new content, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _is_bytecode(path: Path) -> bool:
    """Python's bytecode cache: written by whoever imports a helper (lm-eval task utilities),
    never content."""
    return path.suffix == ".pyc" or "__pycache__" in path.parts


def sha256_tree(path: Path) -> str:
    """Content hash of a file or a directory (relative paths and file contents, sorted;
    bytecode caches left out)."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    files = (p for p in path.rglob("*") if p.is_file() and not _is_bytecode(p.relative_to(path)))
    for f in sorted(files):
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
    def __init__(self, path: Path, rank: int | None = None):
        self.path = path.resolve()
        self.rank = launch.rank() if rank is None else rank
        self._lock_fh = None

    @property
    def writer(self) -> bool:
        """Whether this process writes the run directory (rank 0)."""
        return self.rank == 0

    @property
    def run_json(self) -> Path:
        return self.path / RUN_JSON

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def stage_dir(self, index: int, name: str) -> Path:
        return self.path / "stages" / f"{index:02d}-{name}"

    def temp_output(self, index: int, key: str) -> Path:
        """A fresh scratch directory for a stage output (per rank off rank 0)."""
        suffix = "" if self.writer else f"-rank{self.rank}"
        tmp = self.path / f".tmp-{index:02d}-{key}{suffix}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def checkpoints(self, index: int, name: str) -> Path:
        """Where stage ``index`` keeps its own checkpoints (training): one path for every rank,
        kept across a killed run (``remove_temporaries`` leaves it) until the stage commits."""
        return self.path / f".checkpoints-{index:02d}-{name}"

    def drop_checkpoints(self, index: int | None = None, keep: set[str] = frozenset()) -> None:
        """Remove stage ``index``'s checkpoints (all stages' if None), except those named in
        ``keep`` (directory names)."""
        if not self.writer:
            return
        pattern = ".checkpoints-*" if index is None else f".checkpoints-{index:02d}-*"
        for p in self.path.glob(pattern):
            if p.name in keep:
                continue
            if p.is_symlink():
                p.unlink()  # a link planted in the run directory: remove it, not its target
            else:
                shutil.rmtree(p, ignore_errors=True)

    def lock(self) -> None:
        """Refuse a second concurrent run on this directory (the OS drops the lock if we die)."""
        if not self.writer:
            return
        if self.path.exists() and not self.path.is_dir():
            raise OptimizerError(f"{self.path} is a file, not a run directory; choose another -o")
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

    def read(self) -> RunRecord | None:
        """The recorded run, or None if there is none; OptimizerError if it is unreadable."""
        try:
            data = json.loads(self.run_json.read_text())
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise OptimizerError(
                f"{self.run_json} is not valid JSON ({e}); cannot resume from it"
            ) from None
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version not in READABLE_VERSIONS:
            raise OptimizerError(
                f"{self.run_json} has schema_version {version!r}; this optimizer reads "
                f"{', '.join(map(str, READABLE_VERSIONS))}. Use another directory or --force."
            )
        try:
            return RunRecord.model_validate(data)
        except ValueError as e:
            raise OptimizerError(f"{self.run_json} does not describe a run ({e})") from None

    def write(self, record: RunRecord) -> None:
        if self.writer:
            write_atomic(self.run_json, record.to_json())

    def write_text(self, name: str, text: str) -> None:
        """Write ``DIR/name`` atomically (rank 0 only)."""
        if self.writer:
            write_atomic(self.path / name, text)

    def commit(self, tmp: Path, final: Path) -> None:
        """Move a finished scratch output into place (rank 0); other ranks drop theirs."""
        if self.writer:
            replace_dir(tmp, final)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    def remove_temporaries(self) -> None:
        """Drop what an interrupted run left half-written (never trusted, never reused)."""
        if not self.writer:
            return
        for p in self.path.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in self.path.glob(".stale-*"):
            shutil.rmtree(p, ignore_errors=True)

    def clear(self) -> None:
        """Delete a previous run's contents (for --force), keeping the lock file."""
        if not self.writer:
            return
        for p in self.path.iterdir():
            if p.name == ".lock":
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
