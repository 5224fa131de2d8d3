"""Calibration data: texts -> ``num_samples x seq_len`` token windows -> ModelOpt forward loop.

Local files (``.jsonl``, ``.json`` list of records or strings, ``.txt`` with documents
separated by blank lines) resolve relative to the recipe, then the cwd; else a shipped set by
name (``python-docs``: optimizer/resources/calibration); any other name is a Hugging Face hub
dataset (``subset`` and ``split`` select it). Documents are shuffled with ``seed``, tokenised
(optionally through the chat template as a user turn), joined with EOS and cut into full
windows: no padding, so every calibration token is real text.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer import resources
from optimizer.errors import OptimizerError
from optimizer.inputs import Input, file_input, reference_input
from optimizer.registry import did_you_mean

if TYPE_CHECKING:
    from optimizer.recipe import CalibrationSpec

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".jsonl", ".json", ".txt")


def resolve_local(dataset: str, base_dir: Path) -> Path | None:
    """The local file a dataset name refers to (recipe-relative first, then cwd, then a
    shipped calibration set by name: ``python-docs``), or None (a hub dataset name)."""
    for candidate in (base_dir / dataset, Path(dataset).expanduser()):
        if candidate.is_file():
            return candidate.resolve()
    return resources.find("calibration set", dataset)


def check_dataset(spec: CalibrationSpec, base_dir: Path) -> str | None:
    if resolve_local(spec.dataset, base_dir) is not None:
        return None
    if spec.dataset.endswith(LOCAL_SUFFIXES) or spec.dataset.startswith((".", "/", "~")):
        return (
            f"calibration file not found: {spec.dataset} (looked in {base_dir} and the "
            f"current directory; shipped sets by name: {', '.join(resources.names('calibration set'))})"
        )
    return None  # a hub dataset name; reachability is checked when the run starts


def as_input(spec: CalibrationSpec, base_dir: Path) -> Input:
    """The calibration data as a stage input: the local file (hashed), or the hub name."""
    local = resolve_local(spec.dataset, base_dir)
    if local is not None:
        return file_input("calibration_data", local)
    return reference_input("calibration_data", f"hub:{spec.dataset}:{spec.subset}:{spec.split}")


def load_texts(spec: CalibrationSpec, base_dir: Path) -> list[str]:
    local = resolve_local(spec.dataset, base_dir)
    texts = _read_local(local, spec.text_field) if local else _read_hub(spec)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise OptimizerError(f"calibration dataset {spec.dataset} holds no text")
    return texts


def _read_local(path: Path, field: str) -> list[str]:
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
    elif path.suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise OptimizerError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(records, list):
            raise OptimizerError(f"{path}: expected a JSON list of records or strings")
    else:
        raise OptimizerError(
            f"{path}: unsupported calibration file type (use {', '.join(LOCAL_SUFFIXES)})"
        )
    return [_text_of(r, field, path) for r in records]


def _text_of(record: Any, field: str, path: Path) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict) and isinstance(record.get(field), str):
        return record[field]
    keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
    raise OptimizerError(
        f"{path}: a record has no text field '{field}' (it has: {keys}); set calibration.text_field"
    )


def _read_hub(spec: CalibrationSpec) -> list[str]:
    from optimizer.models import hub_unreachable_reason

    reason = hub_unreachable_reason()
    if reason:
        shipped = resources.names("calibration set")
        raise OptimizerError(
            f"calibration dataset '{spec.dataset}' is not a local file and the hub cannot be "
            f"reached: {reason}. Point calibration.dataset at a local .jsonl/.txt file or a "
            f"shipped set by name{did_you_mean(spec.dataset, shipped)} (shipped: {', '.join(shipped)})."
        )
    import datasets

    try:
        ds = datasets.load_dataset(spec.dataset, spec.subset, split=spec.split)
    except Exception as e:  # datasets raises many types; all mean "cannot load what you named"
        raise OptimizerError(f"cannot load hub dataset '{spec.dataset}': {e}") from None
    if spec.text_field not in ds.column_names:
        raise OptimizerError(
            f"hub dataset '{spec.dataset}' has no column '{spec.text_field}' "
            f"(columns: {', '.join(ds.column_names)}); set calibration.text_field"
        )
    return list(ds[spec.text_field])


def tokenize(spec: CalibrationSpec, texts: list[str], tokenizer) -> Any:
    """Pack texts into a ``[num_samples, seq_len]`` LongTensor of real tokens."""
    import torch

    order = list(range(len(texts)))
    random.Random(spec.seed).shuffle(order)
    need = spec.num_samples * spec.seq_len
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for i in order:
        if spec.chat_template:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": texts[i]}], tokenize=True, return_dict=False
            )
            ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        else:
            ids = tokenizer(texts[i], add_special_tokens=True)["input_ids"]
        stream.extend(ids + sep)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise OptimizerError(
            f"calibration dataset {spec.dataset} yields {len(stream)} tokens, but num_samples x "
            f"seq_len = {spec.num_samples} x {spec.seq_len} = {need} are needed; lower them or "
            "use a larger dataset"
        )
    return torch.tensor(stream[:need], dtype=torch.long).view(spec.num_samples, spec.seq_len)


def batches(tokens, batch_size: int) -> Iterator[Any]:
    for start in range(0, tokens.shape[0], batch_size):
        yield tokens[start : start + batch_size]


def forward_loop(tokens, batch_size: int, desc: str = "calibrating") -> Callable[[Any], None]:
    """The ``forward_loop(model)`` ModelOpt calibrates with: every window through the model."""
    import torch
    from tqdm.auto import tqdm

    def loop(model) -> None:
        device = next(model.parameters()).device
        n = (tokens.shape[0] + batch_size - 1) // batch_size
        with torch.no_grad():
            for batch in tqdm(batches(tokens, batch_size), total=n, desc=desc, unit="batch"):
                model(input_ids=batch.to(device))

    return loop
