"""Calibration data: loaders, packing into num_samples x seq_len, chat template, forward loop."""

import json

import pytest
import torch
from tiny import CALIBRATION, make_tokenizer

from optimizer import calibration
from optimizer.errors import OptimizerError
from optimizer.recipe import CalibrationSpec


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def spec(**kw) -> CalibrationSpec:
    return CalibrationSpec(**{"dataset": str(CALIBRATION), "num_samples": 4, "seq_len": 32, **kw})


def test_shipped_set_is_real_text():
    records = [json.loads(line) for line in CALIBRATION.read_text().splitlines()]
    assert len(records) >= 600
    assert all(len(r["text"]) > 1000 for r in records)
    assert sum(len(r["text"]) for r in records) > 1_500_000


def test_tokenize_packs_full_windows_of_real_tokens(tok):
    texts = calibration.load_texts(spec(), CALIBRATION.parent)
    tokens = calibration.tokenize(spec(), texts, tok)
    assert tokens.shape == (4, 32) and tokens.dtype == torch.long
    assert (tokens != tok.pad_token_id).float().mean() > 0.9  # packed, not padded
    decoded = tok.decode(tokens[0])
    assert decoded.replace("</s>", "").strip() and "\ufffd" not in decoded


def test_seed_controls_which_documents(tok):
    texts = calibration.load_texts(spec(), CALIBRATION.parent)
    a = calibration.tokenize(spec(seed=0), texts, tok)
    assert torch.equal(a, calibration.tokenize(spec(seed=0), texts, tok))
    assert not torch.equal(a, calibration.tokenize(spec(seed=1), texts, tok))


def test_local_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "one"}\n\n{"body": "two"}\n')
    (tmp_path / "b.json").write_text(json.dumps(["three", {"text": "four"}]))
    (tmp_path / "c.txt").write_text("first doc\nstill first\n\nsecond doc\n")
    assert calibration.load_texts(spec(dataset="a.jsonl", text_field="body"), tmp_path) == [
        "one",
        "two",
    ]
    assert calibration.load_texts(spec(dataset="b.json"), tmp_path) == ["three", "four"]
    assert calibration.load_texts(spec(dataset="c.txt"), tmp_path) == [
        "first doc\nstill first",
        "second doc",
    ]


def test_bad_local_data_is_a_clear_error(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "one"}\n')
    with pytest.raises(
        OptimizerError, match="no field 'text' .*it has: body.*set calibration.text_field"
    ):
        calibration.load_texts(spec(dataset="a.jsonl"), tmp_path)
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(OptimizerError, match=r"broken.jsonl:2: not valid JSON"):
        calibration.load_texts(spec(dataset="broken.jsonl"), tmp_path)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(OptimizerError, match="holds no text"):
        calibration.load_texts(spec(dataset="empty.txt"), tmp_path)


def test_too_little_text_says_how_much(tok, tmp_path):
    (tmp_path / "small.txt").write_text("a short document")
    s = spec(dataset="small.txt", num_samples=8, seq_len=64)
    with pytest.raises(
        OptimizerError, match=r"yields \d+ tokens, but num_samples x seq_len = 8 x 64 = 512"
    ):
        calibration.tokenize(s, calibration.load_texts(s, tmp_path), tok)


def test_chat_template_wraps_each_document(tok):
    tok = make_tokenizer()
    tok.chat_template = "{% for m in messages %}<s>user: {{ m['content'] }}</s>{% endfor %}"
    s = spec(chat_template=True, num_samples=1, seq_len=16)
    tokens = calibration.tokenize(s, ["hello world " * 20], tok)
    assert tok.decode(tokens[0]).startswith("<s>user: hello world")


def test_hub_dataset_fails_fast_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        OptimizerError, match="not a local file and the hub cannot be reached: HF_HUB_OFFLINE"
    ):
        calibration.load_texts(spec(dataset="cnn_dailymail", subset="3.0.0"), CALIBRATION.parent)


def test_forward_loop_feeds_every_window_once():
    tokens = torch.arange(10 * 8).view(10, 8)
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            seen.append(input_ids.clone())

    calibration.forward_loop(tokens, batch_size=4)(Recorder())
    assert [b.shape[0] for b in seen] == [4, 4, 2]
    assert torch.equal(torch.cat(seen), tokens)


def test_the_loop_keeps_the_last_logits_only_where_nothing_calibrates_on_them(tiny_llama):
    """Same scales as a loop over full logits (issue 17: 1 GiB of logits per 8 x 512 batch
    of a 128k vocabulary); full logits again once the output layer is quantized."""
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tokens = torch.randint(0, 500, (4, 32))

    def amaxes(loop):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        mtq.quantize(model, mtq.FP8_DEFAULT_CFG, loop)
        return model, {n: b for n, b in model.named_buffers() if n.endswith("amax")}

    def full(model):
        with torch.no_grad():
            for batch in calibration.batches(tokens, 2):
                model(input_ids=batch)

    model, last = amaxes(calibration.forward_loop(tokens, 2))
    assert calibration.logits_kwargs(model) == {"logits_to_keep": 1}
    _, reference = amaxes(full)
    assert last.keys() == reference.keys() and last
    assert all(torch.equal(last[k], reference[k]) for k in last)
    model.lm_head.input_quantizer.enable()
    assert calibration.logits_kwargs(model) == {}
