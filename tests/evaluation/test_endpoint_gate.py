"""Gating a served model end to end: lm-eval's real completions client (LocalCompletionsAPI)
against a loopback server that runs a tiny Llama with transformers (the only double:
tests/doubles/completions_server.py), compared with the same or another checkpoint as the
baseline evaluated by lm-eval's HFLM in process.

Generative tasks (GSM8K exact match, greedy agreement) need no prompt logprobs, so a server
without them (trtllm-serve) is gated; a loglikelihood suite on such a server is refused before
the baseline is evaluated."""

import json
import sys
from pathlib import Path

import pytest
from tiny import make_tiny_llama

from optimizer.cli import main
from optimizer.errors import OptimizerError
from optimizer.evaluation import (
    BaselineRef,
    EndpointCandidate,
    SuiteScores,
    TaskScores,
    evaluate_and_judge,
    load_suite,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "doubles"))
from completions_server import CompletionsServer  # noqa: E402

AGREE = "local_greedy_prompts/greedy_agreement"
GSM8K = "local_gsm8k/exact_match"
ARC = "local_arc_easy/acc"


def _compute_dtype() -> str:
    """What ``optimize gate`` evaluates a bf16 baseline in on this machine: the server
    computes in it too, so the same weights give the same greedy tokens."""
    import torch

    from optimizer import hardware

    return hardware.compute_dtype("bfloat16", "auto", cuda=torch.cuda.is_available())


@pytest.fixture(scope="module")
def other_llama(tmp_path_factory) -> Path:
    """Another random tiny Llama with the same tokenizer (other weights)."""
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "other-llama", seed=1)


@pytest.fixture
def serve():
    servers = []

    def start(checkpoint: Path, *, prompt_logprobs: bool) -> CompletionsServer:
        server = CompletionsServer(
            checkpoint, prompt_logprobs=prompt_logprobs, dtype=_compute_dtype()
        )
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def generative_suite(tmp_path) -> Path:
    """Six GSM8K problems (0-shot, 16 tokens) and six agreement prompts (first 8 tokens)."""
    path = tmp_path / "served-tiny.yaml"
    path.write_text(
        "name: served-tiny\nlimit: 6\ntasks:\n"
        "  - {task: local_gsm8k, metric: exact_match, num_fewshot: 0, max_gen_toks: 16}\n"
        "  - {task: local_greedy_prompts, metric: greedy_agreement, max_gen_toks: 8}\n"
        "thresholds:\n"
        "  local_gsm8k/exact_match: {max_drop: 0.0}\n"
        "  local_greedy_prompts/greedy_agreement: {min_value: 0.9}\n"
    )
    return path


@pytest.fixture
def loglikelihood_suite(tmp_path) -> Path:
    path = tmp_path / "arc-tiny.yaml"
    path.write_text(
        "name: arc-tiny\nlimit: 6\ntasks:\n  - {task: local_arc_easy, metric: acc}\n"
        "thresholds:\n  default: {max_drop: 0.0}\n"
    )
    return path


def _baseline(path: Path) -> BaselineRef:
    return BaselineRef(
        path=path, fingerprint=f"test:{path.name}", dtype="bfloat16", compute_dtype=_compute_dtype()
    )


def _gate(baseline: Path, url: str, suite: Path, out: Path, *extra: str) -> tuple[int, dict | None]:
    rc = main(
        [
            "gate",
            "--baseline",
            str(baseline),
            "--endpoint",
            url,
            "--endpoint-model",
            "tiny",
            "--suite",
            str(suite),
            "-o",
            str(out),
            "-q",
            *extra,
        ]
    )
    gate_file = out / "report" / "gate.json"
    return rc, json.loads(gate_file.read_text()) if gate_file.exists() else None


def _metrics(verdict) -> dict:
    return {m.metric: m for m in verdict.metrics}


