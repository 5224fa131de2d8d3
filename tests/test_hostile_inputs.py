"""A corpus of hostile inputs to ``optimize check``, ``optimize report``, ``optimize gate``,
model sources, endpoints and docker images (issue 15): each is refused with exit 2 and ONE
clear message naming the file (and key), no traceback, and nothing is written.

The checkpoints are built by hand (config.json + safetensors headers over zero bytes, a few
KB), valid first (a test proves they pass), then damaged one way each.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from test_bad_input_corpus import assert_one_clear_error

from optimizer.cli import main
from optimizer.errors import OptimizerError
from optimizer.safetensors_header import tensor_nbytes

# --------------------------------------------------------------------------- builders

H, HEADS, KV, INTER, VOCAB = 8, 2, 2, 16, 16
HEAD = H // HEADS


def safetensors_bytes(tensors: dict[str, tuple[str, list[int]]], edit=None) -> bytes:
    """A safetensors file of zeros; ``edit(header)`` may damage the header first."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = tensor_nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    if edit is not None:
        header = edit(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(offset)


def trtllm_tensors() -> dict[str, tuple[str, list[int]]]:
    p = "transformer.layers.0"
    return {
        "transformer.vocab_embedding.weight": ("BF16", [VOCAB, H]),
        "transformer.ln_f.weight": ("BF16", [H]),
        "lm_head.weight": ("BF16", [VOCAB, H]),
        f"{p}.input_layernorm.weight": ("BF16", [H]),
        f"{p}.post_layernorm.weight": ("BF16", [H]),
        f"{p}.attention.qkv.weight": ("BF16", [(HEADS + 2 * KV) * HEAD, H]),
        f"{p}.attention.dense.weight": ("BF16", [H, HEADS * HEAD]),
        f"{p}.mlp.fc.weight": ("BF16", [INTER, H]),
        f"{p}.mlp.gate.weight": ("BF16", [INTER, H]),
        f"{p}.mlp.proj.weight": ("BF16", [H, INTER]),
    }


def trtllm_config() -> dict:
    return {
        "architecture": "LlamaForCausalLM",
        "dtype": "bfloat16",
        "hidden_size": H,
        "num_hidden_layers": 1,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "intermediate_size": INTER,
        "vocab_size": VOCAB,
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }


def hf_tensors() -> dict[str, tuple[str, list[int]]]:
    out = {
        "model.embed_tokens.weight": ("BF16", [VOCAB, H]),
        "model.norm.weight": ("BF16", [H]),
        "lm_head.weight": ("BF16", [VOCAB, H]),
    }
    p = "model.layers.0"
    out[f"{p}.input_layernorm.weight"] = ("BF16", [H])
    out[f"{p}.post_attention_layernorm.weight"] = ("BF16", [H])
    for name, shape in {
        "self_attn.q_proj": [HEADS * HEAD, H],
        "self_attn.k_proj": [KV * HEAD, H],
        "self_attn.v_proj": [KV * HEAD, H],
        "self_attn.o_proj": [H, HEADS * HEAD],
        "mlp.gate_proj": [INTER, H],
        "mlp.up_proj": [INTER, H],
        "mlp.down_proj": [H, INTER],
    }.items():
        out[f"{p}.{name}.weight"] = ("BF16", shape)
    return out


def hf_config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "dtype": "bfloat16",
        "hidden_size": H,
        "num_hidden_layers": 1,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "intermediate_size": INTER,
        "vocab_size": VOCAB,
        "tie_word_embeddings": False,
    }


