"""Calibration data: texts -> ``num_samples x seq_len`` token windows -> ModelOpt forward loop.

Local files (``.jsonl``, ``.json`` list of records or strings, ``.txt`` with documents
separated by blank lines) resolve relative to the recipe, then the cwd; else a shipped set by
name (``python-docs``: optimizer/resources/calibration); any other name is a Hugging Face hub
dataset (``subset`` and ``split`` select it). Documents are shuffled with ``seed``, tokenised
(optionally through the chat template as a user turn), joined with EOS and cut into full
windows: no padding, so every calibration token is real text.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer import documents
from optimizer.errors import OptimizerError
from optimizer.inputs import Input

if TYPE_CHECKING:
    from optimizer.recipe import CalibrationSpec

log = logging.getLogger(__name__)

KIND = "calibration set"


def resolve_local(dataset: str, base_dir: Path) -> Path | None:
    """The local file a dataset name refers to (recipe-relative first, then cwd, then a
    shipped calibration set by name: ``python-docs``), or None (a hub dataset name)."""
    return documents.resolve_local(dataset, base_dir, KIND)


def check_dataset(spec: CalibrationSpec, base_dir: Path) -> str | None:
    return documents.missing_file(spec.dataset, base_dir, KIND)


def as_input(spec: CalibrationSpec, base_dir: Path) -> Input:
    """The calibration data as a stage input: the local file (hashed), or the hub name."""
    return documents.as_input(
        "calibration_data", spec.dataset, spec.subset, spec.split, base_dir, KIND
    )


def load_texts(spec: CalibrationSpec, base_dir: Path) -> list[str]:
    records, where = documents.read(spec.dataset, spec.subset, spec.split, base_dir, KIND)
    texts = [
        documents.field_of(r, spec.text_field, where, "calibration.text_field") for r in records
    ]
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise OptimizerError(
            f"{where}: field '{spec.text_field}' holds {type(bad).__name__}, not text; "
            "set calibration.text_field"
        )
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise OptimizerError(f"calibration dataset {spec.dataset} holds no text")
    return texts


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


def logits_kwargs(model) -> dict[str, Any]:
    """``{"logits_to_keep": 1}`` when no quantizer of the output layer is enabled, else ``{}``.

    Nothing calibrates on the logits then (the output layer is the last module, and its
    input quantizer, if any, is off), so computing them for the last position only gives the
    same scales, while a 128k-token vocabulary makes them the largest activation of a
    calibration batch (1 GiB in bf16 at 8 x 512 tokens) and ~13 % of an 8B Llama's FLOPs.
    Models whose ``forward`` takes no ``logits_to_keep`` get ``{}``.
    """
    import inspect

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return {}
    if any(getattr(m, "is_enabled", False) for m in head.modules() if m is not head):
        return {}
    try:
        parameters = inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}


#: ``batch_size: auto`` where nothing is measured (a CPU, a model spread over devices), and
#: for the stages that batch calibration data for more than a forward (gradients, logits).
DEFAULT_BATCH_SIZE = 8
#: Share of the free GPU memory a calibration batch may take, and the margin over one
#: window's measured forward: ModelOpt's calibrators add temporaries the plain forward does
#: not show (an |x| copy per quantizer input; AWQ's search scales inputs and outputs per
#: candidate), here bounded by three more copies of the activations.
AUTO_SHARE, AUTO_MARGIN = 0.5, 4.0
#: Bigger batches gain nothing measurable once a forward is this many windows.
AUTO_LIMIT = 64


def choose_batch_size(model, tokens, batch_size: int | str) -> Any:
    """The calibration batch size for ``model`` (a :class:`optimizer.batching.Choice`):
    the recipe's number, or for ``auto`` one window's forward measured on the GPU and as many
    windows as fit (at most :data:`AUTO_LIMIT` and the number of windows). Call it before
    quantizers are inserted: the measured forward must calibrate nothing."""
    from optimizer import batching
    from optimizer.models import input_device

    windows = int(tokens.shape[0])
    if batch_size != batching.AUTO:
        return batching.Choice(int(batch_size), measured=False, reason="from the recipe")
    extra = logits_kwargs(model)

    def one_window() -> None:
        model(input_ids=tokens[:1].to(input_device(model)), **extra)

    return batching.measure(
        model,
        one_window,
        limit=min(AUTO_LIMIT, windows),
        fallback=DEFAULT_BATCH_SIZE,
        share=AUTO_SHARE,
        margin=AUTO_MARGIN,
    )


def forward_loop(tokens, batch_size: int, desc: str = "calibrating") -> Callable[[Any], None]:
    """The ``forward_loop(model)`` ModelOpt calibrates with: every window through the model
    (logits of the last position only where nothing calibrates on them: :func:`logits_kwargs`)."""
    import torch
    from tqdm.auto import tqdm

    from optimizer.models import input_device

    def loop(model) -> None:
        device = input_device(model)  # not `meta` when the first layers are offloaded
        extra = logits_kwargs(model)
        n = (tokens.shape[0] + batch_size - 1) // batch_size
        with torch.no_grad():
            for batch in tqdm(batches(tokens, batch_size), total=n, desc=desc, unit="batch"):
                model(input_ids=batch.to(device), **extra)

    return loop
