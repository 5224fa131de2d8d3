"""The accuracy gate: paired statistics, verdicts, baseline cache, failing gates, endpoints."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from tiny import make_tiny_llama, record_evaluations

from optimizer.cli import main
from optimizer.evaluation import Suite, SuiteScores, TaskScores, Threshold
from optimizer.evaluation.verdict import decide, judge


def scores(values, prefix="t"):
    return TaskScores.from_docs({f"{prefix}:{i}": float(v) for i, v in enumerate(values)})


def test_identical_answers_pass_with_zero_noise():
    m = judge(
        "t/acc", scores([1, 0, 1, 1] * 25), scores([1, 0, 1, 1] * 25), Threshold(max_drop=0.01)
    )
    assert (m.verdict, m.delta, m.delta_stderr, m.n) == ("pass", 0.0, 0.0, 100)


def test_task_scores_mean_and_standard_error():
    s = scores([1, 0, 1, 1])
    # mean 0.75; sample variance 0.25 (1/3 of 0.75); SE = sqrt(0.25 / 4) = 0.25
    assert (s.value, s.stderr, s.n) == (0.75, pytest.approx(0.25), 4)


def test_clear_drop_fails_and_clear_gain_passes():
    base = [1] * 100
    drop = judge("t/acc", scores(base), scores([1] * 60 + [0] * 40), Threshold(max_drop=0.05))
    assert drop.verdict == "fail" and drop.delta == pytest.approx(-0.4)
    gain = judge("t/acc", scores([0] * 100), scores([1] * 30 + [0] * 70), Threshold(max_drop=0.0))
    assert gain.verdict == "pass" and gain.delta == pytest.approx(0.3)


def test_drop_within_noise_of_threshold_is_inconclusive():
    # 3 % net drop with many flips both ways: SE ~ 3 %, threshold 2 % -> neither side is certain
    base = [1] * 20 + [0] * 20 + [1] * 60
    cand = [0] * 20 + [1] * 17 + [0] * 3 + [1] * 60
    m = judge("t/acc", scores(base), scores(cand), Threshold(max_drop=0.02))
    assert m.verdict == "inconclusive"
    assert m.delta == pytest.approx(-0.03) and m.delta_ci95[0] < -0.02 < m.delta_ci95[1]
    # 20 losses, 17 gains of 1 in 100: sd of d = sqrt((37 - 100 * 0.03**2) / 99), SE = sd / 10
    assert m.delta_stderr == pytest.approx(((37 - 100 * 0.03**2) / 99) ** 0.5 / 10)
    suite = Suite(
        name="s",
        tasks=[{"task": "t", "metric": "acc"}],
        thresholds={"default": Threshold(max_drop=0.02)},
    )
    b, c = SuiteScores({"t/acc": scores(base)}), SuiteScores({"t/acc": scores(cand)})
    failed = decide(suite, b, c, "fail")
    assert failed.passed is False and failed.failing == ["t/acc"]
    assert decide(suite, b, c, "pass").passed is True


def test_relative_drop_and_floor():
    base, cand = scores([1] * 50 + [0] * 50), scores([1] * 48 + [0] * 52)
    m = judge("t/acc", base, cand, Threshold(max_relative_drop=0.5))
    assert m.allowed_drop == pytest.approx(0.25) and m.verdict == "pass"
    floor = judge("t/acc", base, cand, Threshold(min_value=0.9))
    assert floor.verdict == "fail" and floor.allowed_drop is None
    assert "allowed_drop" not in floor.model_dump(exclude_none=True)


def test_verdict_serialises_to_the_gate_json_keys():
    """gate.json is a contract: the typed verdict writes exactly the keys it always had."""
    suite = Suite(name="s", tasks=[{"task": "t", "metric": "acc"}])
    verdict = decide(
        suite, SuiteScores({"t/acc": scores([1, 1, 0])}), SuiteScores({"t/acc": scores([1, 0, 0])})
    )
    data = verdict.to_json()
    assert list(data) == ["passed", "failing", "on_inconclusive", "rule", "metrics"]
    assert list(data["metrics"][0]) == [
        "metric",
        "n",
        "baseline",
        "candidate",
        "delta",
        "delta_stderr",
        "delta_ci95",
        "threshold",
        "allowed_drop",
        "reason",
        "verdict",
    ]
    assert data["metrics"][0]["threshold"] == {"max_drop": 0.01}
    assert isinstance(data["metrics"][0]["delta_ci95"], list)
    assert type(verdict).model_validate(data) == verdict  # optimize report reads it back


def test_documents_must_match():
    base = TaskScores.from_docs({"t:0": 1.0}, {"t:0": "a"})
    cand = TaskScores.from_docs({"t:0": 1.0}, {"t:0": "b"})
    with pytest.raises(ValueError, match="differs between baseline and candidate"):
        judge("t/acc", base, cand, Threshold(max_drop=0.1))


@pytest.fixture
def tiny_suite(tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_text(
        "name: tiny\nlimit: 10\ntasks:\n  - {task: local_arc_easy, metric: acc}\n"
        "thresholds:\n  default: {max_drop: 0.5}\n"
    )
    return path


def gate_run(baseline, candidate, suite, out, *extra):
    rc = main(
        [
            "gate",
            "--baseline",
            str(baseline),
            "--candidate",
            str(candidate),
            "--suite",
            str(suite),
            "-o",
            str(out),
            "-q",
            *extra,
        ]
    )
    gate = (
        json.loads((out / "report" / "gate.json").read_text())
        if (out / "report" / "gate.json").exists()
        else None
    )
    return rc, gate


def test_baseline_cache_is_reused_for_the_same_model_only(
    tiny_llama, tiny_suite, tmp_path, monkeypatch
):
    monkeypatch.setenv("OPTIMIZER_CACHE_DIR", str(tmp_path / "cache"))
    rc, first = gate_run(tiny_llama, tiny_llama, tiny_suite, tmp_path / "g1")
    assert rc == 0 and first["meta"]["baseline_cached"] is False
    rc, second = gate_run(tiny_llama, tiny_llama, tiny_suite, tmp_path / "g2")
    assert rc == 0 and second["meta"]["baseline_cached"] is True
    assert "baseline: reusing cached scores" in (tmp_path / "g2" / "logs" / "run.log").read_text()
    assert second["metrics"][0]["baseline"] == first["metrics"][0]["baseline"]
    other = make_tiny_llama(tmp_path / "other", seed=1)
    rc, third = gate_run(other, other, tiny_suite, tmp_path / "g3")
    assert rc == 0 and third["meta"]["baseline_cached"] is False  # another model: never shared
    rc, fourth = gate_run(tiny_llama, tiny_llama, tiny_suite, tmp_path / "g4", "--limit", "5")
    assert (
        fourth["meta"]["baseline_cached"] is False and fourth["metrics"][0]["n"] == 5
    )  # other limit


def test_failed_gate_exits_3_and_still_writes_reports(
    tiny_llama, tiny_suite, tmp_path, monkeypatch, capsys
):
    """A floor no random model reaches: the gate fails, names the metric, keeps the report."""
    monkeypatch.setenv("OPTIMIZER_CACHE_DIR", str(tmp_path / "cache"))
    strict = tmp_path / "strict.yaml"
    strict.write_text(tiny_suite.read_text().replace("{max_drop: 0.5}", "{min_value: 0.99}"))
    rc, gate = gate_run(tiny_llama, tiny_llama, strict, tmp_path / "g")
    assert rc == 3
    assert gate["passed"] is False and gate["failing"] == ["local_arc_easy/acc"]
    assert "accuracy gate failed on local_arc_easy/acc" in capsys.readouterr().err
    record = json.loads((tmp_path / "g" / "run.json").read_text())
    assert record["status"] == "gate_failed" and set(record["artifacts"]) == {"gate", "report"}
    assert "Failing: local_arc_easy/acc" in (tmp_path / "g" / "report" / "report.md").read_text()


def test_html_report_structure_and_regeneration(tiny_llama, tiny_suite, tmp_path, monkeypatch):
    import base64
    from html.parser import HTMLParser

    monkeypatch.setenv("OPTIMIZER_CACHE_DIR", str(tmp_path / "cache"))
    gate_run(tiny_llama, tiny_llama, tiny_suite, tmp_path / "g")
    page = tmp_path / "g" / "report" / "report.html"
    page.unlink()
    assert main(["report", str(tmp_path / "g")]) == 0

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows, self.imgs, self.in_metrics = 0, [], False

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "table" and attrs.get("id") == "metrics":
                self.in_metrics = True
            if tag == "tr" and self.in_metrics:
                self.rows += 1
            if tag == "img":
                self.imgs.append(attrs)

        def handle_endtag(self, tag):
            if tag == "table":
                self.in_metrics = False

    parser = Collect()
    parser.feed(page.read_text())
    assert parser.rows == 2  # header + one metric
    (img,) = parser.imgs
    assert img["id"] == "plot" and img["src"].startswith("data:image/png;base64,")
    assert (
        base64.b64decode(img["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    )  # self-contained
    assert "PASSED" in page.read_text()


class FakeCompletions(BaseHTTPRequestHandler):
    """A stand-in OpenAI completions server: echoes prompt logprobs only if told to."""

    echo_logprobs = True

    def do_POST(self):  # noqa: N802 (http.server API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["prompt"]
        n = len(prompt) if isinstance(prompt, list) else 1
        logprobs = (
            {"token_logprobs": [None] + [-1.0] * n, "tokens": ["x"] * (n + 1)}
            if self.echo_logprobs
            else None
        )
        payload = {"choices": [{"text": "x", "logprobs": logprobs, "index": 0}]}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def completions_server():
    servers = []

    def start(echo_logprobs: bool) -> str:
        handler = type("H", (FakeCompletions,), {"echo_logprobs": echo_logprobs})
        server = HTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/v1/completions"

    yield start
    for s in servers:
        s.shutdown()


def test_endpoint_probe(completions_server):
    from optimizer.evaluation.endpoint import probe_prompt_logprobs

    assert probe_prompt_logprobs(completions_server(True), "m", [1, 2, 3, 4]) is None
    reason = probe_prompt_logprobs(completions_server(False), "m", [1, 2, 3, 4])
    assert (
        reason
        == "the endpoint returned 0 prompt-token logprobs for a 4-token prompt (echo + logprobs unsupported)"
    )
    assert "failed" in probe_prompt_logprobs(
        "http://127.0.0.1:9/v1/completions", "m", [1], timeout=2
    )


def test_gate_refuses_an_endpoint_without_prompt_logprobs(
    tiny_llama, tiny_suite, tmp_path, monkeypatch, completions_server, capsys
):
    """Refused before the baseline and before the run directory is touched: with --force an
    earlier run there survives."""
    monkeypatch.setenv("OPTIMIZER_CACHE_DIR", str(tmp_path / "cache"))
    url = completions_server(False)
    earlier = tmp_path / "g"
    earlier.mkdir()
    (earlier / "run.json").write_text('{"schema_version": 2, "name": "gate", "status": "success"}')
    args = ["gate", "--baseline", str(tiny_llama), "--endpoint", url, "--endpoint-model", "m"]
    rc = main([*args, "--suite", str(tiny_suite), "-o", str(earlier), "-q", "--force"])
    assert rc == 2
    err = capsys.readouterr().err
    assert (
        f"endpoint {url} cannot be gated on loglikelihood tasks" in err
        and "echo + logprobs unsupported" in err
    )
    assert not (tmp_path / "cache" / "baselines").exists()  # refused before the baseline
    assert json.loads((earlier / "run.json").read_text())["status"] == "success"
    assert sorted(p.name for p in earlier.iterdir()) == ["run.json"]  # nothing written


def test_shipped_suites_load():
    from optimizer import resources
    from optimizer.evaluation import load_suite

    for path in sorted(resources.SUITES.glob("*.yaml")):
        suite = load_suite(path)
        assert suite.tasks and all(t.task.startswith("local_") for t in suite.tasks)


@pytest.mark.parametrize("evaluate", [None, "model"])
def test_gate_after_export_in_a_recipe(tiny_llama, tiny_suite, tmp_path, monkeypatch, evaluate):
    """After an export the gate evaluates what ships by default: the model rebuilt from the
    unified HF checkpoint (stored FP8 weights, activation fake-quant hooks, no ModelOpt
    quantizers). `evaluate: model` still evaluates the pipeline's own quantized model (restored
    from the PTQ stage's save, since export packed the live one)."""
    from tiny import CALIBRATION

    monkeypatch.setenv("OPTIMIZER_CACHE_DIR", str(tmp_path / "cache"))
    recipe = tmp_path / "r.yaml"
    gate = (
        f"{{suite: {tiny_suite}}}"
        if evaluate is None
        else f"{{suite: {tiny_suite}, evaluate: {evaluate}}}"
    )
    recipe.write_text(
        f"name: g\nmodel: {{source: {tiny_llama}}}\n"
        f"calibration: {{dataset: {CALIBRATION}, num_samples: 4, seq_len: 64}}\n"
        f"stages:\n  - ptq: {{format: fp8}}\n  - export: {{hf_checkpoint: true}}\n  - gate: {gate}\n"
    )
    evaluated = record_evaluations(monkeypatch)  # (quantizers on, hooked linears)
    assert main(["run", str(recipe), "-o", str(tmp_path / "run"), "-q"]) == 0
    report = json.loads((tmp_path / "run" / "report" / "gate.json").read_text())
    assert report["passed"] is True and report["metrics"][0]["n"] == 10
    assert report["meta"]["evaluated"] == (evaluate or "export")
    # 7 linears x 2 layers, quantized either way; the baseline is the plain model.
    assert evaluated == ([(0, 0), (0, 14)] if evaluate is None else [(0, 0), (14, 0)])


