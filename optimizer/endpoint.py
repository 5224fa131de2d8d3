"""Evaluating a served model (an OpenAI-compatible ``/v1/completions`` endpoint, e.g.
``trtllm-serve``) with lm-eval, refusing loglikelihood tasks where they would be meaningless.

Loglikelihood tasks need the log-probability of every prompt token (``echo`` with
``logprobs``). Servers that do not return them make lm-eval score every choice alike with no
error (trtllm-serve's completions endpoint is one), so :func:`probe_prompt_logprobs` asks once
and the gate refuses such endpoints for those tasks.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def probe_prompt_logprobs(
    base_url: str, model: str, token_ids: list[int], timeout: float = 30
) -> str | None:
    """None if the endpoint returns one logprob per prompt token, else why not."""
    body = json.dumps(
        {
            "model": model,
            "prompt": token_ids,
            "max_tokens": 1,
            "echo": True,
            "logprobs": 1,
            "temperature": 0,
        }
    ).encode()
    request = urllib.request.Request(
        base_url, data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as e:
        return f"the probe request to {base_url} failed: {e}"
    try:
        logprobs = payload["choices"][0].get("logprobs") or {}
    except (KeyError, IndexError, TypeError, AttributeError):
        return "the endpoint's answer has no choices"
    token_logprobs = logprobs.get("token_logprobs") or []
    # The first prompt token has no context, so servers report None for it.
    known = [x for x in token_logprobs[: len(token_ids)] if x is not None]
    if len(token_logprobs) < len(token_ids) or len(known) < len(token_ids) - 1:
        return (
            f"the endpoint returned {len(known)} prompt-token logprobs for a {len(token_ids)}-token "
            "prompt (echo + logprobs unsupported)"
        )
    return None


def endpoint_lm(base_url: str, model: str, tokenizer: str, batch_size: int, max_length: int) -> Any:
    """lm-eval's completions client, set up to match HFLM's tokenisation."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    return LocalCompletionsAPI(
        base_url=base_url,
        model=model,
        tokenizer=tokenizer,
        tokenizer_backend="huggingface",
        tokenized_requests=True,
        add_bos_token=True,
        batch_size=batch_size,
        max_length=max_length,
        num_concurrent=1,
    )
