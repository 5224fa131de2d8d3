"""Datasets named in a recipe -> records: a local file, a shipped set by name, or a hub dataset.

One addressing rule for calibration and training data. A reference resolves relative to the
recipe, then the current directory, then among the shipped sets of its kind
(``optimizer/resources``); any other name is a Hugging Face hub dataset (``subset`` and
``split`` select it). Local files are ``.jsonl`` (one record per line), ``.json`` (a list of
records or strings) or ``.txt`` (documents separated by blank lines). A record is a string
or a dict; what a caller takes from it (a text field, chat messages) is the caller's business.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from optimizer import resources
from optimizer.errors import OptimizerError
from optimizer.inputs import Input, file_input, reference_input
from optimizer.registry import did_you_mean

LOCAL_SUFFIXES = (".jsonl", ".json", ".txt")


def resolve_local(dataset: str, base_dir: Path, kind: str) -> Path | None:
    """The local file ``dataset`` refers to (recipe-relative, cwd, then a shipped ``kind`` by
    name), or None: a hub dataset name."""
    for candidate in (base_dir / dataset, Path(dataset).expanduser()):
        if candidate.is_file():
            return candidate.resolve()
    return resources.find(kind, dataset)


def missing_file(dataset: str, base_dir: Path, kind: str) -> str | None:
    """The problem with a reference that looks like a file but is none (else None: a file, a
    shipped set, or a hub name whose reachability is checked when the run starts)."""
    if resolve_local(dataset, base_dir, kind) is not None:
        return None
    if dataset.endswith(LOCAL_SUFFIXES) or dataset.startswith((".", "/", "~")):
        return (
            f"{kind.split()[0]} file not found: {dataset} (looked in {base_dir} and the current "
            f"directory; shipped {kind}s by name: {', '.join(resources.names(kind)) or 'none'})"
        )
    return None


def as_input(
    label: str, dataset: str, subset: str | None, split: str, base_dir: Path, kind: str
) -> Input:
    """The dataset as a stage input: the local file (hashed), or the hub reference."""
    local = resolve_local(dataset, base_dir, kind)
    if local is not None:
        return file_input(label, local)
    return reference_input(label, f"hub:{dataset}:{subset}:{split}")


def read_local(path: Path) -> list[Any]:
    """The records of a local file (strings or dicts)."""
    if path.suffix == ".txt":
        return [doc.strip() for doc in path.read_text(encoding="utf-8").split("\n\n")]
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError as e:
                    raise OptimizerError(f"{path}:{n}: not valid JSON: {e}") from None
        return records
    if path.suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise OptimizerError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(records, list):
            raise OptimizerError(f"{path}: expected a JSON list of records or strings")
        return records
    raise OptimizerError(f"{path}: unsupported file type (use {', '.join(LOCAL_SUFFIXES)})")


def read_hub(dataset: str, subset: str | None, split: str, kind: str) -> list[dict[str, Any]]:
    """The rows of a hub dataset; a clear error when the hub is unreachable."""
    from optimizer.models import hub_unreachable_reason

    reason = hub_unreachable_reason()
    if reason:
        shipped = resources.names(kind)
        raise OptimizerError(
            f"{kind.split()[0]} dataset '{dataset}' is not a local file and the hub cannot be "
            f"reached: {reason}. Point it at a local .jsonl/.txt file or a shipped {kind} by "
            f"name{did_you_mean(dataset, shipped)} (shipped: {', '.join(shipped) or 'none'})."
        )
    import datasets

    try:
        ds = datasets.load_dataset(dataset, subset, split=split)
    except Exception as e:  # datasets raises many types; all mean "cannot load what you named"
        raise OptimizerError(f"cannot load hub dataset '{dataset}': {e}") from None
    return list(ds)


def read(
    dataset: str, subset: str | None, split: str, base_dir: Path, kind: str
) -> tuple[list[Any], str]:
    """The records of ``dataset`` and where they came from (a path, or ``hub:<name>``)."""
    local = resolve_local(dataset, base_dir, kind)
    if local is not None:
        return read_local(local), str(local)
    return read_hub(dataset, subset, split, kind), f"hub:{dataset}"


def field_of(record: Any, field: str, where: str, setting: str) -> Any:
    """``record[field]`` (or the record itself if it is a string); an error naming the keys
    the record does have and the recipe ``setting`` that chooses the field."""
    if isinstance(record, str):
        return record
    if isinstance(record, dict) and field in record:
        return record[field]
    keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
    raise OptimizerError(
        f"{where}: a record has no field '{field}' (it has: {keys}); set {setting}"
    )
