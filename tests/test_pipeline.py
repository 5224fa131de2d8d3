"""The runner: run.json contract, atomic outputs, resume, lock, failures and their exit codes."""

import json
import signal
import subprocess
import sys
import textwrap

import pytest
from tiny import TINY_PTQ_RESOLVED

from optimizer.cli import main
from optimizer.errors import OptimizerError
from optimizer.pipeline import run_recipe
from optimizer.recipe import load_recipe
from optimizer.rundir import RunDirectory, sha256_tree


def run_cli(recipe, run_dir, *extra) -> int:
    return main(["run", str(recipe), "-o", str(run_dir), "-q", *map(str, extra)])


def read_run(run_dir) -> dict:
    return json.loads((run_dir / "run.json").read_text())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_llama):
    """One uninterrupted tiny FP8 run, shared by the assertions below."""
    from tiny import CALIBRATION, TINY_FP8_RECIPE

    base = tmp_path_factory.mktemp("finished")
    recipe = base / "recipe.yaml"
    recipe.write_text(TINY_FP8_RECIPE.format(model=tiny_llama, calib=CALIBRATION))
    assert run_cli(recipe, base / "run") == 0
    return recipe, base / "run"


def test_run_json_contract(finished_run, tiny_llama):
    recipe, run_dir = finished_run
    rec = read_run(run_dir)
    assert rec["status"] == "success" and rec["error"] is None
    assert rec["recipe"]["stages"][0] == TINY_PTQ_RESOLVED
    assert rec["recipe_sha256"] == load_recipe(recipe).sha256()
    assert rec["versions"]["nvidia-modelopt"].startswith("0.47")
    assert rec["versions"]["transformers"] and rec["versions"]["torch"]
    import torch

    from optimizer import hardware

    assert rec["device"]["cuda"] is torch.cuda.is_available()
    assert rec["device"]["compute_dtype"] == hardware.compute_dtype(
        "bfloat16", "auto", cuda=torch.cuda.is_available()
    )
    assert rec["model"]["path"] == str(tiny_llama)
    # the libraries the stages run on are imported (and timed) before the first stage
    startup = rec["startup"]
    assert list(startup["imports"]) == [
        "torch",
        "transformers",
        "modelopt.torch.quantization",
        "modelopt.torch.export",
    ]
    assert all(s >= 0 for s in startup["imports"].values()) and startup["seconds"] >= 0
    assert [(s["name"], s["status"]) for s in rec["stages"]] == [
        ("ptq", "success"),
        ("export", "success"),
    ]
    for stage in rec["stages"]:
        assert stage["seconds"] > 0
        for out in stage["outputs"].values():
            assert sha256_tree(__import__("pathlib").Path(out["path"])) == out["sha256"]
    assert rec["stages"][0]["metrics"]["quantized_layers"] == 14  # 7 linears x 2 layers
    # the recipe's batch_size (tests/test_batching.py: auto's)
    spec = load_recipe(recipe).calibration
    assert rec["stages"][0]["metrics"]["calibration_batch_size"] == spec.batch_size == 4
    assert rec["stages"][1]["metrics"]["trtllm_checkpoint"]["quant_algo"] == "FP8"
    assert rec["artifacts"] == {
        "trtllm_checkpoint": str(run_dir / "trtllm_checkpoint"),
        "hf_checkpoint": str(run_dir / "hf_checkpoint"),
    }
    assert (run_dir / "recipe.yaml").read_text().startswith("name: tiny-fp8")
    log = (run_dir / "logs" / "run.log").read_text()
    assert "[1/2] ptq" in log and "[2/2] export: done" in log


