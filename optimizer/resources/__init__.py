"""Files shipped inside the package: recipes, gate suites, offline lm-eval tasks and their
data, calibration sets. A wheel installs them as plain files next to this module, so they
work the same from a checkout and from ``pip install optimizer``.

Layout (the data READMEs carry provenance and licences)::

    recipes/<name>.yaml        optimize run quickstart
    suites/<name>.yaml         gate: {suite: quick}
    evals/tasks/               lm-eval task YAMLs (local_*) + loader.py, utils.py
    evals/data/                their offline data; loader.py finds it as ../data
    calibration/<name>.jsonl   calibration: {dataset: python-docs}
    training/<name>.jsonl      qat/distill: {data: {dataset: <name>}}

Addressing rule, the same for every kind: a reference that names an existing file is that
file (paths keep working exactly as before); otherwise a *name* -- no directory separator,
no file suffix -- is looked up among the shipped files of that kind, and an unknown name is
an error listing the shipped ones with a did-you-mean. (Calibration is the exception the
recipe schema has always had: a name that is neither a file nor shipped is a hub dataset.)

Standard library only: importing this module must not import torch or pydantic.
"""

from __future__ import annotations

from pathlib import Path

from optimizer.registry import UnknownName, did_you_mean

ROOT = Path(__file__).resolve().parent
RECIPES = ROOT / "recipes"
SUITES = ROOT / "suites"
EVALS = ROOT / "evals"
#: lm-eval ``include_path`` of the ``local_*`` tasks; their data is the sibling ``data/``
#: (``evals/tasks/loader.py`` and ``evaluation.task_fingerprint`` both rely on that).
TASKS = EVALS / "tasks"
EVAL_DATA = EVALS / "data"
CALIBRATION = ROOT / "calibration"
TRAINING = ROOT / "training"

#: kind -> (directory, file suffixes that make a file of that kind)
KINDS: dict[str, tuple[Path, tuple[str, ...]]] = {
    "recipe": (RECIPES, (".yaml",)),
    "suite": (SUITES, (".yaml",)),
    "calibration set": (CALIBRATION, (".jsonl", ".json", ".txt")),
    "training set": (TRAINING, (".jsonl", ".json", ".txt")),
}
#: Suffixes that make a reference a file path rather than a name.
FILE_SUFFIXES = (".yaml", ".yml", ".jsonl", ".json", ".txt")

__all__ = [
    "CALIBRATION",
    "EVALS",
    "EVAL_DATA",
    "RECIPES",
    "ROOT",
    "SUITES",
    "TASKS",
    "UnknownName",
    "calibration_set",
    "find",
    "get",
    "is_name",
    "local_path",
    "names",
    "recipe",
    "suite",
]


def local_path(ref: str, base_dir: Path) -> Path:
    """Where a path in a recipe points: absolute as given, else relative to ``base_dir`` (the
    recipe's folder) if that exists, else relative to the current directory."""
    p = Path(ref).expanduser()
    if p.is_absolute():
        return p
    return base_dir / p if (base_dir / p).exists() else p.resolve()


def is_name(ref: str) -> bool:
    """Whether ``ref`` can only be a name: no directory separator, no leading ``.``/``~``,
    no file suffix (``quick``, ``python-docs``; not ``quick.yaml`` or ``./quick``)."""
    ref = str(ref)
    return bool(ref) and not (
        "/" in ref
        or "\\" in ref
        or ref.startswith((".", "~"))
        or ref.lower().endswith(FILE_SUFFIXES)
    )


def names(kind: str) -> list[str]:
    """The shipped names of ``kind`` (a key of ``KINDS``), sorted."""
    directory, suffixes = KINDS[kind]
    if not directory.is_dir():
        return []
    return sorted(
        f.name[: -len(s)]
        for f in directory.iterdir()
        for s in suffixes
        if f.is_file() and f.name.endswith(s)
    )


def find(kind: str, name: str) -> Path | None:
    """The shipped file of ``kind`` called ``name``, or None (no error: for fallbacks)."""
    if not is_name(name):
        return None
    directory, suffixes = KINDS[kind]
    for suffix in suffixes:
        path = directory / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def unknown(kind: str, ref: str) -> str:
    """The message for a reference that is neither a file nor a shipped ``kind``."""
    shipped = names(kind)
    return (
        f"'{ref}' is neither a file nor a shipped {kind}{did_you_mean(ref, shipped)} "
        f"(shipped {kind}s: {', '.join(shipped) or 'none'})"
    )


def get(kind: str, name: str) -> Path:
    """The shipped file of ``kind`` called ``name``; :class:`UnknownName` (an
    ``OptimizerError``, exit 2) naming the shipped ones if there is none."""
    path = find(kind, name)
    if path is None:
        raise UnknownName(unknown(kind, name))
    return path


def recipe(name: str) -> Path:
    """A shipped recipe by name: ``recipe("quickstart")`` -> ``recipes/quickstart.yaml``."""
    return get("recipe", name)


def suite(name: str) -> Path:
    """A shipped gate suite by name: ``suite("quick")`` -> ``suites/quick.yaml``."""
    return get("suite", name)


def calibration_set(name: str) -> Path:
    """A shipped calibration set by name: ``calibration_set("python-docs")``."""
    return get("calibration set", name)
