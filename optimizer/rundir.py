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

from pydantic import ValidationError

from optimizer import launch
from optimizer.errors import OptimizerError
from optimizer.models import sha256_file
from optimizer.run_record import READABLE_VERSIONS, SCHEMA_VERSION, RunRecord

RUN_JSON = "run.json"
#: What marks a sweep's directory (optimizer/sweep.py): its variants' runs live below it.
SWEEP_JSON = "sweep.json"
#: Written when a run of ours creates (or first claims an empty) run directory: only a
#: directory holding it (or, from before the marker, a run.json of ours and nothing else
#: foreign) is ours to clean (``--force``, temporaries).
MARKER = ".optimizer-run"
MARKER_TEXT = "optimizer run directory: created by optimize; --force may delete its contents\n"
#: Top-level names a run of ours creates besides its artifacts.
_OWN_NAMES = {RUN_JSON, "recipe.yaml", "logs", "stages", ".lock", MARKER}
_OWN_PREFIXES = (".tmp-", ".stale-", ".checkpoints-", f".{RUN_JSON}.tmp-", ".recipe.yaml.tmp-")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def refuse_symlink(path: Path) -> None:
    if path.is_symlink():
        raise OptimizerError(
            f"{path} is a symbolic link; a run never writes through links in its run "
            "directory. Remove it or choose another directory with -o"
        )