def test_generative_gate_of_a_server_without_prompt_logprobs(
    tiny_llama, other_llama, generative_suite, serve, tmp_path
):
    """The same model served (no prompt logprobs, like trtllm-serve) against its own
    checkpoint: every greedy continuation agrees and GSM8K scores the same; the baseline's
    generations come back from the cache. Another model served: agreement collapses and the
    gate fails on it. The server is never asked for prompt logprobs."""
    suite = load_suite(generative_suite)
    same = serve(tiny_llama, prompt_logprobs=False)
    cache = tmp_path / "cache"

    first = evaluate_and_judge(
        suite, _baseline(tiny_llama), EndpointCandidate(same.url, "tiny"), cache_dir=cache
    )
    m = _metrics(first.verdict)
    assert first.passed and first.verdict.failing == []
    assert (m[AGREE].n, m[AGREE].baseline, m[AGREE].candidate) == (6, 1.0, 1.0)
    assert "6 of 6 greedy continuations equal the baseline's" in m[AGREE].reason
    assert m[GSM8K].n == 6 and m[GSM8K].candidate == m[GSM8K].baseline
    # the generations themselves: lm-eval's HFLM in process and the served model agree
    assert first.candidate[AGREE].outputs == first.baseline[AGREE].outputs
    assert len(first.baseline[AGREE].outputs) == 6
    assert any(first.baseline[AGREE].outputs.values())  # not trivially empty
    assert not any(r.get("echo") for r in same.requests)  # no logprob probe, no echo

    other = serve(other_llama, prompt_logprobs=False)
    second = evaluate_and_judge(
        suite, _baseline(tiny_llama), EndpointCandidate(other.url, "tiny"), cache_dir=cache
    )
    assert second.baseline_cached is True  # the baseline's generations came from the cache
    m = _metrics(second.verdict)
    assert m[AGREE].baseline == 1.0 and m[AGREE].candidate <= 0.5
    assert m[AGREE].verdict == "fail" and AGREE in second.verdict.failing
    assert second.passed is False


def test_loglikelihood_gate_of_a_server_with_prompt_logprobs(
    tiny_llama, loglikelihood_suite, serve, tmp_path, monkeypatch
):
    """``optimize gate --endpoint`` on a loglikelihood task, the server returning prompt
    logprobs: the served model scores every document as its checkpoint does."""
    monkeypatch.setenv("OPTIMIZER_CACHE_DIR", str(tmp_path / "cache"))
    server = serve(tiny_llama, prompt_logprobs=True)
    rc, gate = _gate(tiny_llama, server.url, loglikelihood_suite, tmp_path / "g")
    assert rc == 0 and gate["passed"] is True
    (m,) = gate["metrics"]
    assert (m["metric"], m["n"], m["verdict"]) == (ARC, 6, "pass")
    assert m["candidate"] == m["baseline"] and m["delta"] == 0.0
    assert gate["meta"]["evaluated"] == "endpoint"
    # the probe, then one echoed prompt per (question, choice): 24 for these 6 questions
    echoed = [r["prompt"] for r in server.requests if r.get("echo")]
    assert sum(len(p) if isinstance(p[0], list) else 1 for p in echoed) == 1 + 24


def test_loglikelihood_suite_on_a_server_without_prompt_logprobs_is_refused(
    tiny_llama, loglikelihood_suite, serve, tmp_path, monkeypatch, capsys
):
    """Exit 2 with one message that points to the served suite, after one probe request and
    before the baseline is evaluated or the run directory written."""
    monkeypatch.setenv("OPTIMIZER_CACHE_DIR", str(tmp_path / "cache"))
    server = serve(tiny_llama, prompt_logprobs=False)
    rc, gate = _gate(tiny_llama, server.url, loglikelihood_suite, tmp_path / "g")
    assert rc == 2 and gate is None
    err = capsys.readouterr().err
    assert f"endpoint {server.url} cannot be gated on loglikelihood tasks" in err
    assert "echo + logprobs unsupported" in err and "--suite served" in err
    assert "Traceback" not in err
    assert len(server.requests) == 1 and server.requests[0]["echo"] is True
    assert not (tmp_path / "cache" / "baselines").exists()
    assert not (tmp_path / "g").exists()