def test_builtin_lm_eval_tasks_are_indexed_only_when_named(monkeypatch):
    """Local tasks resolve without lm-eval's own index; any other name brings it in."""
    import lm_eval.tasks

    from optimizer.evaluation import harness

    seen = []

    class Recorder(lm_eval.tasks.TaskManager):
        def __init__(self, include_path=None, include_defaults=True, **kw):
            seen.append(include_defaults)
            raise RuntimeError("stop")

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Recorder)
    for tasks in (["local_arc_easy"], ["arc_easy"]):
        with pytest.raises(RuntimeError, match="stop"):
            harness.evaluate_tasks(object(), tasks)
    assert seen == [False, True]


def test_folding_fake_quant_weights_keeps_the_logits(tiny_llama):
    """The gate bakes fake-quantized weights in before evaluating its own copy: same logits,
    weight quantizers off, activation quantizers still on."""
    import modelopt.torch.quantization as mtq
    import torch

    from optimizer.evaluation.candidates import fold_fake_quant_weights
    from optimizer.models import load_model

    model = load_model(tiny_llama, "float32")
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.device)
    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, lambda m: m(input_ids=ids))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert fold_fake_quant_weights(model) == 14  # 7 linears x 2 layers
        after = model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-5)
    linear = model.model.layers[0].mlp.down_proj
    assert not linear.weight_quantizer.is_enabled and linear.input_quantizer.is_enabled
    assert fold_fake_quant_weights(load_model(tiny_llama, "float32")) == 0  # nothing to fold


def test_gate_refuses_a_logs_link_before_evaluating(
    tiny_llama, tiny_suite, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("OPTIMIZER_CACHE_DIR", str(tmp_path / "cache"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "g"
    out.mkdir()
    (out / "logs").symlink_to(elsewhere)
    rc, gate = gate_run(tiny_llama, tiny_llama, tiny_suite, out)
    assert rc == 2 and gate is None
    err = capsys.readouterr().err
    assert f"{out / 'logs'} is a symbolic link" in err and "Traceback" not in err
    assert not list(elsewhere.iterdir())
    assert not (tmp_path / "cache" / "baselines").exists()  # refused before the baseline
