"""Training data for the training stages: documents -> packed token windows, train/held-out.

A dataset is a local ``.jsonl``/``.json``/``.txt`` file, a shipped training set by name
(optimizer/resources/training, with provenance), or a hub dataset (see
optimizer/documents.py). A record is chat-style (``{"messages": [{"role", "content"}, ...]}``,
rendered through the model's chat template) or text (``{"text": ...}`` or a plain string).
Documents are shuffled with the seed, a fraction is held out *by document* (so no held-out
text is trained on), and each split is tokenised, joined with EOS and cut into full
``seq_len`` windows: no padding, every label a real token.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from optimizer import documents
from optimizer.errors import OptimizerError
from optimizer.inputs import Input

KIND = "training set"
#: The shipped set a training stage uses when the recipe names none.
DEFAULT_DATASET = "chitchat-en"

#: A document: prose, or a conversation (a list of ``{"role", "content"}`` turns).
Document = str | list[dict[str, str]]


class TrainingData(BaseModel):
    """The ``data:`` section of a training stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = Field(
        DEFAULT_DATASET,
        description="local .jsonl/.json/.txt file (relative to the recipe), a shipped training "
        "set by name, or a hub dataset name",
    )
    subset: str | None = None
    split: str = "train"
    text_field: str = "text"
    messages_field: str = "messages"
    #: Render conversations through the tokenizer's chat template ("auto": when it has one).
    chat_template: Literal["auto"] | bool = "auto"
    #: Share of documents held out for the eval loss.
    eval_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.05
    #: At most this many held-out windows are evaluated (and as many training windows for the
    #: training-loss-before/after comparison).
    max_eval_samples: Annotated[int, Field(gt=0)] = 64

    def problem(self, base_dir: Path) -> str | None:
        return documents.missing_file(self.dataset, base_dir, KIND)

    def as_input(self, base_dir: Path) -> Input:
        return documents.as_input(
            "training_data", self.dataset, self.subset, self.split, base_dir, KIND
        )


def load_documents(spec: TrainingData, base_dir: Path) -> list[Document]:
    records, where = documents.read(spec.dataset, spec.subset, spec.split, base_dir, KIND)
    docs = [_document(r, spec, where) for r in records]
    docs = [d for d in docs if _has_text(d)]
    if len(docs) < 2:
        raise OptimizerError(
            f"training dataset {spec.dataset} holds {len(docs)} document(s); at least 2 are "
            "needed (one to train on, one held out)"
        )
    return docs


def _has_text(doc: Document) -> bool:
    if isinstance(doc, str):
        return bool(doc.strip())
    return any(t["content"].strip() for t in doc)


def _document(record: Any, spec: TrainingData, where: str) -> Document:
    if isinstance(record, dict) and spec.messages_field in record:
        turns = record[spec.messages_field]
        ok = isinstance(turns, list) and all(
            isinstance(t, dict)
            and isinstance(t.get("role"), str)
            and isinstance(t.get("content"), str)
            for t in turns
        )
        if not ok:
            raise OptimizerError(
                f"{where}: field '{spec.messages_field}' must be a list of "
                '{"role": ..., "content": ...} turns'
            )
        return [{"role": t["role"], "content": t["content"]} for t in turns]
    text = documents.field_of(
        record, spec.text_field, where, "data.text_field (or data.messages_field for chat)"
    )
    if not isinstance(text, str):
        raise OptimizerError(
            f"{where}: field '{spec.text_field}' holds {type(text).__name__}, not text"
        )
    return text


class PackedWindows:
    """A map-style dataset of ``[seq_len]`` windows for transformers' Trainer (labels are the
    inputs: the model shifts them)."""

    def __init__(self, tokens):
        self.tokens = tokens  # LongTensor [n, seq_len]

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        row = self.tokens[i]
        return {"input_ids": row, "labels": row.clone(), "attention_mask": torch.ones_like(row)}

    def head(self, n: int) -> PackedWindows:
        return PackedWindows(self.tokens[:n])


@dataclass
class Splits:
    train: PackedWindows
    heldout: PackedWindows
    train_documents: int
    heldout_documents: int
    chat: bool

    @property
    def seq_len(self) -> int:
        return int(self.train.tokens.shape[1])

    def summary(self) -> dict[str, Any]:
        return {
            "train_windows": len(self.train),
            "heldout_windows": len(self.heldout),
            "train_documents": self.train_documents,
            "heldout_documents": self.heldout_documents,
            "seq_len": self.seq_len,
            "chat_template": self.chat,
        }


def build_splits(
    spec: TrainingData, docs: list[Document], tokenizer, seq_len: int, seed: int
) -> Splits:
    """Shuffle, hold out ``eval_fraction`` of the documents, tokenise and pack each split."""
    return pack_splits(spec, *split_documents(spec, docs, seed), tokenizer, seq_len)


def pack_splits(
    spec: TrainingData,
    train_docs: list[Document],
    heldout_docs: list[Document],
    tokenizer,
    seq_len: int,
) -> Splits:
    """Tokenise and pack documents already split (see :func:`split_documents`)."""
    docs = train_docs + heldout_docs
    has_template = bool(getattr(tokenizer, "chat_template", None))
    chats = any(isinstance(d, list) for d in docs)
    if chats and spec.chat_template is True and not has_template:
        raise OptimizerError(
            "data.chat_template is true, but the model's tokenizer has no chat template"
        )
    use_template = chats and has_template and spec.chat_template is not False
    heldout = [_render(d, tokenizer, use_template) for d in heldout_docs]
    train = [_render(d, tokenizer, use_template) for d in train_docs]
    train_windows = _pack(train, tokenizer, seq_len, None, spec.dataset, "training")
    heldout_windows = _pack(
        heldout, tokenizer, seq_len, spec.max_eval_samples, spec.dataset, "held-out"
    )
    return Splits(
        PackedWindows(train_windows),
        PackedWindows(heldout_windows),
        len(train),
        len(heldout),
        use_template,
    )


def split_documents(
    spec: TrainingData, docs: list[Document], seed: int
) -> tuple[list[Document], list[Document]]:
    """(training, held-out) documents: shuffled with ``seed``, ``eval_fraction`` held out."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_heldout = min(len(docs) - 1, max(1, round(spec.eval_fraction * len(docs))))
    return [docs[i] for i in order[n_heldout:]], [docs[i] for i in order[:n_heldout]]


def _render(doc: Document, tokenizer, use_template: bool) -> str:
    if isinstance(doc, str):
        return doc
    if use_template:
        try:
            return tokenizer.apply_chat_template(doc, tokenize=False)
        except Exception as e:  # jinja raises its own types (e.g. "roles must alternate")
            roles = ", ".join(t["role"] for t in doc)
            raise OptimizerError(
                f"the model's chat template refuses a conversation (roles: {roles}): {e}; fix "
                "the data or set data.chat_template: false"
            ) from None
    return "\n\n".join(t["content"] for t in doc)


def _pack(texts: list[str], tokenizer, seq_len: int, limit: int | None, name: str, what: str):
    import torch

    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    need = None if limit is None else limit * seq_len
    # No tokenizer-added specials: a chat template writes its own, and documents are
    # separated by EOS (as in calibration), not wrapped in BOS.
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(list(ids) + sep)
        if need is not None and len(stream) >= need:
            break
    n = len(stream) // seq_len
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        raise OptimizerError(
            f"the {what} split of {name} holds {len(stream)} tokens, fewer than one window of "
            f"seq_len {seq_len}; lower seq_len, raise data.eval_fraction or use more data"
        )
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
