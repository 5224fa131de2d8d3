"""``batch_size: auto``: the arithmetic from a measured forward, the fallbacks where nothing
is measured, and the evaluation loop that scores its measured first row exactly once."""

import pytest
import torch

from optimizer import batching, calibration
from optimizer.evaluation import harness
from optimizer.evaluation.suite import DEFAULT_BATCH_SIZE

GiB = 2**30


def test_fit_takes_the_share_of_free_memory_over_the_margin():
    # 100 GiB free, half of it, 0.1 GiB per item x 4 margin: 125 items, capped at the limit
    assert batching.fit(GiB // 10, 100 * GiB, 1000, share=0.5, margin=4.0) == 125
    assert batching.fit(GiB // 10, 100 * GiB, 64, share=0.5, margin=4.0) == 64
    # less than one item fits: still one (the forward needs it; an OOM then says so)
    assert batching.fit(10 * GiB, GiB, 64, share=0.5, margin=4.0) == 1
    # a forward that allocated nothing measurable is not a division by zero
    assert batching.fit(0, GiB, 7, share=0.5, margin=1.0) == 7
    with pytest.raises(ValueError, match="limit must be at least 1"):
        batching.fit(1, GiB, 0, share=0.5, margin=1.0)


def test_auto_falls_back_on_a_cpu_and_on_a_model_spread_over_devices():
    model = torch.nn.Linear(4, 4)
    ran = []
    choice = batching.measure(model, lambda: ran.append(1), 64, 8, share=0.5, margin=4.0)
    assert (choice.batch_size, choice.measured, ran) == (8, False, [])
    assert "auto on a CPU" in choice.describe()
    # the fallback never exceeds the limit (fewer windows than the default batch)
    assert batching.measure(model, lambda: None, 3, 8, share=0.5, margin=1.0).batch_size == 3

    spread = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4, device="meta"))
    assert batching.gpu_device(spread) is None
    assert (
        "spread over devices"
        in batching.measure(spread, lambda: None, 64, 8, share=1, margin=1).describe()
    )


def test_calibration_batch_size_is_the_recipes_number_or_auto():
    model, tokens = torch.nn.Linear(4, 4), torch.zeros(20, 16, dtype=torch.long)
    assert calibration.choose_batch_size(model, tokens, 5).batch_size == 5
    auto = calibration.choose_batch_size(model, tokens, "auto")
    assert (auto.batch_size, auto.measured) == (calibration.DEFAULT_BATCH_SIZE, False)


def test_the_stages_that_batch_for_more_than_a_forward_get_a_fixed_size():
    assert batching.fixed("auto", 8) == 8
    assert batching.fixed(3, 8) == 3


def test_measured_evaluation_scores_the_first_row_once_and_matches_fixed_batches(
    tiny_llama, monkeypatch
):
    """The measured path (the GPU's, with the measurement replaced by a fixed answer of 2:
    this machine has no CUDA) gives the same loglikelihoods as a fixed batch size, and the
    widest row, scored during the measurement, is not scored again."""
    from optimizer.evaluation.prefix_sharing import PrefixSharingHFLM
    from optimizer.models import load_model, load_tokenizer

    model, tok = load_model(tiny_llama, "float32"), load_tokenizer(tiny_llama)
    requests = [
        ("Question: What does the pickle module do?\nAnswer:", " It serializes objects."),
        ("Question: What does the pickle module do?\nAnswer:", " It reads CSV files."),
        ("The quick brown fox", " jumps"),
        ("The quick brown fox", " sleeps."),
        ("In Python, a list comprehension", " builds a list."),
        ("A lone context", " and its end."),
    ]

    class Req:
        def __init__(self, args):
            self.args = args

    def scores(batch_size):
        lm = PrefixSharingHFLM(
            pretrained=model,
            tokenizer=tok,
            batch_size=batch_size,
            max_length=2048,
            softmax_dtype="float32",
        )
        return lm.loglikelihood([Req(r) for r in requests], disable_tqdm=True)

    fixed = scores(3)
    widths = []
    original = PrefixSharingHFLM._score_batch

    def counting(self, batch):
        widths.append([g.length for g in batch])
        return original(self, batch)

    def fake_measure(model_, forward, limit, fallback, **_):
        forward()
        return batching.Choice(2, measured=True, per_item_bytes=1, free_bytes=GiB)

    def fake_fallback(model_, forward, limit, fallback, **_):  # measures (and scores) nothing
        return batching.Choice(3, measured=False, reason="spread")

    monkeypatch.setattr(PrefixSharingHFLM, "_score_batch", counting)
    monkeypatch.setattr(batching, "measure", fake_measure)
    auto = scores("auto")
    assert [greedy for _, greedy in auto] == [greedy for _, greedy in fixed]
    assert [lp for lp, _ in auto] == pytest.approx([lp for lp, _ in fixed], abs=1e-4)
    # 4 rows (4 contexts): the widest alone (measured), then batches of 2, then the rest
    assert [len(w) for w in widths] == [1, 2, 1]
    assert widths[0][0] == max(w for batch in widths for w in batch)
    widths.clear()
    monkeypatch.setattr(batching, "measure", fake_fallback)
    fallen_back = scores("auto")
    assert None not in fallen_back and [len(w) for w in widths] == [3, 1]
    assert [lp for lp, _ in fallen_back] == pytest.approx([lp for lp, _ in fixed], abs=1e-4)


def test_hf_lm_on_a_cpu_model_uses_the_fixed_default(tiny_llama):
    from optimizer.models import load_model, load_tokenizer

    lm = harness.hf_lm(
        load_model(tiny_llama, "float32").to("cpu"),  # on a GPU machine too
        load_tokenizer(tiny_llama),
        batch_size="auto",
        max_length=128,
    )
    assert lm.batch_size == DEFAULT_BATCH_SIZE


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures CUDA memory (GPU machine)")
def test_on_a_gpu_the_batch_grows_with_the_free_memory_and_stays_within_the_limit(tiny_llama):
    from optimizer.models import load_model

    model = load_model(tiny_llama, "float32").to("cuda")
    tokens = torch.randint(0, 200, (256, 128))
    choice = calibration.choose_batch_size(model, tokens, "auto")
    assert choice.measured and choice.per_item_bytes > 0
    assert choice.batch_size == calibration.AUTO_LIMIT  # a tiny model: the limit binds
    big = torch.randint(0, 200, (1, 4096))
    one = batching.measure(
        model, lambda: model(input_ids=big.cuda()), 1 << 20, 8, share=0.5, margin=1.0
    )
    # more tokens per item, more bytes measured
    assert one.per_item_bytes > choice.per_item_bytes
    assert one.batch_size == batching.fit(
        one.per_item_bytes, one.free_bytes, 1 << 20, share=0.5, margin=1.0
    )
