"""What a stage reads besides its recipe section and the model: files, directories, package
versions, images and other references by name. A stage declares them (``Stage.inputs``); the runner hashes them
into the stage's fingerprint and records the digests in ``run.json``, so editing a gate
suite, a task file or a training-data file makes ``--resume`` redo exactly the stages that
read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

InputKind = Literal["file", "dir", "checkpoint", "package", "reference"]


@dataclass(frozen=True)
class Input:
    """One thing a stage reads. ``label`` names it in run.json (``suite``, ``tasks``)."""

    kind: InputKind
    label: str
    ref: str

    def digest(self) -> str:
        """Identity of the content: sha256 of a file or a directory tree (a model checkpoint:
        small files by content, weight files by size and mtime), a package's
        installed version, a reference itself (an image is exact only when pinned by
        ``@sha256:``)."""
        if self.kind in ("file", "dir"):
            from optimizer.rundir import sha256_tree

            path = Path(self.ref)
            return sha256_tree(path) if path.exists() else "missing"
        if self.kind == "checkpoint":
            from optimizer.models import fingerprint_dir

            path = Path(self.ref)
            return fingerprint_dir(path) if path.is_dir() else "missing"
        if self.kind == "package":
            try:
                return metadata.version(self.ref)
            except metadata.PackageNotFoundError:
                return "not installed"
        return self.ref


def file_input(label: str, path: Path) -> Input:
    return Input("file", label, str(path))


def dir_input(label: str, path: Path) -> Input:
    return Input("dir", label, str(path))


def checkpoint_input(label: str, path: Path) -> Input:
    return Input("checkpoint", label, str(path))


def package_input(name: str) -> Input:
    return Input("package", name, name)


def reference_input(label: str, ref: str) -> Input:
    """Something known by name only: a container image, a hub dataset."""
    return Input("reference", label, ref)


def digests(inputs: list[Input]) -> dict[str, str]:
    """``{label: digest}``; a label used twice is an error in the stage's declaration."""
    out: dict[str, str] = {}
    for item in inputs:
        if item.label in out:
            raise ValueError(f"input label {item.label!r} declared twice")
        out[item.label] = item.digest()
    return out
