"""Offline dataset loader for the ``local_*`` lm-eval tasks.

lm-eval 0.4.13 calls a task's ``custom_dataset`` as
``custom_dataset(**metadata, **dataset_kwargs)`` and expects a mapping from
split name to ``datasets.Dataset`` (it indexes ``self.dataset[split]``). The
task YAMLs pass ``dataset_kwargs: {local_files: {<split>: <file>}}``; the files
are looked up in ``evals/data`` relative to *this* module, so the working
directory of the calling process does not matter. Everything else lm-eval
passes (task metadata such as ``version``, TaskManager metadata) is ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_local(local_files: dict[str, str] | None = None, **_ignored) -> datasets.DatasetDict:
    """Build a DatasetDict from ``{split_name: jsonl file name in evals/data}``."""
    if not local_files:
        raise ValueError("load_local needs dataset_kwargs.local_files = {split: file.jsonl}")
    data_dir = Path(os.environ.get("OPTIMIZER_EVALS_DATA_DIR", DATA_DIR))
    splits = {}
    for split, name in local_files.items():
        path = data_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"local eval data not found: {path} (run evals/build_data.py)")
        rows = _read_jsonl(path)
        if not rows:
            raise ValueError(f"{path} is empty")
        # In-memory dataset: no HF cache, no hub access, stored order preserved.
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)
