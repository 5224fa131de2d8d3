"""A served model as a gate candidate: an OpenAI-compatible ``/v1/completions`` endpoint
(``trtllm-serve``, vLLM, SGLang) scored by lm-eval's completions client.

Loglikelihood tasks need the log-probability of every prompt token (``echo`` with
``logprobs``); servers that do not return them make lm-eval score every choice alike with no
error (trtllm-serve's completions endpoint is one), so :func:`probe_prompt_logprobs` asks once
before the baseline is evaluated.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer.errors import OptimizerError
from optimizer.evaluation.candidates import Candidate

if TYPE_CHECKING:
    from optimizer.evaluation.baseline import BaselineRef
    from optimizer.evaluation.harness import Scorable
    from optimizer.evaluation.suite import Suite

log = logging.getLogger(__name__)


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


PROBE_TEXT = "The capital of France is Paris."


class EndpointCandidate(Candidate):
    """A served model (``base_url``: the full completions URL; ``model``: the name the server
    expects), tokenised with ``tokenizer`` (a directory; default: the baseline's)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        tokenizer: Path | str | None = None,
        timeout: float = 30,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise OptimizerError(f"endpoint {base_url!r} is not an http(s) URL")
        self.base_url = base_url
        self.model = model
        self.tokenizer = tokenizer
        self.timeout = timeout
        self._probed = False

    def _tokenizer(self, baseline: BaselineRef) -> str:
        return str(self.tokenizer if self.tokenizer is not None else baseline.path)

    def check(self, baseline: BaselineRef) -> None:
        if self._probed:
            return
        from optimizer import models

        tokenizer = models.load_tokenizer(
            Path(self._tokenizer(baseline)), baseline.trust_remote_code
        )
        reason = probe_prompt_logprobs(
            self.base_url, self.model, tokenizer(PROBE_TEXT)["input_ids"], self.timeout
        )
        if reason:
            raise OptimizerError(
                f"endpoint {self.base_url} cannot be gated on loglikelihood tasks: {reason}. "
                "lm-eval would silently score every choice alike; serve a backend that returns "
                "prompt logprobs, or evaluate the checkpoint instead (evaluate: checkpoint)"
            )
        self._probed = True

    def load(self, suite: Suite, baseline: BaselineRef) -> Scorable:
        self.check(baseline)
        return endpoint_lm(
            self.base_url,
            self.model,
            self._tokenizer(baseline),
            suite.batch_size,
            suite.max_length,
        )

    def describe(self) -> str:
        return f"endpoint {self.base_url} ({self.model})"