def test_artifacts_are_real_checkpoints(finished_run):
    _, run_dir = finished_run
    ckpt = run_dir / "trtllm_checkpoint"
    config = json.loads((ckpt / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == "FP8"
    assert config["mapping"]["world_size"] == 1
    assert config["rotary_base"] == 10000.0
    from safetensors import safe_open

    with safe_open(ckpt / "rank0.safetensors", "pt") as f:
        keys = set(f.keys())
        qkv = f.get_tensor("transformer.layers.0.attention.qkv.weight")
    assert "transformer.layers.0.attention.qkv.activation_scaling_factor" in keys
    assert "transformer.layers.1.mlp.proj.weights_scaling_factor" in keys
    assert str(qkv.dtype) == "torch.float8_e4m3fn"
    assert qkv.shape == (128 + 2 * 2 * 32, 128)  # (H + 2*KV) * head_dim rows
    hf = json.loads((run_dir / "hf_checkpoint" / "hf_quant_config.json").read_text())
    assert hf["quantization"]["quant_algo"] == "FP8"
    assert not list(run_dir.glob(".tmp-*")), "temporary outputs left behind"


def test_handover_checkpoint_restores_the_quantized_model(finished_run, tiny_llama):
    """The saved PTQ model reloads with its quantizers and gives the same logits."""
    import torch

    from optimizer.models import load_model

    _, run_dir = finished_run
    quantized = load_model(run_dir / "stages" / "00-ptq" / "model", "bfloat16")
    plain = load_model(tiny_llama, "bfloat16")
    ids = torch.arange(1, 33).unsqueeze(0).to(plain.device)  # a GPU machine loads onto CUDA
    with torch.no_grad():
        q, p = quantized(ids).logits, plain(ids).logits
    assert sum(1 for n, _ in quantized.named_modules() if n.endswith("weight_quantizer")) >= 14
    assert not torch.equal(q, p)  # fake-quant changes the numbers ...
    assert torch.allclose(q.float(), p.float(), atol=0.15)  # ... but only slightly


def test_resume_of_a_finished_run_skips_everything(finished_run, tmp_path):
    recipe, run_dir = finished_run
    before = read_run(run_dir)
    assert run_cli(recipe, run_dir, "--resume") == 0
    after = read_run(run_dir)
    assert [s["status"] for s in after["stages"]] == ["skipped", "skipped"]
    assert after["artifacts"] == before["artifacts"]
    assert [s["outputs"] for s in after["stages"]] == [s["outputs"] for s in before["stages"]]


def test_resume_redoes_changed_stages_only(finished_run, tmp_path):
    recipe, _ = finished_run
    run_dir = tmp_path / "run"
    assert run_cli(recipe, run_dir) == 0
    assert run_cli(recipe, run_dir, "--resume", "--set", "stages.export.hf_checkpoint=false") == 0
    rec = read_run(run_dir)
    assert [s["status"] for s in rec["stages"]] == ["skipped", "success"]
    assert "hf_checkpoint" not in rec["artifacts"]
    assert run_cli(recipe, run_dir, "--resume", "--set", "stages.ptq.kv_cache=fp8") == 0
    rec = read_run(run_dir)
    assert [s["status"] for s in rec["stages"]] == [
        "success",
        "success",
    ]  # upstream change: both redone
    config = json.loads((run_dir / "trtllm_checkpoint" / "config.json").read_text())
    assert config["quantization"]["kv_cache_quant_algo"] == "FP8"


def test_resume_redoes_a_stage_whose_output_was_tampered_with(finished_run, tmp_path):
    recipe, _ = finished_run
    run_dir = tmp_path / "run"
    assert run_cli(recipe, run_dir) == 0
    (run_dir / "trtllm_checkpoint" / "config.json").write_text("{}")
    assert run_cli(recipe, run_dir, "--resume") == 0
    rec = read_run(run_dir)
    assert [s["status"] for s in rec["stages"]] == ["skipped", "success"]
    assert json.loads((run_dir / "trtllm_checkpoint" / "config.json").read_text())["architecture"]


KILL_DURING_EXPORT = textwrap.dedent("""
    import os, signal, sys
    import modelopt.torch.export as export_api
    from optimizer.cli import main

    def export_then_die(model, decoder_type, dtype, export_dir, **kwargs):
        # Write part of the checkpoint, as a real export does, then die without cleanup.
        with open(os.path.join(export_dir, "config.json"), "w") as f:
            f.write('{"architecture": "LlamaForCausalLM"')
        os.kill(os.getpid(), signal.SIGKILL)

    export_api.export_tensorrt_llm_checkpoint = export_then_die
    sys.exit(main(["run", sys.argv[1], "-o", sys.argv[2], "-q"]))
""")


def test_killed_during_export_resumes_to_identical_artifacts(finished_run, tmp_path):
    recipe, reference = finished_run
    run_dir = tmp_path / "killed"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_DURING_EXPORT, str(recipe), str(run_dir)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    rec = read_run(run_dir)
    assert rec["status"] == "running"
    assert [s["status"] for s in rec["stages"]] == ["success", "running"]
    assert not (run_dir / "trtllm_checkpoint").exists()  # only a .tmp dir, never trusted
    assert list(run_dir.glob(".tmp-*"))

    assert run_cli(recipe, run_dir, "--resume") == 0
    rec = read_run(run_dir)
    assert [s["status"] for s in rec["stages"]] == ["skipped", "success"]
    assert not list(run_dir.glob(".tmp-*"))
    assert (
        "ptq: skipped (finished earlier with the same inputs)"
        in (run_dir / "logs" / "run.log").read_text()
    )
    ref = read_run(reference)
    for key in ("trtllm_checkpoint", "hf_checkpoint"):
        assert (
            rec["stages"][1]["outputs"][key]["sha256"] == ref["stages"][1]["outputs"][key]["sha256"]
        ), key
    # (The intermediate PTQ hand-over is not compared: torch.save stamps a random
    # serialization id into modelopt_state.pth. What ships, the artifacts, is identical.)


def test_existing_run_needs_resume_or_force(finished_run, tmp_path, capsys):
    recipe, _ = finished_run
    run_dir = tmp_path / "run"
    assert run_cli(recipe, run_dir) == 0
    assert run_cli(recipe, run_dir) == 2
    assert "already holds a run" in capsys.readouterr().err
    (run_dir / "trtllm_checkpoint" / "marker").write_text("old")
    assert run_cli(recipe, run_dir, "--force") == 0
    assert not (run_dir / "trtllm_checkpoint" / "marker").exists()
    assert read_run(run_dir)["status"] == "success"


def test_lock_refuses_a_second_run(write_recipe, tmp_path):
    run_dir = tmp_path / "locked"
    holder = RunDirectory(run_dir)
    holder.lock()
    try:
        with pytest.raises(OptimizerError, match="in use by another optimize run"):
            run_recipe(load_recipe(write_recipe()), run_dir)
    finally:
        holder.unlock()
    assert not (run_dir / "run.json").exists()


def test_failing_stage_exits_1_names_stage_and_leaves_no_artifact(write_recipe, tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc = run_cli(write_recipe(), run_dir, "--set", "stages.ptq.exclude=['*']")
    assert rc == 1
    err = capsys.readouterr().err
    assert "error: stage 'ptq' failed: RuntimeError:" in err and "nothing would be quantized" in err
    assert "Traceback" not in err and "Loading weights" not in err  # quiet means quiet
    rec = read_run(run_dir)
    assert rec["status"] == "failed" and rec["error"]["stage"] == "ptq"
    assert [s["status"] for s in rec["stages"]] == ["failed", "pending"]
    assert rec["artifacts"] == {}
    assert not (run_dir / "stages").exists() and not list(run_dir.glob(".tmp-*"))


def test_bad_input_found_during_a_stage_exits_2(write_recipe, tmp_path, capsys):
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps({"text": "only a few words"}) + "\n")
    rc = run_cli(write_recipe(), tmp_path / "run", "--set", f"calibration.dataset={small}")
    assert rc == 2
    err = capsys.readouterr().err
    assert "stage 'ptq'" in err and "num_samples x seq_len" in err and "Traceback" not in err
    assert read_run(tmp_path / "run")["status"] == "failed"


def test_an_unreachable_hub_dataset_is_refused_before_the_model_loads(
    write_recipe, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_dir = tmp_path / "run"
    rc = run_cli(write_recipe(), run_dir, "--set", "calibration.dataset=some-org/some-hub-set")
    assert rc == 2
    err = capsys.readouterr().err
    assert "hub dataset 'some-org/some-hub-set' (stage ptq) cannot be loaded: HF_HUB_OFFLINE" in err
    assert "Traceback" not in err
    rec = read_run(run_dir)
    assert (
        rec["status"] == "failed" and "path" not in rec["model"]
    )  # never resolved, let alone loaded
    assert not (run_dir / "stages").exists()


def test_a_run_that_cannot_fit_on_the_disk_is_refused_before_the_model_loads(
    write_recipe, tmp_path, monkeypatch, capsys, tiny_llama
):
    import collections

    import optimizer.pipeline as pipeline

    weights = sum(f.stat().st_size for f in tiny_llama.glob("*.safetensors"))
    usage = collections.namedtuple("usage", "total used free")
    # ptq saves the model (1 copy), the FP8 export's two checkpoints are at least a quarter
    # of it each: 1.5 copies; the ptq stage's model fits, the exports do not
    free = {"bytes": int(weights * 1.2)}
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda p: usage(0, 0, free["bytes"]))
    run_dir = tmp_path / "run"
    assert run_cli(write_recipe(), run_dir) == 2
    err = capsys.readouterr().err
    assert "GB free, but the stages write at least" in err and "1.5 model-sized outputs" in err
    assert "Traceback" not in err
    assert [s["status"] for s in read_run(run_dir)["stages"]] == ["pending", "pending"]
    assert not (run_dir / "stages").exists()
    free["bytes"] = int(weights * 1.5) + 1  # enough: the run goes through
    assert run_cli(write_recipe(), tmp_path / "run2") == 0


def test_weights_are_counted_once_and_in_the_recipes_dtype(tmp_path):
    import json as _json

    from optimizer.pipeline import weight_bytes

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(_json.dumps({"dtype": "float32"}))
    (d / "model.safetensors").write_bytes(b"x" * 4000)
    (d / "pytorch_model.bin").write_bytes(b"x" * 4000)  # the same weights in another format
    assert weight_bytes(d, "float32") == 4000
    assert weight_bytes(d, "bfloat16") == 2000
    (d / "consolidated.safetensors").write_bytes(b"x" * 4000)  # Mistral's second copy
    (d / "model.safetensors.index.json").write_text(
        _json.dumps({"metadata": {"total_size": 4000}, "weight_map": {}})
    )
    assert weight_bytes(d, "float32") == 4000


def test_output_digests_hashed_in_parallel_follow_the_sequential_definition(tmp_path):
    """sha256_trees hashes files concurrently; each digest must still be sha256 over the
    sorted "relative path NUL file-sha256 LF" lines of its tree (a file: its own sha256),
    bytecode caches left out, so records written before stay valid."""
    import hashlib

    from optimizer.rundir import sha256_trees

    a, b = tmp_path / "a", tmp_path / "b"
    files = {
        a / "model-00001-of-00002.safetensors": b"x" * 300_000,
        a / "model-00002-of-00002.safetensors": b"y" * 5,
        a / "sub" / "config.json": b"{}",
        a / "sub-x" / "t.json": b"1",  # path order (sub < sub-x) is not string order
        a / "__pycache__" / "m.cpython-311.pyc": b"ignored",
        b / "only.bin": b"z",
    }
    for f, data in files.items():
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
    single = tmp_path / "report.md"
    single.write_bytes(b"report")

    def reference(root):
        h = hashlib.sha256()
        for f in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            rel = f.relative_to(root).as_posix()
            h.update(rel.encode() + b"\0" + hashlib.sha256(f.read_bytes()).hexdigest().encode())
            h.update(b"\n")
        return h.hexdigest()

    got = sha256_trees([a, single, b])
    assert got == [reference(a), hashlib.sha256(b"report").hexdigest(), reference(b)]
    assert sha256_tree(a) == got[0] and sha256_trees([]) == []
    (a / "sub" / "config.json").write_bytes(b"{ }")
    assert sha256_trees([a])[0] != got[0]
