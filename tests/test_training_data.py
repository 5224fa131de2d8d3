"""Training data: documents -> packed windows, held out by document, chat rendering, errors,
the shipped set by name, determinism (optimizer/training_data.py)."""

import json
import re
from pathlib import Path

import pytest
import torch
from tiny import REPO, make_tokenizer

from optimizer.errors import OptimizerError
from optimizer.inputs import file_input
from optimizer.training_data import PackedWindows, TrainingData, build_splits, load_documents

CHITCHAT = REPO / "optimizer" / "resources" / "training" / "chitchat-en.jsonl"
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
FILLER = (
    "The quick brown fox jumps over the lazy dog while the interpreter evaluates each "
    "expression in turn and returns the value of the last one. "
)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture
def templated(tok, monkeypatch):
    """The tiny tokenizer with a chat template (restored after the test)."""
    monkeypatch.setattr(tok, "chat_template", TEMPLATE)
    return tok


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def marked_docs(n: int) -> list[str]:
    """``n`` documents, each opening with a unique marker ``[doc NNN]``."""
    return [f"[doc {i:03d}] " + FILLER * 2 for i in range(n)]


def decoded(windows: PackedWindows, tok) -> str:
    return tok.decode(windows.tokens.flatten().tolist(), skip_special_tokens=True)


def markers(text: str) -> set[int]:
    return {int(m) for m in re.findall(r"\[doc (\d{3})\]", text)}


# ------------------------------------------------------------------ held-out split


@pytest.mark.parametrize(("n", "fraction", "heldout"), [(40, 0.25, 10), (40, 0.05, 2), (3, 0.9, 2)])
def test_heldout_split_is_by_document_disjoint_and_sized_by_eval_fraction(
    tok, n, fraction, heldout
):
    spec = TrainingData(eval_fraction=fraction, max_eval_samples=10_000)
    splits = build_splits(spec, marked_docs(n), tok, 32, seed=0)
    assert (splits.heldout_documents, splits.train_documents) == (heldout, n - heldout)
    train, held = markers(decoded(splits.train, tok)), markers(decoded(splits.heldout, tok))
    assert not train & held  # no held-out document is trained on
    # Every document's marker is in its split; only the cut-off tail of a split (less than one
    # window) can lose the last document's.
    assert len(held) in (heldout, heldout - 1) and len(train) in (n - heldout, n - heldout - 1)
    assert len(train | held) >= n - 2


def test_heldout_keeps_at_least_one_document_each_side(tok):
    spec = TrainingData(eval_fraction=0.01)
    splits = build_splits(spec, marked_docs(2), tok, 16, seed=0)
    assert (splits.train_documents, splits.heldout_documents) == (1, 1)
    spec = TrainingData(eval_fraction=0.99)
    splits = build_splits(spec, marked_docs(2), tok, 16, seed=0)
    assert (splits.train_documents, splits.heldout_documents) == (1, 1)


def test_heldout_windows_are_capped_by_max_eval_samples(tok):
    spec = TrainingData(eval_fraction=0.5, max_eval_samples=3)
    splits = build_splits(spec, marked_docs(40), tok, 16, seed=0)
    assert len(splits.heldout) == 3
    assert len(splits.train) > 3  # the training split is not capped


# ------------------------------------------------------------------ chat records

CHATS = [
    {
        "messages": [
            {"role": "user", "content": f"question {i}: " + FILLER},
            {"role": "assistant", "content": f"answer {i}: " + FILLER},
        ]
    }
    for i in range(12)
]


def test_chat_records_are_rendered_through_the_chat_template(templated, tmp_path):
    spec = TrainingData(dataset=str(write_jsonl(tmp_path / "chat.jsonl", CHATS)))
    docs = load_documents(spec, tmp_path)
    assert docs[0] == CHATS[0]["messages"]
    splits = build_splits(spec, docs, templated, 32, seed=0)
    assert splits.chat is True and splits.summary()["chat_template"] is True
    text = decoded(splits.train, templated)
    assert "<user>question" in text and "<assistant>answer" in text


