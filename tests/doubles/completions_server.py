"""Test double: an OpenAI-compatible ``/v1/completions`` server for a Hugging Face checkpoint.

It stands in for ``trtllm-serve`` / vLLM in tests of the endpoint gate: lm-eval's real
completions client (``LocalCompletionsAPI``) talks to it over loopback HTTP. It serves one
model with transformers on ``127.0.0.1`` (a thread, an ephemeral port) and implements what
that client sends:

- token-id prompts (a list of ids, or a batch: a list of lists; text prompts are tokenised);
- greedy generation: ``max_tokens``, ``stop`` (the text is cut before the first stop
  sequence, which is not returned) and the end-of-sequence token;
- ``echo`` + ``logprobs`` (the loglikelihood requests and the gate's probe): one logprob per
  prompt token (None for the first) followed by the generated tokens', with the top-1
  alternative in ``top_logprobs`` -- only with ``prompt_logprobs=True``. Without it the
  server answers like trtllm-serve: the echoed text and no logprobs at all.

Every prompt is evaluated on its own (no padding), in ``dtype``. ``requests`` records the
bodies received, so a test can tell what a client asked for.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class CompletionsServer:
    def __init__(self, checkpoint: Path, *, prompt_logprobs: bool = True, dtype: str = "float32"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.model = AutoModelForCausalLM.from_pretrained(
            checkpoint, dtype=getattr(torch, dtype)
        ).eval()
        self.prompt_logprobs = prompt_logprobs
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server API)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path.rstrip("/") != "/v1/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                try:
                    payload = server.complete(body)
                except Exception as e:  # noqa: BLE001 (a server answers, it does not die)
                    return self._send(400, {"error": {"message": f"{type(e).__name__}: {e}"}})
                self._send(200, payload)

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The full completions URL (what ``--endpoint`` takes)."""
        return f"http://127.0.0.1:{self._http.server_port}/v1/completions"

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()

    def __enter__(self) -> CompletionsServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the model

    def _prompts(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        return [
            p if isinstance(p, list) else self.tokenizer(p, add_special_tokens=False).input_ids
            for p in prompt
        ]

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(body)
        if body.get("temperature", 1.0) not in (0, 0.0):
            raise ValueError("this double decodes greedily only (temperature 0)")
        max_tokens = int(body.get("max_tokens", 16))
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        echo = bool(body.get("echo"))
        want_logprobs = body.get("logprobs") is not None
        choices = []
        with self._lock:
            for index, ids in enumerate(self._prompts(body["prompt"])):
                generated, finish = self._generate(ids, max_tokens, stop)
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                text, stopped = _cut(text, stop)
                choice: dict[str, Any] = {
                    "index": index,
                    "text": (self.tokenizer.decode(ids) if echo else "") + text,
                    "finish_reason": "stop" if stopped else finish,
                    "logprobs": None,
                }
                if want_logprobs and (self.prompt_logprobs or not echo):
                    choice["logprobs"] = self._logprobs(ids, generated, echo)
                choices.append(choice)
        return {
            "id": "cmpl-double",
            "object": "text_completion",
            "model": body.get("model"),
            "choices": choices,
        }

    def _generate(self, ids: list[int], max_tokens: int, stop: list[str]) -> tuple[list[int], str]:
        import torch

        generated: list[int] = []
        eos = self.tokenizer.eos_token_id
        past = None
        inputs = torch.tensor([ids])
        with torch.no_grad():
            while len(generated) < max_tokens:
                out = self.model(input_ids=inputs, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = int(out.logits[0, -1].float().argmax())
                generated.append(token)  # the end-of-sequence token too: it has a logprob
                if token == eos:
                    return generated, "stop"
                if (
                    stop
                    and _cut(self.tokenizer.decode(generated, skip_special_tokens=True), stop)[1]
                ):
                    return generated, "stop"
                inputs = torch.tensor([[token]])
        return generated, "length"

    def _logprobs(self, ids: list[int], generated: list[int], echo: bool) -> dict[str, Any]:
        import torch

        sequence = ids + generated
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([sequence])).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        token_logprobs: list[float | None] = [None]
        top: list[dict[str, float] | None] = [None]
        for position in range(1, len(sequence)):
            row = logprobs[position - 1]
            best = int(row.argmax())
            token_logprobs.append(float(row[sequence[position]]))
            top.append({self.tokenizer.convert_ids_to_tokens(best): float(row[best])})
        start = 0 if echo else len(ids)
        return {
            "tokens": self.tokenizer.convert_ids_to_tokens(sequence[start:]),
            "token_logprobs": token_logprobs[start:],
            "top_logprobs": top[start:],
        }


def _cut(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop sequence, and whether there was one."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=None)
    return (text, False) if cut is None else (text[:cut], True)
