"""lm-eval's Hugging Face model with the shared context of a multiple-choice question
computed once.

Why this exists: lm-eval 0.4.13's ``HFLM`` scores every (context, choice) pair as its own
sequence, so a 4-choice question runs its context through the model four times (its source
carries a TODO for exactly this). On a 2-core CPU that is most of an evaluation: ARC-Easy
costs 130 tokens per document that way and 46 with the context shared, HellaSwag 174 and 85.

How: the requests that share a context become one row — the context, then every choice's
tokens — with position ids that restart after the context for each choice and a 4-D
attention mask in which each choice sees the context and itself only ("tree attention", as
Medusa/EAGLE verify drafts). Every choice thus sees exactly the tokens and positions it sees
in ``HFLM``; only float summation order differs. Only the logits that score a continuation
are computed (``logits_to_keep``), and log-softmax runs on those alone. Tasks, prompts,
tokenisation (``HFLM``'s own ``_encode_pair``), metrics and aggregation stay lm-eval's;
tests/test_prefix_sharing.py checks the scores against ``HFLM`` request by request.

Packing is exact only for decoders whose every layer is full causal attention that honours a
custom 4-D mask: sliding-window layers (Gemma 2/3, gpt-oss, Mistral v0.1) would see past their
window, recurrent or linear-attention layers (Mamba hybrids, Qwen3-Next, LFM2) would carry one
choice's state into the next, and flash/flex attention ignore such a mask. Everything else
(those models, a forward without ``position_ids`` or ``logits_to_keep``, rolling perplexity
windows) takes ``HFLM``'s own path unchanged.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class _Group:
    """Requests with one (possibly left-truncated) context, packed into one row."""

    def __init__(self, prefix: tuple[int, ...]):
        self.prefix = prefix
        self.branches: list[tuple[int, list[int]]] = []  # (request index, continuation)

    @property
    def length(self) -> int:
        # The last token of a continuation is only ever predicted, never fed in.
        return len(self.prefix) + sum(len(c) - 1 for _, c in self.branches)


#: Dense decoder families whose attention takes a custom 4-D mask and position ids as given.
PACKABLE_MODEL_TYPES = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "granite"}
    | {"olmo", "olmo2", "gemma", "gemma2", "gemma3_text", "deepseek_v3", "smollm3"}
)


def packing_problem(model: Any, max_length: int) -> str | None:
    """Why the choices of a question cannot share one row on this model, or None."""
    params = inspect.signature(model.forward).parameters
    if not {"position_ids", "logits_to_keep"} <= set(params):
        return "its forward takes no position_ids/logits_to_keep"
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    config = config or model.config
    if config.model_type not in PACKABLE_MODEL_TYPES:
        return f"model type {config.model_type!r} is not known to honour a custom 4-D mask"
    attn = getattr(config, "_attn_implementation", None) or "eager"
    if attn not in ("sdpa", "eager"):
        return f"attention implementation {attn!r} ignores a custom 4-D mask"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return "some layers are not full attention (sliding window or recurrent)"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window <= max_length:
        return f"its sliding window ({window}) is shorter than max_length ({max_length})"
    return None


class PrefixSharingHFLM(HFLM):
    """``HFLM`` whose loglikelihood requests share their context (see the module doc)."""

    def _supports_packing(self) -> bool:
        if self.backend != "causal":
            return False
        problem = packing_problem(self.model, self.max_length)
        if problem:
            log.info("scoring every choice separately (lm-eval's HFLM path): %s", problem)
        return problem is None

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        # Rolling perplexity windows (no request string) share no context worth packing.
        rolling = any(request_str is None for request_str, _, _ in requests)
        if rolling or not self._supports_packing():
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        groups: dict[tuple[int, ...], _Group] = {}
        rows: list[_Group] = []
        for index, (_, context, continuation) in enumerate(requests):
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError(
                    f"cannot score a request of {len(context)} context and {len(continuation)} "
                    f"continuation tokens with max_length {self.max_length}"
                )
            # Left-truncate exactly as HFLM does: keep the last max_length + 1 tokens.
            full = (context + continuation)[-(self.max_length + 1) :]
            prefix = tuple(full[: len(full) - len(continuation)])
            group = groups.get(prefix)
            # A row holds at most max_length tokens: many choices (or one-token contexts)
            # spill into further rows with the same context.
            if group is None or (
                group.branches and group.length + len(continuation) - 1 > self.max_length
            ):
                group = groups[prefix] = _Group(prefix)
                rows.append(group)
            group.branches.append((index, continuation))
        ordered = sorted(rows, key=lambda g: -g.length)  # little padding per batch
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # Passing disable=False would override TQDM_DISABLE (the CLI's quiet mode).
        quiet = {"disable": True} if disable_tqdm or self.rank != 0 else {}
        bar = tqdm(total=len(requests), desc="scoring", **quiet)
        batch_size = override_bs or self.batch_size
        scored: list[Any] = []  # the first batch's answers when it is the measured one
        done = 0
        if batch_size == "auto" and ordered:
            # The widest row first, alone and measured: no later row needs more memory.
            batch_size = self._measured_batch_size(ordered[0], scored)
            done = 1 if scored else 0  # (a fallback measures nothing and scores nothing)
        size = int(batch_size) if batch_size != "auto" else 1
        batches = [ordered[:done]] if done else []
        batches += [ordered[s : s + size] for s in range(done, len(ordered), size)]
        for number, batch in enumerate(batches):
            answers = scored if (done and number == 0) else self._score_batch(batch)
            for index, answer in answers:
                results[index] = answer
                request_str = requests[index][0]
                if request_str is not None:
                    self.cache_hook.add_partial("loglikelihood", request_str, answer)
            bar.update(sum(len(g.branches) for g in batch))
        bar.close()
        return results  # type: ignore[return-value]

    def _measured_batch_size(self, row: _Group, scored: list[Any]) -> int:
        """Score ``row`` alone (its answers appended to ``scored``) and size the batches from
        that forward's peak memory (optimizer.batching): the same computation a batch repeats
        per row, so a small margin suffices."""
        from optimizer import batching
        from optimizer.evaluation.suite import DEFAULT_BATCH_SIZE

        choice = batching.measure(
            self.model,
            lambda: scored.extend(self._score_batch([row])),
            limit=int(self.max_batch_size or 64),
            fallback=DEFAULT_BATCH_SIZE,
            share=0.5,
            margin=1.5,
        )
        log.info("evaluation: %s", choice.describe())
        return choice.batch_size

    def _score_batch(self, batch: list[_Group]) -> list[tuple[int, tuple[float, bool]]]:
        import torch
        import torch.nn.functional as F

        width = max(g.length for g in batch)
        dtype = self.model.get_input_embeddings().weight.dtype  # what attention computes in
        blocked = torch.finfo(dtype).min if dtype.is_floating_point else float("-inf")
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        positions = torch.zeros(len(batch), width, dtype=torch.long)
        allowed = torch.zeros(len(batch), width, width, dtype=torch.bool)
        # Per request: (row, positions whose logits predict its tokens, its tokens).
        wanted: list[tuple[int, int, list[int], list[int]]] = []
        for row, group in enumerate(batch):
            p = len(group.prefix)
            ids[row, :p] = torch.tensor(group.prefix)
            positions[row, :p] = torch.arange(p)
            allowed[row, :p, :p] = torch.tril(torch.ones(p, p, dtype=torch.bool))
            at = p
            for index, continuation in group.branches:
                n = len(continuation) - 1
                if n:
                    ids[row, at : at + n] = torch.tensor(continuation[:-1])
                    positions[row, at : at + n] = torch.arange(p, p + n)
                    allowed[row, at : at + n, :p] = True
                    allowed[row, at : at + n, at : at + n] = torch.tril(
                        torch.ones(n, n, dtype=torch.bool)
                    )
                wanted.append((row, index, [p - 1, *range(at, at + n)], continuation))
                at += n
            idle = torch.arange(at, width)  # padding attends to itself: no empty softmax row
            allowed[row, idle, idle] = True
        mask = torch.zeros(len(batch), 1, width, width, dtype=dtype)
        mask.masked_fill_(~allowed.unsqueeze(1), blocked)
        keep = sorted({pos for _, _, where, _ in wanted for pos in where})
        column = {pos: i for i, pos in enumerate(keep)}
        with torch.no_grad():
            logits = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                # A CPU index tensor works whichever GPU the last layer sits on.
                logits_to_keep=torch.tensor(keep),
            ).logits
        out = []
        for row, index, where, continuation in wanted:
            picked = logits[row, [column[w] for w in where]].float()
            logprobs = F.log_softmax(picked, dim=-1)
            target = torch.tensor(continuation, device=logprobs.device)
            score = logprobs.gather(1, target[:, None]).sum()
            greedy = bool((logprobs.argmax(dim=-1) == target).all())
            out.append((index, (float(score), greedy)))
        return out