def test_chat_records_without_a_template_are_joined_as_plain_content(tok, tmp_path):
    assert not tok.chat_template
    spec = TrainingData(dataset=str(write_jsonl(tmp_path / "chat.jsonl", CHATS)))
    splits = build_splits(spec, load_documents(spec, tmp_path), tok, 32, seed=0)
    assert splits.chat is False
    text = decoded(splits.train, tok)
    assert "question" in text and "answer" in text
    assert "<user>" not in text and "<assistant>" not in text


def test_chat_template_false_ignores_the_template(templated, tmp_path):
    spec = TrainingData(
        dataset=str(write_jsonl(tmp_path / "chat.jsonl", CHATS)), chat_template=False
    )
    splits = build_splits(spec, load_documents(spec, tmp_path), templated, 32, seed=0)
    assert splits.chat is False and "<user>" not in decoded(splits.train, templated)


def test_chat_template_true_without_a_template_is_an_error(tok, tmp_path):
    spec = TrainingData(
        dataset=str(write_jsonl(tmp_path / "chat.jsonl", CHATS)), chat_template=True
    )
    docs = load_documents(spec, tmp_path)
    with pytest.raises(OptimizerError, match="chat_template is true, but .* no chat template"):
        build_splits(spec, docs, tok, 32, seed=0)


def test_a_custom_messages_field(templated, tmp_path):
    records = [{"conv": c["messages"]} for c in CHATS]
    spec = TrainingData(
        dataset=str(write_jsonl(tmp_path / "c.jsonl", records)), messages_field="conv"
    )
    splits = build_splits(spec, load_documents(spec, tmp_path), templated, 32, seed=0)
    assert splits.chat is True


# ------------------------------------------------------------------ windows


def test_windows_are_full_seq_len_with_labels_equal_to_inputs(tok):
    spec = TrainingData(eval_fraction=0.2)
    splits = build_splits(spec, marked_docs(20), tok, 24, seed=0)
    assert splits.seq_len == 24
    for windows in (splits.train, splits.heldout):
        assert windows.tokens.dtype == torch.long and windows.tokens.shape[1] == 24
        for i in range(len(windows)):
            item = windows[i]
            assert set(item) == {"input_ids", "labels", "attention_mask"}
            assert item["input_ids"].shape == (24,)
            assert torch.equal(item["labels"], item["input_ids"])
            assert torch.equal(item["attention_mask"], torch.ones(24, dtype=torch.long))
    # Documents are joined with EOS, no padding: the EOS count is the document boundaries.
    eos = int((splits.train.tokens == tok.eos_token_id).sum())
    assert splits.train_documents - 1 <= eos <= splits.train_documents
    s = splits.summary()
    assert (s["train_windows"], s["heldout_windows"], s["seq_len"]) == (
        len(splits.train),
        len(splits.heldout),
        24,
    )
    assert len(splits.train.head(2)) == 2


def test_text_file_formats(tok, tmp_path):
    docs = marked_docs(4)
    txt = tmp_path / "d.txt"
    txt.write_text("\n\n".join(docs))
    js = tmp_path / "d.json"
    js.write_text(json.dumps(docs))
    plain = write_jsonl(tmp_path / "d.jsonl", docs)  # records that are plain strings
    custom = write_jsonl(tmp_path / "e.jsonl", [{"body": d} for d in docs])
    for spec in (
        TrainingData(dataset=str(txt)),
        TrainingData(dataset=str(js)),
        TrainingData(dataset=str(plain)),
        TrainingData(dataset=str(custom), text_field="body"),
    ):
        assert [d.strip() for d in load_documents(spec, tmp_path)] == [d.strip() for d in docs]


# ------------------------------------------------------------------ errors


def test_a_record_without_text_or_messages_names_its_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"body": "b", "id": 1}])
    with pytest.raises(OptimizerError) as e:
        load_documents(TrainingData(dataset=str(path)), tmp_path)
    msg = str(e.value)
    assert "no field 'text' (it has: body, id)" in msg
    assert "data.text_field" in msg and "data.messages_field" in msg
    assert str(path) in msg


def test_a_non_text_field_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": 3}])
    with pytest.raises(OptimizerError, match="field 'text' holds int, not text"):
        load_documents(TrainingData(dataset=str(path)), tmp_path)


