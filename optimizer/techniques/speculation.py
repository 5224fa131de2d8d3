"""Greedy speculative decoding in PyTorch: a drafter proposes tokens, the base model verifies
them in one forward pass, and the statistics that decide whether a draft is worth deploying
(mean acceptance length, acceptance rate per draft position, wall-clock speed-up).

Verification is exact: at every step the base model's own greedy token is kept, so the output
is plain greedy decoding of the base model, token for token (what a serving engine does at
temperature 0); the draft only decides how many tokens one base forward yields. The base keeps
a KV cache (transformers' ``DynamicCache``, cropped back to the committed tokens after each
step), so the timing compares like with like.

Written here rather than taken from a library: transformers' assisted generation runs only a
separate draft model (not EAGLE-3 or Medusa heads) and reports no acceptance statistics;
ModelOpt's ``AcceptanceRateValidation`` re-runs the whole sequence per step (no KV cache, so
no honest wall-clock) and needs CUDA. Drafters implement :class:`Drafter`; the trained heads'
drafters live in ``techniques/speculative.py``, a separate model's here (:class:`ModelDrafter`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

#: ``(input_ids [1, t], past_key_values, output_hidden_states) -> HF causal-LM output`` (with
#: ``logits`` and ``hidden_states``); the cache grows by ``t`` positions.
BaseForward = Callable[[Any, Any, bool], Any]


class Drafter(Protocol):
    """Proposes draft tokens for the base model to verify."""

    #: The base is then run with ``output_hidden_states=True`` and ``observe`` gets them.
    wants_hidden_states: bool

    def reset(self) -> None:
        """A new prompt starts."""

    def observe(self, hidden_states: tuple | None, keep: int) -> None:
        """After every base forward: its ``hidden_states`` and how many of its leading
        positions are now committed (the prefill: all; a verification: accepted + 1)."""

    def propose(self, tokens: Any, k: int) -> Any:
        """``tokens`` [1, n+1]: the n committed tokens and the base's next token; return
        ``k`` draft token ids for positions n+1 .. n+k."""


def plain_forward(model) -> BaseForward:
    """The base forward of an ordinary HF causal LM."""

    def forward(ids, cache, hidden: bool):
        return model(
            input_ids=ids, past_key_values=cache, use_cache=True, output_hidden_states=hidden
        )

    return forward


@dataclass
class Generation:
    """One prompt's speculative generation."""

    tokens: list[int]
    #: Per verification step: (drafted k, accepted m). Each step yields m + 1 tokens.
    steps: list[tuple[int, int]] = field(default_factory=list)
    seconds: float = 0.0


def _sync(device) -> None:
    import torch

    if getattr(device, "type", None) == "cuda":
        torch.cuda.synchronize(device)


def _new_cache(model_config):
    from transformers import DynamicCache

    return DynamicCache(config=model_config) if model_config is not None else DynamicCache()


def speculative_greedy(
    base_forward: BaseForward,
    drafter: Drafter,
    prompt,
    *,
    max_new_tokens: int,
    draft_len: int,
    eos_token_ids: Sequence[int] = (),
    cache_config=None,
) -> Generation:
    """Greedy generation of up to ``max_new_tokens`` after ``prompt`` ([1, P] token ids),
    ``draft_len`` drafted tokens per step; stops after an EOS token like greedy decoding."""
    import torch

    eos = set(eos_token_ids)
    device = prompt.device
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        cache = _new_cache(cache_config)
        drafter.reset()
        out = base_forward(prompt, cache, drafter.wants_hidden_states)
        drafter.observe(out.hidden_states if drafter.wants_hidden_states else None, prompt.shape[1])
        tokens = prompt[0].tolist()
        generated: list[int] = []
        steps: list[tuple[int, int]] = []
        nxt = int(out.logits[0, -1].argmax())
        while True:
            generated.append(nxt)
            tokens.append(nxt)
            if nxt in eos or len(generated) >= max_new_tokens:
                break
            k = min(draft_len, max_new_tokens - len(generated))
            ids = torch.tensor([tokens], device=device)
            drafts = [int(t) for t in drafter.propose(ids, k)][:k]
            committed = len(tokens) - 1  # the cache holds positions 0 .. committed-1
            verify = torch.tensor([[nxt, *drafts]], device=device)
            out = base_forward(verify, cache, drafter.wants_hidden_states)
            best = out.logits[0].argmax(-1).tolist()  # best[j]: base's token after verify[j]
            m = 0
            while m < len(drafts) and drafts[m] == best[m]:
                m += 1
            cache.crop(committed + 1 + m)
            drafter.observe(out.hidden_states if drafter.wants_hidden_states else None, 1 + m)
            steps.append((k, m))
            stop = False
            for t in drafts[:m]:
                generated.append(t)
                tokens.append(t)
                if t in eos or len(generated) >= max_new_tokens:
                    stop = True
                    break
            if stop:
                break
            nxt = best[m]
    _sync(device)
    return Generation(generated, steps, time.perf_counter() - t0)