def make_checkpoint(root: Path, kind: str) -> tuple[Path, str]:
    """A valid checkpoint of ``kind`` ('trtllm' or 'hf'): (directory, weights file name)."""
    path = root / kind
    path.mkdir()
    config, tensors, weights = (
        (trtllm_config(), trtllm_tensors(), "rank0.safetensors")
        if kind == "trtllm"
        else (hf_config(), hf_tensors(), "model.safetensors")
    )
    (path / "config.json").write_text(json.dumps(config))
    (path / weights).write_bytes(safetensors_bytes(tensors))
    return path, weights


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``path`` with its size and mtime: proves nothing was written."""
    return {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
    }


# --------------------------------------------------------------------------- damage


def config_text(text: str):
    def damage(path: Path, weights: str) -> None:
        (path / "config.json").write_text(text)

    return damage


def config_dir(path: Path, weights: str) -> None:
    (path / "config.json").unlink()
    (path / "config.json").mkdir()


def config_set(**values):
    def damage(path: Path, weights: str) -> None:
        config = json.loads((path / "config.json").read_text())
        for key, value in values.items():
            target = config
            *parents, leaf = key.split("__")
            for parent in parents:
                target = target[parent]
            target[leaf] = value
        (path / "config.json").write_text(json.dumps(config))

    return damage


def header_edit(edit):
    def damage(path: Path, weights: str) -> None:
        tensors = trtllm_tensors() if weights.startswith("rank") else hf_tensors()
        (path / weights).write_bytes(safetensors_bytes(tensors, edit))

    return damage


def first(header: dict) -> dict:
    return header[next(iter(header))]


def no_offsets(header: dict) -> dict:
    del first(header)["data_offsets"]
    return header


def short_span(header: dict) -> dict:  # the offsets say 2 bytes, dtype and shape need more
    entry = first(header)
    entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][0] + 2]
    return header


def bigger_shape(header: dict) -> dict:  # the shape grows, the offsets stay: a lie
    first(header)["shape"] = [VOCAB * 2, H]
    return header


def overlap(header: dict) -> dict:  # two tensors on the same bytes, the file size unchanged
    names = list(header)
    a, b = header[names[1]], header[names[3]]
    b["data_offsets"] = list(a["data_offsets"])
    return header


def as_list(header: dict) -> list:
    return list(header.values())


def string_offsets(header: dict) -> dict:
    first(header)["data_offsets"] = ["0", "256"]
    return header


def bool_shape(header: dict) -> dict:
    name = next(n for n, e in header.items() if e["shape"] == [H])
    header[name]["shape"] = [True] * 1
    return header


def bool_shape_consistent(header: dict) -> dict:  # [true] as a shape, offsets to match
    names = [n for n, e in header.items() if e["shape"] == [H]]
    header[names[-1]]["shape"] = [True]
    begin = header[names[-1]]["data_offsets"][0]
    header[names[-1]]["data_offsets"] = [begin, begin + 2]
    return header


def string_shape(header: dict) -> dict:  # list("16") would read as ['1', '6']
    first(header)["shape"] = "16"
    return header


def truncate(path: Path, weights: str) -> None:
    data = (path / weights).read_bytes()
    (path / weights).write_bytes(data[:-10])


def trailing(path: Path, weights: str) -> None:
    with open(path / weights, "ab") as fh:
        fh.write(b"\0" * 16)


def huge_header_length(path: Path, weights: str) -> None:
    data = (path / weights).read_bytes()
    (path / weights).write_bytes(struct.pack("<Q", len(data) * 4) + data[8:])


def tiny_file(path: Path, weights: str) -> None:
    (path / weights).write_bytes(b"\x01\x02\x03")


def header_not_json(path: Path, weights: str) -> None:
    raw = b"{not json at all}"
    (path / weights).write_bytes(struct.pack("<Q", len(raw)) + raw)


def weights_dir(path: Path, weights: str) -> None:
    (path / weights).unlink()
    (path / weights).mkdir()


#: (id, checkpoint kind, damage, message fragment)
CHECK_CASES = [
    # config.json
    ("trt-config-list", "trtllm", config_text("[1, 2]"), "holds list, not a JSON object"),
    ("trt-config-null", "trtllm", config_text("null"), "holds NoneType, not a JSON object"),
    ("trt-config-not-json", "trtllm", config_text("{hidden_size: 8"), "is not valid JSON"),
    ("trt-config-empty", "trtllm", config_text(""), "is not valid JSON"),
    ("trt-config-binary", "trtllm", config_text("\x00\x01"), "not valid JSON"),
    ("trt-config-directory", "trtllm", config_dir, "config.json is not a file"),
    ("trt-hidden-string", "trtllm", config_set(hidden_size="8"), "config.json hidden_size"),
    ("trt-heads-zero", "trtllm", config_set(num_attention_heads=0), "num_attention_heads"),
    ("trt-heads-negative", "trtllm", config_set(num_attention_heads=-2), "num_attention_heads"),
    ("trt-kv-heads-zero", "trtllm", config_set(num_key_value_heads=0), "num_key_value_heads"),
    ("trt-layers-string", "trtllm", config_set(num_hidden_layers="1"), "num_hidden_layers"),
    ("trt-layers-bool", "trtllm", config_set(num_hidden_layers=True), "num_hidden_layers"),
    ("trt-inter-float", "trtllm", config_set(intermediate_size=16.0), "intermediate_size"),
    ("trt-hidden-null", "trtllm", config_set(hidden_size=None), "config.json hidden_size"),
    ("trt-heads-not-dividing", "trtllm", config_set(num_key_value_heads=3), "multiple of"),
    ("trt-tp-string", "trtllm", config_set(mapping__tp_size="two"), "mapping.tp_size"),
    ("trt-tp-zero", "trtllm", config_set(mapping__tp_size=0), "mapping.tp_size"),
    ("trt-world-negative", "trtllm", config_set(mapping__world_size=-1), "mapping.world_size"),
    ("trt-mapping-list", "trtllm", config_set(mapping=[1]), "config.json mapping must be"),
    ("trt-quant-list", "trtllm", config_set(quantization=["FP8"]), "quantization must be"),
    ("trt-algo-list", "trtllm", config_set(quantization__quant_algo=["FP8"]), "quant_algo"),
    ("trt-kv-dict", "trtllm", config_set(quantization__kv_cache_quant_algo={}), "kv_cache"),
    ("trt-group-string", "trtllm", config_set(quantization__group_size="128"), "group_size"),
    (
        "trt-exclude-string",
        "trtllm",
        config_set(quantization__exclude_modules="lm_head"),
        "exclude",
    ),
    ("trt-arch-list", "trtllm", config_set(architecture=["Llama"]), "architecture must be"),
    # rank0.safetensors
    ("trt-header-list", "trtllm", header_edit(as_list), "rank0.safetensors is unreadable"),
    ("trt-no-offsets", "trtllm", header_edit(no_offsets), "data_offsets"),
    ("trt-short-span", "trtllm", header_edit(short_span), "data_offsets span 2 bytes"),
    ("trt-shape-lies", "trtllm", header_edit(bigger_shape), "rank0.safetensors is unreadable"),
    ("trt-overlap", "trtllm", header_edit(overlap), "rank0.safetensors is unreadable"),
    ("trt-string-offsets", "trtllm", header_edit(string_offsets), "are not a byte range"),
    ("trt-truncated", "trtllm", truncate, "truncated"),
    ("trt-trailing-bytes", "trtllm", trailing, "bytes after the last tensor"),
    ("trt-header-too-long", "trtllm", huge_header_length, "header length is larger than the file"),
    ("trt-three-bytes", "trtllm", tiny_file, "shorter than a safetensors header"),
    ("trt-header-not-json", "trtllm", header_not_json, "header is not JSON"),
    ("trt-weights-directory", "trtllm", weights_dir, "rank0.safetensors is missing"),
    # unified / plain HF checkpoint
    ("hf-config-list", "hf", config_text("[]"), "holds list, not a JSON object"),
    ("hf-config-null", "hf", config_text("null"), "holds NoneType, not a JSON object"),
    ("hf-config-not-json", "hf", config_text("{'model_type': 'llama'}"), "is not valid JSON"),
    ("hf-hidden-string", "hf", config_set(hidden_size="8"), "hidden_size"),
    ("hf-heads-zero", "hf", config_set(num_attention_heads=0), "num_attention_heads"),
    ("hf-heads-negative", "hf", config_set(num_attention_heads=-2), "num_attention_heads"),
    ("hf-vocab-string", "hf", config_set(vocab_size="16"), "vocab_size"),
    ("hf-quant-config-list", "hf", config_set(quantization_config=[1]), "quantization_config"),
    ("hf-header-list", "hf", header_edit(as_list), "model.safetensors is unreadable"),
    ("hf-no-offsets", "hf", header_edit(no_offsets), "data_offsets"),
    ("hf-short-span", "hf", header_edit(short_span), "data_offsets span 2 bytes"),
    ("hf-shape-lies", "hf", header_edit(bigger_shape), "model.safetensors is unreadable"),
    ("hf-overlap", "hf", header_edit(overlap), "model.safetensors is unreadable"),
    ("hf-bool-shape", "hf", header_edit(bool_shape), "model.safetensors is unreadable"),
    ("hf-bool-shape-consistent", "hf", header_edit(bool_shape_consistent), "is not a list of"),
    ("hf-string-shape", "hf", header_edit(string_shape), "is not a list of sizes"),
    ("hf-truncated", "hf", truncate, "truncated"),
    ("hf-header-too-long", "hf", huge_header_length, "header length is larger than the file"),
    ("hf-three-bytes", "hf", tiny_file, "shorter than a safetensors header"),
    ("hf-header-not-json", "hf", header_not_json, "header is not JSON"),
]


@pytest.mark.parametrize("kind", ["trtllm", "hf"])
def test_the_hand_built_checkpoints_pass(kind, tmp_path, capsys):
    path, _ = make_checkpoint(tmp_path, kind)
    assert main(["check", str(path)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith(f"ok: {path}")


@pytest.mark.parametrize(
    ("case", "kind", "damage", "fragment"), CHECK_CASES, ids=[c[0] for c in CHECK_CASES]
)
def test_check_refuses_a_damaged_checkpoint(case, kind, damage, fragment, tmp_path, capsys):
    path, weights = make_checkpoint(tmp_path, kind)
    damage(path, weights)
    before = snapshot(tmp_path)
    assert main(["check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert_one_clear_error(err, fragment)
    assert str(path) in err and ("config.json" in err or ".safetensors" in err)
    assert not out
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- local models


@pytest.mark.parametrize(
    ("case", "text", "fragment"),
    [
        ("not-json", "{model_type: llama", "config.json is not valid JSON"),
        ("list", "[1]", "config.json holds list, not a JSON object"),
        ("null", "null", "config.json holds NoneType, not a JSON object"),
    ],
)
def test_validate_refuses_a_local_model_whose_config_is_not_json(
    case, text, fragment, tmp_path, capsys
):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(text)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: bad\nmodel: {{source: {model}}}\nstages:\n"
        "  - export: {trtllm_checkpoint: null, hf_checkpoint: true}\n"
    )
    before = snapshot(tmp_path)
    assert main(["validate", str(recipe)]) == 2
    _, err = capsys.readouterr()
    assert_one_clear_error(err, fragment)
    assert str(recipe) in err and "model.source" in err
    assert snapshot(tmp_path) == before


def test_peek_config_of_a_non_object_config_is_unknown(tmp_path):
    from optimizer import models

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("[1, 2]")
    assert models.peek_config(str(tmp_path / "m"), tmp_path) is None
    assert "holds list" in models.check_source(str(tmp_path / "m"), tmp_path)


# --------------------------------------------------------------------------- optimize report

VERDICT = {"passed": True, "failing": [], "on_inconclusive": "fail", "rule": "r", "metrics": []}


def make_run(root: Path, gate: object = VERDICT, record: object = None) -> Path:
    run = root / "run"
    (run / "report").mkdir(parents=True)
    gate_file = run / "report" / "gate.json"
    gate_file.write_text(gate if isinstance(gate, str) else json.dumps(gate))
    if record is None:
        record = _record(str(gate_file))
    (run / "run.json").write_text(record if isinstance(record, str) else json.dumps(record))
    return run


def _record(gate, **extra):
    return {"name": "r", "status": "success", "artifacts": {"gate": gate}, **extra}


def test_report_of_a_sound_run_writes_beside_gate_json(tmp_path, capsys):
    run = make_run(tmp_path)
    assert main(["report", str(run)]) == 0, capsys.readouterr().err
    assert (run / "report" / "report.html").is_file()
    assert (run / "report" / "report.md").is_file()


#: (id, gate.json (object or text), run.json (object, text or None: a sound one), the CLI's
#: message fragment, regenerate()'s own fragment (the library refuses it without the CLI))
REPORT_CASES = [
    ("run-json-not-json", VERDICT, "{status: ", "run.json", "has no readable run.json"),
    ("run-json-list", VERDICT, "[]", "run.json", "run.json does not describe a run"),
    ("run-json-null", VERDICT, "null", "run.json", "run.json does not describe a run"),
    (
        "artifacts-list",
        VERDICT,
        {"name": "r", "artifacts": ["g"]},
        "artifacts",
        "artifacts is list",
    ),
    ("gate-path-number", VERDICT, _record(5), "artifacts", "artifacts.gate 5 is not a path"),
    ("gate-path-list", VERDICT, _record(["a"]), "artifacts", "artifacts.gate ['a'] is not a path"),
    ("gate-missing", VERDICT, _record("{run}/report/no.json"), "no.json", "does not exist"),
    ("no-gate", VERDICT, {"name": "r", "artifacts": {}}, "no gate result", "no gate result"),
    ("gate-not-json", "{passed: true", None, "gate.json is not a readable", "not a readable"),
    ("gate-list", "[1]", None, "(it holds list", "(it holds list"),
    ("gate-null", "null", None, "(it holds NoneType", "(it holds NoneType"),
    ("gate-no-passed", {**VERDICT, "passed": None}, None, "passed: Input", "passed: Input"),
    ("gate-extra-key", {**VERDICT, "rm": 1}, None, "rm: Extra inputs", "rm: Extra inputs"),
    ("gate-meta-list", {**VERDICT, "meta": [1]}, None, "meta is list", "meta is list"),
    ("gate-metrics-string", {**VERDICT, "metrics": "x"}, None, "metrics: Input", "metrics: Input"),
]


def _report_case(tmp_path, gate, record):
    if isinstance(record, dict):
        gate_path = record.get("artifacts", {})
        if isinstance(gate_path, dict) and isinstance(gate_path.get("gate"), str):
            path = gate_path["gate"].replace("{run}", str(tmp_path / "run"))
            record = {**record, "artifacts": {"gate": path}}
    return make_run(tmp_path, gate, record)


@pytest.mark.parametrize(
    ("case", "gate", "record", "fragment", "_"), REPORT_CASES, ids=[c[0] for c in REPORT_CASES]
)
def test_report_refuses_a_malformed_run(case, gate, record, fragment, _, tmp_path, capsys):
    run = _report_case(tmp_path, gate, record)
    before = snapshot(tmp_path)
    assert main(["report", str(run)]) == 2
    out, err = capsys.readouterr()
    assert_one_clear_error(err, fragment)
    assert str(run) in err
    assert not out
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("case", "gate", "record", "_", "fragment"), REPORT_CASES, ids=[c[0] for c in REPORT_CASES]
)
def test_regenerate_refuses_a_malformed_run(case, gate, record, _, fragment, tmp_path):
    from optimizer.evaluation import regenerate

    run = _report_case(tmp_path, gate, record)
    before = snapshot(tmp_path)
    with pytest.raises(OptimizerError) as raised:
        regenerate(run)
    message = str(raised.value)
    assert fragment in message and "\n" not in message
    assert str(run) in message
    assert snapshot(tmp_path) == before


def test_regenerate_ignores_malformed_stage_records(tmp_path):
    from optimizer.evaluation import regenerate

    gate_file = tmp_path / "run" / "report" / "gate.json"
    stages = ["x", {"outputs": [1]}, {"name": 3, "metrics": {"loss_curve": "zig"}}]
    run = make_run(tmp_path, record=_record(str(gate_file), stages=stages))
    assert regenerate(run) == gate_file.parent / "report.html"


@pytest.mark.parametrize("how", ["absolute", "relative", "symlink"])
@pytest.mark.parametrize("via", ["cli", "library"])
def test_report_never_writes_outside_the_run_directory(how, via, tmp_path, capsys):
    from optimizer.evaluation import regenerate

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "gate.json").write_text(json.dumps(VERDICT))
    run = make_run(tmp_path)
    if how == "absolute":
        target = str(elsewhere / "gate.json")
    elif how == "relative":
        target = "../elsewhere/gate.json"
    else:
        os.symlink(elsewhere, run / "linked")
        target = str(run / "linked" / "gate.json")
    (run / "run.json").write_text(json.dumps(_record(target)))
    before = snapshot(elsewhere)
    if via == "cli":
        assert main(["report", str(run)]) == 2
        _, err = capsys.readouterr()
        assert_one_clear_error(err, "outside the run directory")
        assert "run.json" in err
    else:
        with pytest.raises(OptimizerError, match="artifacts.gate .* lies outside the run dir"):
            regenerate(run)
    assert snapshot(elsewhere) == before
    assert not (elsewhere / "report.html").exists()


# --------------------------------------------------------------------------- optimize gate


@pytest.fixture
def no_evaluation(monkeypatch):
    """Anything past input checking fails the test: nothing may be resolved or evaluated."""
    from optimizer import evaluation, models

    def forbidden(*args, **kwargs):
        raise AssertionError("evaluated or resolved before every input was checked")

    monkeypatch.setattr(evaluation, "evaluate_and_judge", forbidden)
    monkeypatch.setattr(models, "resolve_source", forbidden)
    monkeypatch.setattr(evaluation, "load_suite", forbidden)


def _gate(tmp_path, *args):
    baseline = tmp_path / "baseline"
    baseline.mkdir(exist_ok=True)
    (baseline / "config.json").write_text(json.dumps(hf_config()))
    return [
        "gate",
        "--baseline",
        str(baseline),
        "--suite",
        "quick",
        "-o",
        str(tmp_path / "out"),
        *args,
    ]


#: (id, gate arguments, fragment)
GATE_CASES = [
    (
        "candidate-missing",
        ["--candidate", "{tmp}/nope"],
        "--candidate {tmp}/nope: no such directory",
    ),
    ("candidate-a-file", ["--candidate", "{tmp}/file"], "--candidate {tmp}/file: not a directory"),
    (
        "endpoint-file-url",
        ["--endpoint", "file:///etc/passwd", "--endpoint-model", "m"],
        "only http:// and https:// endpoints are accepted, not file://",
    ),
    (
        "endpoint-ftp-url",
        ["--endpoint", "ftp://host/x", "--endpoint-model", "m"],
        "not ftp://",
    ),
    (
        "endpoint-no-host",
        ["--endpoint", "http:///v1/completions", "--endpoint-model", "m"],
        "the URL names no host",
    ),
    (
        "endpoint-newline",
        ["--endpoint", "http://h/v1\nx", "--endpoint-model", "m"],
        "spaces or control characters",
    ),
]


@pytest.mark.parametrize(("case", "args", "fragment"), GATE_CASES, ids=[c[0] for c in GATE_CASES])
def test_gate_checks_every_input_before_evaluating(
    case, args, fragment, tmp_path, capsys, no_evaluation
):
    (tmp_path / "file").write_text("x")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    before = snapshot(tmp_path)
    assert main(_gate(tmp_path, *args)) == 2
    out, err = capsys.readouterr()
    assert_one_clear_error(err, fragment.replace("{tmp}", str(tmp_path)))
    assert not out
    assert not (tmp_path / "out").exists()
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("baseline")} == {
        k: v for k, v in before.items() if not k.startswith("baseline")
    }


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "FILE:///x",
        "ftp://h/x",
        "gopher://h",
        "localhost:8000/v1",
        "",
        "http://",
    ],
)
def test_the_endpoint_candidate_accepts_only_http_urls(url):
    from optimizer.evaluation.endpoint import EndpointCandidate, probe_completion

    with pytest.raises(OptimizerError, match="endpoint"):
        EndpointCandidate(url, "m")
    assert "endpoint" in probe_completion(url, "m", [1, 2])  # never opened


@pytest.mark.parametrize("url", ["http://localhost:8000/v1/completions", "HTTPS://h.example/v1"])
def test_the_endpoint_candidate_takes_http_and_https(url):
    from optimizer.evaluation.endpoint import EndpointCandidate

    assert EndpointCandidate(url, "m").base_url == url


# --------------------------------------------------------------------------- docker images

BAD_IMAGES = [
    "--privileged",
    "-v/:/host",
    "--network=host",
    "-",
    "",
    "image with space",
    "nvcr.io/x:tag\n--privileged",
    "name:",
    "name@sha256:1234",
    "name:-tag",
    "a//b",
    "/abs",
]


@pytest.mark.parametrize("image", BAD_IMAGES)
def test_docker_refuses_what_is_not_an_image_reference(image, tmp_path):
    from optimizer import launchers

    assert launchers.image_problem(image)
    with pytest.raises(OptimizerError, match="image"):
        launchers.wrap("docker", ["trtllm-build"], image=image, mounts=[tmp_path], prefix=[])


@pytest.mark.parametrize(
    "image",
    [
        "nvcr.io/nvidia/tensorrt-llm/release:1.2.0",
        "nvcr.io/nvidia/tensorrt-llm/release:1.3.0rc27",
        "vllm/vllm-openai:v0.16.0",
        "ubuntu",
        "localhost:5000/team/trtllm:dev_1@sha256:" + "a" * 64,
        "registry.example.com/a/b@sha256:" + "0" * 64,
    ],
)
def test_docker_takes_image_references(image, tmp_path):
    from optimizer import launchers

    assert launchers.image_problem(image) is None
    cmd = launchers.wrap("docker", ["trtllm-build"], image=image, mounts=[tmp_path], prefix=[])
    assert cmd[cmd.index(image) + 1 :] == ["trtllm-build"]
    assert all(not a.startswith("-") for a in cmd[cmd.index(image) :])