def test_refusal_names_the_loglikelihood_tasks(tiny_llama, serve):
    server = serve(tiny_llama, prompt_logprobs=False)
    suite = load_suite(_shipped("quick"))
    with pytest.raises(OptimizerError, match=r"loglikelihood tasks \(local_arc_easy\)"):
        EndpointCandidate(server.url, "tiny").check(_baseline(tiny_llama), suite)
    # a generative suite: one plain completion request, no echo
    EndpointCandidate(server.url, "tiny").check(
        _baseline(tiny_llama), load_suite(_shipped("served"))
    )
    assert [bool(r.get("echo")) for r in server.requests] == [True, False]


def test_generative_suite_refuses_an_unreachable_server(tiny_llama):
    with pytest.raises(OptimizerError, match="cannot be gated: the probe request to .* failed"):
        EndpointCandidate("http://127.0.0.1:9/v1/completions", "m", timeout=2).check(
            _baseline(tiny_llama), load_suite(_shipped("served"))
        )


def test_optimize_gate_generative_suite_on_a_server_without_prompt_logprobs(
    tiny_llama, generative_suite, serve, tmp_path, monkeypatch
):
    monkeypatch.setenv("OPTIMIZER_CACHE_DIR", str(tmp_path / "cache"))
    server = serve(tiny_llama, prompt_logprobs=False)
    rc, gate = _gate(tiny_llama, server.url, generative_suite, tmp_path / "g")
    assert rc == 0 and gate["passed"] is True
    m = {x["metric"]: x for x in gate["metrics"]}
    assert m[AGREE]["candidate"] == 1.0


def _shipped(name: str) -> Path:
    from optimizer import resources

    return resources.suite(name)


def test_which_suites_need_prompt_logprobs():
    from optimizer.evaluation.harness import prompt_logprob_tasks

    assert prompt_logprob_tasks(load_suite(_shipped("served"))) == []
    assert prompt_logprob_tasks(load_suite(_shipped("quick"))) == ["local_arc_easy"]
    general = load_suite(_shipped("general"))
    assert prompt_logprob_tasks(general) == [t.task for t in general.tasks]  # local_mmlu: a group
    bad = general.model_copy(
        update={"tasks": [general.tasks[0].model_copy(update={"task": "local_nope"})]}
    )
    with pytest.raises(OptimizerError, match="'local_nope' is not an lm-eval task"):
        prompt_logprob_tasks(bad)


def test_agreement_compares_generations_prompt_by_prompt():
    from optimizer.evaluation.verdict import decide

    suite = load_suite(_shipped("served")).model_copy(
        update={
            "tasks": [
                t for t in load_suite(_shipped("served")).tasks if t.metric == "greedy_agreement"
            ]
        }
    )
    base = {f"p:{i}": f"text {i}" for i in range(10)}
    cand = {**base, "p:3": "other", "p:7": "text 7 but longer"}

    def scores(outputs):
        return SuiteScores(
            {AGREE: TaskScores.from_docs(dict.fromkeys(outputs, 1.0), None, outputs)}
        )

    (m,) = decide(suite, scores(base), scores(cand)).metrics
    assert (m.n, m.baseline, m.candidate, m.delta) == (10, 1.0, 0.8, pytest.approx(-0.2))
    # max_drop 0.5 in the shipped suite: drop 0.2 + 1.645 * SE(0.133) = 0.42 <= 0.5
    assert m.delta_stderr == pytest.approx((0.16 * 10 / 9 / 10) ** 0.5) and m.verdict == "pass"
    with pytest.raises(ValueError, match="no generations to compare"):
        decide(suite, scores(base), SuiteScores({AGREE: TaskScores.from_docs({"p:0": 1.0})}))