def plain_greedy(
    base_forward: BaseForward,
    prompt,
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    cache_config=None,
) -> Generation:
    """Greedy generation one token per base forward (with the KV cache): the reference output
    and the reference time."""
    import torch

    eos = set(eos_token_ids)
    _sync(prompt.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        cache = _new_cache(cache_config)
        out = base_forward(prompt, cache, False)
        generated: list[int] = []
        while True:
            nxt = int(out.logits[0, -1].argmax())
            generated.append(nxt)
            if nxt in eos or len(generated) >= max_new_tokens:
                break
            out = base_forward(torch.tensor([[nxt]], device=prompt.device), cache, False)
    _sync(prompt.device)
    return Generation(generated, [], time.perf_counter() - t0)


@dataclass(frozen=True)
class AcceptanceReport:
    """Acceptance over a prompt set, counted on full-length steps (k == draft_len: a step cut
    short by the token limit would understate the draft)."""

    draft_len: int
    prompts: int
    steps: int
    generated_tokens: int
    #: Mean tokens per verification step (accepted drafts + the base's own token); 1 is no gain,
    #: ``draft_len + 1`` the most a step can give.
    mean_acceptance_length: float
    #: ``[i]``: share of steps whose first i+1 drafts were all accepted.
    acceptance_rate_by_position: list[float]
    #: Every generation equalled plain greedy decoding (None when not compared).
    matches_greedy: bool | None
    #: How many prompts' generations equalled plain greedy decoding (None when not compared):
    #: in bfloat16 a (k+1)-token verification forward rounds differently from a one-token one,
    #: so a near-tie can flip a token; in float32 every prompt matches.
    prompts_matching_greedy: int | None = None
    speculative_seconds: float | None = None
    greedy_seconds: float | None = None

    @property
    def speedup(self) -> float | None:
        if not self.speculative_seconds or not self.greedy_seconds:
            return None
        return self.greedy_seconds / self.speculative_seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "draft_len": self.draft_len,
            "prompts": self.prompts,
            "steps": self.steps,
            "generated_tokens": self.generated_tokens,
            "mean_acceptance_length": round(self.mean_acceptance_length, 4),
            "acceptance_rate_by_position": [round(r, 4) for r in self.acceptance_rate_by_position],
            "matches_greedy": self.matches_greedy,
            "prompts_matching_greedy": self.prompts_matching_greedy,
            "speculative_seconds": _round(self.speculative_seconds),
            "greedy_seconds": _round(self.greedy_seconds),
            "speedup": _round(self.speedup),
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def measure_acceptance(
    base_forward: BaseForward,
    drafter: Drafter,
    prompts: Sequence[Any],
    *,
    draft_lens: Sequence[int],
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    compare_greedy: bool = True,
    cache_config=None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[int, AcceptanceReport]:
    """Speculative greedy generation of every prompt ([1, P] tensors) at each draft length;
    with ``compare_greedy`` also plain greedy, once per prompt (every length's output must
    equal it; its time is each speed-up's reference)."""
    kw = {"max_new_tokens": max_new_tokens, "eos_token_ids": eos_token_ids}
    lens = list(dict.fromkeys(draft_lens))
    full: dict[int, list[int]] = {k: [] for k in lens}
    generated = dict.fromkeys(lens, 0)
    spec_s = dict.fromkeys(lens, 0.0)
    matching = dict.fromkeys(lens, 0)
    greedy_s = 0.0
    for i, prompt in enumerate(prompts):
        ref = None
        if compare_greedy:
            ref = plain_greedy(base_forward, prompt, cache_config=cache_config, **kw)
            greedy_s += ref.seconds
        for k in lens:
            gen = speculative_greedy(
                base_forward, drafter, prompt, draft_len=k, cache_config=cache_config, **kw
            )
            generated[k] += len(gen.tokens)
            spec_s[k] += gen.seconds
            full[k] += [m for n, m in gen.steps if n == k]
            matching[k] += ref is not None and ref.tokens == gen.tokens
        if progress is not None:
            progress(i + 1, len(prompts))
    return {
        k: AcceptanceReport(
            draft_len=k,
            prompts=len(prompts),
            steps=len(full[k]),
            generated_tokens=generated[k],
            mean_acceptance_length=statistics.fmean(m + 1 for m in full[k]) if full[k] else 1.0,
            acceptance_rate_by_position=[
                sum(m > i for m in full[k]) / len(full[k]) if full[k] else 0.0 for i in range(k)
            ],
            matches_greedy=matching[k] == len(prompts) if compare_greedy else None,
            prompts_matching_greedy=matching[k] if compare_greedy else None,
            speculative_seconds=spec_s[k],
            greedy_seconds=greedy_s if compare_greedy else None,
        )
        for k in lens
    }


class ModelDrafter:
    """A separate, smaller causal LM with the base's tokenizer as the drafter
    (``draft_target``): it decodes ``k`` tokens greedily with its own KV cache, which it crops
    back to the tokens it shares with the committed sequence."""

    wants_hidden_states = False

    def __init__(self, model):
        self.model = model
        self.reset()

    def reset(self) -> None:
        self._cache = None
        self._ids: list[int] = []  # tokens the cache holds, in order

    def observe(self, hidden_states, keep: int) -> None:
        pass

    def propose(self, tokens, k: int):
        import torch

        seq = tokens[0].tolist()
        if self._cache is None:
            self._cache = _new_cache(getattr(self.model, "config", None))
        common = 0
        for a, b in zip(self._ids, seq, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(seq) - 1)  # feed at least one token: its logits are needed
        self._cache.crop(common)
        self._ids = seq[:common]
        feed = seq[common:]
        drafts: list[int] = []
        with torch.inference_mode():
            for _ in range(k):
                ids = torch.tensor([feed], device=tokens.device)
                out = self.model(input_ids=ids, past_key_values=self._cache, use_cache=True)
                self._ids += feed
                nxt = int(out.logits[0, -1].argmax())
                drafts.append(nxt)
                feed = [nxt]
        return torch.tensor(drafts, device=tokens.device)
