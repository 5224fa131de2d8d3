"""Shared-context scoring gives lm-eval HFLM's loglikelihoods, request by request, and the
same per-document task scores, on a tiny Llama and on its FP8-quantized copy."""

import pytest

from optimizer.evaluation import LOCAL_TASKS, Suite, SuiteTask
from optimizer.evaluation.harness import score_suite


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    from optimizer.models import load_model, load_tokenizer

    return load_model(tiny_llama, "float32"), load_tokenizer(tiny_llama)


def _requests():
    """Multiple-choice groups of various sizes, one-token choices, a choice that is a prefix
    of another, a context shared by two different tasks and a lone request."""
    contexts = [
        "Question: What does the pickle module do?\nAnswer:",
        "The quick brown fox",
        "In Python, a list comprehension",
    ]
    choices = [
        [" It serializes objects.", " It reads CSV files.", " It", " Nothing at all, really."],
        [" jumps", " jumps over the lazy dog", " sleeps."],
        [" builds a list.", " is slow"],
    ]
    reqs = [(c, x) for c, xs in zip(contexts, choices, strict=True) for x in xs]
    reqs.append(("A lone context with one continuation", " and its end."))
    return reqs


def _scores(lm_class, model, tok, max_length, requests):
    class Req:
        def __init__(self, args):
            self.args = args

    lm = lm_class(
        pretrained=model,
        tokenizer=tok,
        batch_size=3,
        max_length=max_length,
        softmax_dtype="float32",
    )
    return lm.loglikelihood([Req(r) for r in requests], disable_tqdm=True)


@pytest.mark.parametrize("max_length", [2048, 20])  # 20: left truncation of long contexts
def test_loglikelihoods_match_hflm_request_by_request(tiny, max_length):
    from lm_eval.models.huggingface import HFLM

    from optimizer.evaluation.prefix_sharing import PrefixSharingHFLM

    model, tok = tiny
    requests = _requests()
    expected = _scores(HFLM, model, tok, max_length, requests)
    shared = _scores(PrefixSharingHFLM, model, tok, max_length, requests)
    assert len(shared) == len(expected) == len(requests)
    for req, (lp, greedy), (lp_ref, greedy_ref) in zip(requests, shared, expected, strict=True):
        assert lp == pytest.approx(lp_ref, abs=1e-4), req
        assert greedy == greedy_ref, req
    # The random model's scores differ between choices: a wrong mask could not match them all.
    assert len({round(lp, 3) for lp, _ in expected}) > len(requests) // 2


def test_a_quantized_model_scores_the_same_documents_alike(tiny_llama):
    """Per-document ARC-Easy scores of an FP8 fake-quant model: shared-context scoring equals
    HFLM's (static per-tensor scales make each token's math independent of its row)."""
    import modelopt.torch.quantization as mtq
    import torch
    from lm_eval.models import huggingface

    from optimizer.models import load_model, load_tokenizer

    model, tok = load_model(tiny_llama, "float32"), load_tokenizer(tiny_llama)
    calib = torch.randint(0, len(tok), (4, 32), generator=torch.Generator().manual_seed(0))
    calib = calib.to(model.device)
    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, lambda m: m(input_ids=calib))
    suite = Suite(name="t", limit=12, tasks=[SuiteTask(task="local_arc_easy", metric="acc")])
    shared = score_suite((model, tok), suite, include_path=LOCAL_TASKS)
    mp = pytest.MonkeyPatch()
    import optimizer.evaluation.prefix_sharing as ps

    mp.setattr(ps.PrefixSharingHFLM, "_supports_packing", lambda self: False)  # HFLM's own path
    try:
        plain = score_suite((model, tok), suite, include_path=LOCAL_TASKS)
    finally:
        mp.undo()
    assert shared["local_arc_easy/acc"].docs == plain["local_arc_easy/acc"].docs
    assert shared["local_arc_easy/acc"].n == 12
    assert issubclass(ps.PrefixSharingHFLM, huggingface.HFLM)


def _tiny(config_class, model_class, **extra):
    config = config_class(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        **extra,
    )
    return model_class(config)


def test_packing_is_refused_where_it_would_not_be_exact(tiny):
    """Sliding windows, unknown (possibly recurrent) architectures and attention kernels that
    ignore a 4-D mask take HFLM's own path; a plain Llama packs."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        MistralConfig,
        MistralForCausalLM,
    )

    from optimizer.evaluation.prefix_sharing import packing_problem

    llama, _ = tiny
    assert packing_problem(llama, 2048) is None
    mistral = _tiny(MistralConfig, MistralForCausalLM, sliding_window=16)
    assert "sliding window (16)" in packing_problem(mistral, 2048)
    assert (
        packing_problem(_tiny(MistralConfig, MistralForCausalLM, sliding_window=4096), 2048) is None
    )
    gemma3 = _tiny(Gemma3TextConfig, Gemma3ForCausalLM, sliding_window=8)
    assert "not full attention" in packing_problem(gemma3, 2048)
    llama.config._attn_implementation = "flex_attention"
    try:
        assert "ignores a custom 4-D mask" in packing_problem(llama, 2048)
    finally:
        llama.config._attn_implementation = "sdpa"
    llama.config.model_type = "qwen3_next"  # linear-attention layers would leak state
    try:
        assert "not known to honour" in packing_problem(llama, 2048)
    finally:
        llama.config.model_type = "llama"