@pytest.mark.parametrize(
    "messages",
    [
        "hello",
        [{"role": "user"}],
        [{"role": "user", "content": 3}],
        ["hello"],
        {"role": "user", "content": "hi"},
    ],
    ids=["string", "no-content", "content-not-text", "turn-not-dict", "dict-not-list"],
)
def test_malformed_messages_are_a_clear_error(tmp_path, messages):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"messages": messages}])
    with pytest.raises(OptimizerError, match=r"field 'messages' must be a list of .*role.*content"):
        load_documents(TrainingData(dataset=str(path)), tmp_path)


@pytest.mark.parametrize("records", [["only one"], ["one", "   "], [{"text": "one"}, {"text": ""}]])
def test_fewer_than_two_documents(tmp_path, records):
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(OptimizerError, match=r"holds 1 document\(s\); at least 2 are needed"):
        load_documents(TrainingData(dataset=str(path)), tmp_path)


def test_too_little_text_for_one_window_names_seq_len(tok):
    with pytest.raises(OptimizerError, match="fewer than one window of seq_len 4096"):
        build_splits(TrainingData(), ["short text", "another short text"], tok, 4096, seed=0)


def test_bad_json_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(OptimizerError, match=r"d\.jsonl:2: not valid JSON"):
        load_documents(TrainingData(dataset=str(path)), tmp_path)


# ------------------------------------------------------------------ the shipped set


def test_the_shipped_set_loads_by_name_as_chat_records(tmp_path):
    docs = load_documents(TrainingData(), tmp_path)  # dataset defaults to chitchat-en
    assert len(docs) == 1473
    assert all(isinstance(d, list) and d for d in docs)
    assert all(set(t) == {"role", "content"} for d in docs for t in d)
    assert {t["role"] for d in docs for t in d} <= {"system", "user", "assistant"}


def test_the_shipped_name_and_its_path_are_the_same_input(tmp_path):
    by_name = TrainingData().as_input(Path("."))
    by_path = TrainingData(dataset=str(CHITCHAT)).as_input(tmp_path)
    assert by_name == by_path == file_input("training_data", CHITCHAT.resolve())
    assert by_name.digest() == by_path.digest() != "missing"
    assert TrainingData(dataset="chitchat-en").problem(tmp_path) is None


def test_a_hub_name_is_a_reference_input(tmp_path):
    item = TrainingData(dataset="org/some-set", subset="en", split="train").as_input(tmp_path)
    assert (item.kind, item.digest()) == ("reference", "hub:org/some-set:en:train")


def test_the_shipped_set_packs_through_a_chat_template(templated):
    spec = TrainingData(max_eval_samples=4)
    splits = build_splits(spec, load_documents(spec, Path(".")), templated, 128, seed=0)
    assert splits.chat is True and len(splits.heldout) == 4
    assert splits.heldout_documents == round(0.05 * 1473)
    assert "<user>" in decoded(splits.heldout, templated)


# ------------------------------------------------------------------ determinism


def test_same_seed_same_windows_different_seed_different(tok):
    spec = TrainingData(eval_fraction=0.2)
    docs = marked_docs(30)
    a = build_splits(spec, docs, tok, 32, seed=0)
    b = build_splits(spec, docs, tok, 32, seed=0)
    c = build_splits(spec, docs, tok, 32, seed=1)
    assert torch.equal(a.train.tokens, b.train.tokens)
    assert torch.equal(a.heldout.tokens, b.heldout.tokens)
    assert a.train.tokens.shape[1] == c.train.tokens.shape[1]
    assert not torch.equal(a.heldout.tokens, c.heldout.tokens)
    assert markers(decoded(a.heldout, tok)) != markers(decoded(c.heldout, tok))
    assert a.train.tokens.shape != c.train.tokens.shape or not torch.equal(
        a.train.tokens, c.train.tokens
    )


def test_a_conversation_the_chat_template_refuses_is_a_clear_error():
    tok = make_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    docs = [[{"role": "narrator", "content": "once"}], [{"role": "user", "content": "hi"}]]
    with pytest.raises(
        OptimizerError, match="chat template refuses a conversation .*narrator.*unknown role"
    ):
        build_splits(TrainingData(eval_fraction=0.5), docs, tok, 4, seed=0)