def open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that refuses a symbolic link at ``path`` (exit 2, never its target)."""
    try:
        return os.open(path, flags | _NOFOLLOW | _CLOEXEC, mode)
    except OSError as e:
        if path.is_symlink():
            refuse_symlink(path)
        raise OptimizerError(f"cannot write {path}: {e.strerror or e}") from None


def open_log(path: Path):
    """``path`` opened for appending text, never through a symbolic link."""
    refuse_symlink(path.parent)
    fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    return os.fdopen(fd, "a", encoding="utf-8")


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see the old or the new content, never a torn one (and
    never through a symbolic link: the temporary is created afresh, the rename replaces a
    link at ``path`` rather than its target)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def check_output_dir(path: Path) -> None:
    """Refuse (exit 2) an output directory that cannot be one: a file, a path under a file,
    a directory this process cannot write."""
    path = Path(os.path.abspath(path))
    for p in (path, *path.parents):
        if p.is_symlink() and not p.exists():
            raise OptimizerError(f"-o {path}: {p} is a dangling symbolic link")
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == path else f"lies under {p}, which is a file"
                raise OptimizerError(f"-o {path} {what}, not a run directory; choose another -o")
            if not os.access(p, os.W_OK | os.X_OK):
                raise OptimizerError(f"-o {path}: {p} is not writable; choose another -o")
            return


def _is_bytecode(path: Path) -> bool:
    """Python's bytecode cache: written by whoever imports a helper (lm-eval task utilities),
    never content."""
    return path.suffix == ".pyc" or "__pycache__" in path.parts


def sha256_tree(path: Path) -> str:
    """Content hash of a file or a directory (relative paths and file contents, sorted;
    bytecode caches left out)."""
    return sha256_trees([path])[0]


def sha256_trees(paths: list[Path]) -> list[str]:
    """:func:`sha256_tree` of each of ``paths``, their files hashed concurrently.

    A stage's outputs are tens of GB of weights right after they were written (in the page
    cache): one sha256 stream runs at ~1 GB/s on one core, so hashing an 8B model's hand-over
    and both exports one file after another cost ~30 s on the H200 machine
    (bench/results/pipeline_vs_bare-gpu.md). hashlib releases the GIL on large buffers, so
    threads hash files in parallel; the digests are those of the sequential definition."""
    from concurrent.futures import ThreadPoolExecutor

    # Per path: whether it is a file (its digest is the file's), and its (relative name, file)s.
    trees: list[tuple[bool, list[tuple[str, Path]]]] = []
    for path in paths:
        if path.is_file():
            trees.append((True, [("", path)]))
            continue
        files = (
            p for p in path.rglob("*") if p.is_file() and not _is_bytecode(p.relative_to(path))
        )
        trees.append((False, [(f.relative_to(path).as_posix(), f) for f in sorted(files)]))
    every = [f for _, tree in trees for _, f in tree]
    # Largest first, so one big file does not start last and run alone.
    order = sorted(range(len(every)), key=lambda i: -every[i].stat().st_size)
    workers = max(1, min(8, os.cpu_count() or 1, len(every)))
    with ThreadPoolExecutor(workers) as pool:
        done = dict(zip(order, pool.map(sha256_file, [every[i] for i in order]), strict=True))
    digests, i = [], 0
    for is_file, tree in trees:
        if is_file:
            digests.append(done[i])
            i += 1
            continue
        h = hashlib.sha256()
        for rel, _ in tree:
            h.update(rel.encode() + b"\0" + done[i].encode() + b"\n")
            i += 1
        digests.append(h.hexdigest())
    return digests


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
        if not self.writer or not self.owned():
            return
        pattern = ".checkpoints-*" if index is None else f".checkpoints-{index:02d}-*"
        for p in self.path.glob(pattern):
            if p.name in keep:
                continue
            if p.is_symlink():
                p.unlink()  # a link planted in the run directory: remove it, not its target
            else:
                shutil.rmtree(p, ignore_errors=True)

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    def lock(self) -> None:
        """Refuse a second concurrent run on this directory (the OS drops the lock if we die).
        A directory we create (or find empty) gets our marker."""
        if not self.writer:
            return
        check_output_dir(self.path)
        fresh = not self.path.exists() or not any(p.name != ".lock" for p in self.path.iterdir())
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OptimizerError(
                f"cannot create run directory {self.path}: {e.strerror or e}; choose another -o"
            ) from None
        fd = open_nofollow(self.path / ".lock", os.O_RDWR | os.O_CREAT)
        fh = os.fdopen(fd, "a+")
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
        if fresh:
            try:
                write_atomic(self.marker, MARKER_TEXT)
            except BaseException:
                self.unlock()
                raise

    def lock_held(self) -> bool:
        """Whether a live process holds this directory's lock (a run in progress)."""
        lock = self.path / ".lock"
        if lock.is_symlink() or not lock.is_file():
            return False
        try:
            fd = os.open(lock, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            os.close(fd)  # (closing drops a lock we took)
        return False

    def check_files(self) -> None:
        """Refuse symbolic links where a run writes (exit 2, before anything is written).
        Stage outputs are renamed into stages/NN-name/, so a link at stages/ or below it would
        put them wherever it points; a link at a top-level artifact's own name is harmless
        (the rename replaces the link, not its target)."""
        if (self.path / SWEEP_JSON).exists() or (self.path / SWEEP_JSON).is_symlink():
            raise OptimizerError(
                f"{self.path} holds a sweep ({SWEEP_JSON}), not a run; its variants' runs are "
                f"in {self.path / 'variants'}. Choose another directory with -o"
            )
        stages = self.path / "stages"
        for p in (self.run_json, self.path / "recipe.yaml", self.logs, self.marker, stages):
            refuse_symlink(p)
        for where in (self.logs, stages):
            if where.is_dir():
                for p in where.iterdir():
                    refuse_symlink(p)

    def owned(self) -> bool:
        """Whether a run of ours made this directory: our marker, or (a directory from before
        the marker) a valid run.json and nothing a run of ours does not create."""
        m = self.marker
        if not m.is_symlink() and m.is_file():
            try:
                return m.read_text() == MARKER_TEXT
            except (OSError, UnicodeDecodeError):
                return False
        try:
            record = self.read()
        except OptimizerError:
            return False
        if record is None:
            return False
        own = set(_OWN_NAMES)
        recorded = list(record.artifacts.values()) + [
            o.path for s in record.stages for o in (s.outputs or {}).values()
        ]
        for path in recorded:
            p = Path(path)
            if p.is_absolute() and p.is_relative_to(self.path) and p != self.path:
                own.add(p.relative_to(self.path).parts[0])
        return all(p.name in own or p.name.startswith(_OWN_PREFIXES) for p in self.path.iterdir())

    def outside(self, record: RunRecord, *, relative_ok: bool = False) -> list[str]:
        """Output and artifact paths recorded in ``record`` that lie outside this directory
        (links resolved). A relative path counts as outside (a run of ours records absolute
        ones) unless ``relative_ok``: then it is read as relative to this directory."""
        paths = list(record.artifacts.values()) + [
            o.path for s in record.stages for o in (s.outputs or {}).values()
        ]

        def inside(p: str) -> bool:
            path = Path(p)
            if not path.is_absolute() and not relative_ok:
                return False
            return (self.path / path).resolve().is_relative_to(self.path)

        return [p for p in paths if not inside(p)]

    def unlock(self) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def read(self, *, require_version: bool = True) -> RunRecord | None:
        """The recorded run, or None if there is none; OptimizerError if it is unreadable or
        not a RunRecord. ``require_version=False`` (reports) reads a record without
        ``schema_version`` as the current schema."""
        refuse_symlink(self.run_json)
        try:
            data = json.loads(self.run_json.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise OptimizerError(
                f"{self.run_json} is not valid JSON ({e}); cannot trust it"
            ) from None
        if not isinstance(data, dict):
            raise OptimizerError(
                f"{self.run_json} holds a JSON {type(data).__name__}, not a run record; "
                "use another directory (or --force on a run directory of ours)"
            )
        version = data.get("schema_version", None if require_version else SCHEMA_VERSION)
        if version not in READABLE_VERSIONS:
            raise OptimizerError(
                f"{self.run_json} has schema_version {version!r}; this optimizer reads "
                f"{', '.join(map(str, READABLE_VERSIONS))}. Use another directory or --force."
            )
        try:
            return RunRecord.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(map(str, first["loc"])) or "(top level)"
            more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
            raise OptimizerError(
                f"{self.run_json} does not describe a run: {where}: {first['msg']}{more}"
            ) from None
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
        """Drop what an interrupted run left half-written (never trusted, never reused), in a
        directory of ours only (a foreign ``.tmp-x`` is not ours to delete)."""
        if not self.writer or not self.owned():
            return
        for p in self.path.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in self.path.glob(".stale-*"):
            shutil.rmtree(p, ignore_errors=True)

    def clear(self) -> None:
        """Delete a previous run's contents (for --force), keeping the lock file and our
        marker; a directory that is not ours (``owned``) is refused and nothing deleted."""
        if not self.writer:
            return
        if not self.owned():
            raise OptimizerError(
                f"{self.path} was not created by optimize (no {MARKER} marker, and no run.json "
                "of ours with nothing else in it); --force deletes only run directories of "
                "ours. Delete it yourself, or choose another directory with -o"
            )
        for p in self.path.iterdir():
            if p.name in (".lock", MARKER):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        if not self.marker.is_file():
            write_atomic(self.marker, MARKER_TEXT)  # (a directory from before the marker)
