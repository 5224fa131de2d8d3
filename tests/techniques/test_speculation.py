"""Greedy speculative decoding (optimizer/techniques/speculation.py) on tiny random Llamas:
the output is the base's greedy output whatever the draft, and the acceptance statistics count
exactly what a drafter got right."""

from __future__ import annotations

import pytest
import torch
from tiny import make_tiny_llama

from optimizer.techniques.speculation import (
    ModelDrafter,
    measure_acceptance,
    plain_forward,
    plain_greedy,
    speculative_greedy,
)

NEW = 24


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("spec")
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
    base = load(make_tiny_llama(root / "base", seed=0))
    other = load(make_tiny_llama(root / "other", seed=1))
    return base, other


def prompts(n: int = 3, length: int = 7):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 500, (1, length), generator=g) for _ in range(n)]


class OracleDrafter:
    """Proposes the true greedy continuation, wrong from draft position ``wrong`` on: every
    full step must accept exactly ``wrong`` drafts."""

    wants_hidden_states = False

    def __init__(self, reference: list[int], prompt_len: int, wrong: int):
        self.ref, self.p, self.wrong = reference, prompt_len, wrong

    def reset(self):
        pass

    def observe(self, hidden_states, keep):
        pass

    def propose(self, tokens, k):
        n = tokens.shape[1] - self.p  # generated so far, including the base's next token
        out = []
        for i in range(k):
            t = self.ref[n + i] if n + i < len(self.ref) else 0
            out.append(t if i < self.wrong else (t + 1) % 500)
        return torch.tensor(out)


def test_plain_greedy_is_transformers_greedy(models):
    base, _ = models
    for p in prompts():
        ref = base.generate(p, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW)
        got = plain_greedy(plain_forward(base), p, max_new_tokens=NEW)
        assert got.tokens == ref[0, p.shape[1] :].tolist()


def test_the_base_as_its_own_draft_accepts_everything(models):
    base, _ = models
    reports = measure_acceptance(
        plain_forward(base), ModelDrafter(base), prompts(), draft_lens=[4, 2], max_new_tokens=NEW
    )
    assert reports[2].matches_greedy is True
    assert reports[2].mean_acceptance_length == pytest.approx(3.0)
    assert reports[2].acceptance_rate_by_position == [1.0, 1.0]
    report = reports[4]
    assert report.matches_greedy is True
    assert report.mean_acceptance_length == pytest.approx(5.0)
    assert report.acceptance_rate_by_position == [1.0, 1.0, 1.0, 1.0]
    # 24 tokens: the prefill's one, then four full steps of 5 and a cut-short step of 3
    assert report.steps == 3 * 4


def test_an_unrelated_draft_accepts_almost_nothing_and_changes_no_token(models):
    base, other = models
    (report,) = measure_acceptance(
        plain_forward(base), ModelDrafter(other), prompts(), draft_lens=[4], max_new_tokens=NEW
    ).values()
    assert report.matches_greedy is True
    assert report.mean_acceptance_length < 1.3
    assert report.acceptance_rate_by_position[-1] < 0.1


@pytest.mark.parametrize("wrong", [0, 1, 3])
def test_acceptance_counts_exactly_the_right_drafts(models, wrong):
    base, _ = models
    fwd = plain_forward(base)
    for p in prompts(2):
        ref = plain_greedy(fwd, p, max_new_tokens=NEW).tokens
        gen = speculative_greedy(
            fwd, OracleDrafter(ref, p.shape[1], wrong), p, max_new_tokens=NEW, draft_len=4
        )
        assert gen.tokens == ref
        full = [m for k, m in gen.steps if k == 4]
        assert full and all(m == wrong for m in full)
        # every step yields its accepted drafts plus the base's own token (the last step's
        # own token only if the limit leaves room for it)
        rest = len(ref) - 1 - sum(m + 1 for _, m in gen.steps[:-1])
        assert rest in (gen.steps[-1][1], gen.steps[-1][1] + 1)


def test_generation_stops_at_eos_like_greedy(models):
    base, other = models
    fwd = plain_forward(base)
    p = prompts(1)[0]
    ref = plain_greedy(fwd, p, max_new_tokens=NEW).tokens
    eos = ref[5]  # a token greedy decoding reaches: it must stop there, drafted or not
    want = ref[: ref.index(eos) + 1]
    for drafter in (ModelDrafter(base), ModelDrafter(other)):
        got = speculative_greedy(
            fwd, drafter, p, max_new_tokens=NEW, draft_len=3, eos_token_ids=[eos]
        )
        assert got.tokens == want
    assert plain_greedy(fwd, p, max_new_tokens=NEW, eos_token_ids=[eos]).tokens == want


def test_generations_that_differ_from_greedy_are_counted_per_prompt(models):
    """A verification forward that rounds differently from a one-token forward (what bf16
    does) can flip a near-tie: the report counts the prompts that still match."""
    base, _ = models
    fwd = plain_forward(base)
    drafter = ModelDrafter(base)
    started = []  # one entry per speculative generation (the drafter resets per prompt)
    drafter_reset = drafter.reset
    drafter.reset = lambda: (started.append(1), drafter_reset())

    def rounding_forward(ids, cache, hidden):
        out = fwd(ids, cache, hidden)
        if len(started) == 2 and ids.shape[1] > 1 and cache.get_seq_length() > 7 + ids.shape[1]:
            out.logits[..., 7] += 1e4  # the second prompt's verifications flip to token 7
        return out

    (report,) = measure_acceptance(
        rounding_forward, drafter, prompts(3), draft_lens=[3], max_new_tokens=NEW
    ).values()
    assert len(started) == 3
    assert report.matches_greedy is False
    assert report.prompts_matching_greedy == 2
