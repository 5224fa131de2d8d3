"""A served model as a gate candidate: an OpenAI-compatible ``/v1/completions`` endpoint
(``trtllm-serve``, vLLM, SGLang) scored by lm-eval's completions client.

Loglikelihood tasks need the log-probability of every prompt token (``echo`` with
``logprobs``); servers that do not return them make lm-eval score every choice alike with no
error (trtllm-serve's completions endpoint is one), so :func:`probe_prompt_logprobs` asks once
before the baseline is evaluated -- when the suite has such tasks. Generative tasks
(``generate_until``: GSM8K exact match, greedy agreement; the shipped suite ``served``) need
generated text only, so a suite of them gates any server; it is only asked once for a
completion (:func:`probe_completion`), so an unreachable server is refused up front too.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer import batching
from optimizer.errors import OptimizerError
from optimizer.evaluation.candidates import Candidate
from optimizer.resources import TASKS as LOCAL_TASKS

if TYPE_CHECKING:
    from optimizer.evaluation.baseline import BaselineRef
    from optimizer.evaluation.harness import Scorable
    from optimizer.evaluation.suite import Suite

log = logging.getLogger(__name__)


def url_problem(base_url: object) -> str | None:
    """Why ``base_url`` is not an http(s) URL of a server (file://, ftp://, no host, spaces or
    control characters), or None. Only http and https are ever requested."""
    from urllib.parse import urlsplit

    if not isinstance(base_url, str) or not base_url:
        return "expected an http(s) URL such as http://localhost:8000/v1/completions"
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in base_url):
        return "the URL contains spaces or control characters"
    try:
        parts = urlsplit(base_url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as e:
        return f"not a valid URL ({e})"
    if parts.scheme.lower() not in ("http", "https"):
        scheme = f"{parts.scheme}://" if parts.scheme else "no scheme"
        return (
            f"only http:// and https:// endpoints are accepted, not {scheme} "
            "(e.g. http://localhost:8000/v1/completions)"
        )
    if not parts.hostname:
        return "the URL names no host (e.g. http://localhost:8000/v1/completions)"
    return None


def _post(base_url: str, body: dict[str, Any], timeout: float) -> tuple[Any, str | None]:
    """The endpoint's JSON answer to ``body``, or why there is none."""
    problem = url_problem(base_url)
    if problem:  # urlopen would also read file:// and ftp:// URLs
        return None, f"endpoint {base_url!r}: {problem}"
    request = urllib.request.Request(
        base_url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read()), None
    except (urllib.error.URLError, OSError, ValueError) as e:
        return None, f"the probe request to {base_url} failed: {e}"


def probe_completion(
    base_url: str, model: str, token_ids: list[int], timeout: float = 30
) -> str | None:
    """None if the endpoint completes a token-id prompt greedily (text in its first choice),
    else why not."""
    body = {"model": model, "prompt": token_ids, "max_tokens": 1, "temperature": 0}
    payload, error = _post(base_url, body, timeout)
    if error:
        return error
    try:
        text = payload["choices"][0]["text"]
    except (KeyError, IndexError, TypeError):
        return "the endpoint's answer has no choices[0].text"
    return None if isinstance(text, str) else "the endpoint's choices[0].text is not text"


def probe_prompt_logprobs(
    base_url: str, model: str, token_ids: list[int], timeout: float = 30
) -> str | None:
    """None if the endpoint returns one logprob per prompt token, else why not."""
    body = {
        "model": model,
        "prompt": token_ids,
        "max_tokens": 1,
        "echo": True,
        "logprobs": 1,
        "temperature": 0,
    }
    payload, error = _post(base_url, body, timeout)
    if error:
        return error
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
        problem = url_problem(base_url)
        if problem:
            raise OptimizerError(f"endpoint {base_url!r}: {problem}")
        self.base_url = base_url
        self.model = model
        self.tokenizer = tokenizer
        self.timeout = timeout
        #: What a probe established: "" nothing yet, "completion" (it answers),
        #: "logprobs" (it also returns prompt logprobs).
        self._probed = ""
        self._include_path: Path | None = LOCAL_TASKS

    def _tokenizer(self, baseline: BaselineRef) -> str:
        return str(self.tokenizer if self.tokenizer is not None else baseline.path)

    def check(
        self,
        baseline: BaselineRef,
        suite: Suite | None = None,
        *,
        include_path: Path | None = LOCAL_TASKS,
    ) -> None:
        """Refuse a server that cannot be gated on ``suite``: one without prompt logprobs
        when the suite has loglikelihood or multiple-choice tasks (without a suite: assumed
        to have them), and one that does not answer. One request, before the baseline."""
        self._include_path = include_path  # load() checks the suite against the same tasks
        logprob_tasks: list[str] | None = None
        if suite is not None:
            from optimizer.evaluation.harness import prompt_logprob_tasks

            logprob_tasks = prompt_logprob_tasks(suite, include_path)
        need_logprobs = logprob_tasks is None or bool(logprob_tasks)
        if self._probed == "logprobs" or (self._probed and not need_logprobs):
            return
        from optimizer import models

        tokenizer = models.load_tokenizer(
            Path(self._tokenizer(baseline)), baseline.trust_remote_code
        )
        ids = tokenizer(PROBE_TEXT)["input_ids"]
        if not need_logprobs:
            reason = probe_completion(self.base_url, self.model, ids, self.timeout)
            if reason:
                raise OptimizerError(f"endpoint {self.base_url} cannot be gated: {reason}")
            log.info(
                "endpoint: suite %s is generative only; prompt logprobs not needed", suite.name
            )
            self._probed = "completion"
            return
        reason = probe_prompt_logprobs(self.base_url, self.model, ids, self.timeout)
        if reason:
            which = f" ({', '.join(logprob_tasks)})" if logprob_tasks else ""
            raise OptimizerError(
                f"endpoint {self.base_url} cannot be gated on loglikelihood tasks{which}: "
                f"{reason}. lm-eval would silently score every choice alike. Gate it on "
                "generative tasks, which need no prompt logprobs (--suite served: GSM8K exact "
                "match and greedy agreement with the baseline), serve a backend that returns "
                "prompt logprobs, or evaluate the checkpoint instead (evaluate: checkpoint)"
            )
        self._probed = "logprobs"

    def load(self, suite: Suite, baseline: BaselineRef) -> Scorable:
        from optimizer.evaluation.suite import DEFAULT_BATCH_SIZE

        self.check(baseline, suite, include_path=self._include_path)
        return endpoint_lm(
            self.base_url,
            self.model,
            self._tokenizer(baseline),
            # a server's memory is its own: auto is the fixed default here
            batching.fixed(suite.batch_size, DEFAULT_BATCH_SIZE),
            suite.max_length,
        )

    def describe(self) -> str:
        return f"endpoint {self.base_url} ({self.model})"
