"""build stage: contract tests against the trtllm-build test double (tests/doubles/trtllm-build),
pre-flight refusals, launchers; the real tool where it exists (marker `trtllm`)."""

import json
import shutil
import subprocess
import sys

import pytest
from tiny import CALIBRATION, REPO

from optimizer.cli import main
from optimizer.errors import RecipeError
from optimizer.recipe import load_recipe

DOUBLE = REPO / "tests" / "doubles" / "trtllm-build"
BUILD = (
    f"{{launcher: local, trtllm_build: {DOUBLE}, python: {DOUBLE}, max_batch_size: 8, "
    "max_input_len: 256, max_seq_len: 512, max_num_tokens: 1024, timeout_s: 60}"
)


def recipe(tmp_path, tiny_llama, build=BUILD, ptq="{format: fp8, kv_cache: fp8}", tp=2, hf="true"):
    path = tmp_path / "r.yaml"
    path.write_text(
        f"name: b\nmodel: {{source: {tiny_llama}}}\n"
        f"calibration: {{dataset: {CALIBRATION}, num_samples: 2, seq_len: 32}}\n"
        f"stages:\n  - ptq: {ptq}\n  - export: {{trtllm_checkpoint: {{tp: {tp}}}, hf_checkpoint: {hf}}}\n"
        f"  - build: {build}\n"
    )
    return path


def run(path, out, *extra):
    return main(["run", str(path), "-o", str(out), "-q", *extra])


def test_build_produces_verified_engines_and_deploy_files(tiny_llama, tmp_path):
    out = tmp_path / "run"
    assert run(recipe(tmp_path, tiny_llama), out) == 0
    rec = json.loads((out / "run.json").read_text())
    engine = out / "engine"
    assert rec["artifacts"]["engine"] == str(engine)
    assert sorted(p.name for p in engine.glob("rank*.engine")) == ["rank0.engine", "rank1.engine"]
    config = json.loads((engine / "config.json").read_text())
    assert config["build_config"] == {
        "max_batch_size": 8,
        "max_input_len": 256,
        "max_seq_len": 512,
        "max_num_tokens": 1024,
    }
    metrics = rec["stages"][2]["metrics"]
    assert metrics["tensorrt_llm_version"] == "1.2.0" and metrics["world_size"] == 2
    cmd = metrics["command"]
    assert cmd[:5] == [
        str(DOUBLE),
        "--checkpoint_dir",
        str(out / "trtllm_checkpoint"),
        "--output_dir",
        cmd[4],
    ]
    assert ".tmp-02-engine" in cmd[4]  # built into a temporary dir, renamed only when verified
    assert cmd[cmd.index("--workers") + 1] == "2" and cmd[cmd.index("--max_seq_len") + 1] == "512"
    options = (out / "deploy" / "extra_llm_api_options.yaml").read_text()
    assert "dtype: fp8" in options and "max_num_tokens: 1024" in options
    serve = (out / "deploy" / "serve.sh").read_text()
    assert f"\ntrtllm-serve {out / 'hf_checkpoint'} --backend pytorch --tp_size 2" in serve
    assert "Total time of building all engines" in (out / "logs" / "trtllm-build.log").read_text()


def test_deploy_files_follow_the_plan_and_quote_paths(tiny_llama, tmp_path):
    """No unified HF checkpoint exported: serve.sh does not point a server at one (an older
    hf_checkpoint/ on disk would be stale); paths with spaces are quoted."""
    out = tmp_path / "run dir"
    assert run(recipe(tmp_path, tiny_llama, ptq="{format: fp8}", tp=1, hf="false"), out) == 0
    serve = (out / "deploy" / "serve.sh").read_text()
    assert "no unified HF checkpoint was exported" in serve
    assert "\ntrtllm-serve" not in serve  # every serve line is a comment
    assert f"# trtllm-serve '{out / 'engine'}' --backend tensorrt" in serve


@pytest.mark.parametrize(
    "mode,message",
    [
        ("exit", "stage 'build' failed: trtllm-build exited with code 1"),
        ("crash", "stage 'build' failed: trtllm-build was killed by signal SIGABRT"),
        (
            "skip_rank",
            "stage 'build' failed: trtllm-build left no rank1.engine (world_size 2): the build is incomplete",
        ),
    ],
)
def test_failed_builds_leave_no_complete_looking_engine(
    mode, message, tiny_llama, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("FAKE_TRTLLM_BUILD_FAIL", mode)
    out = tmp_path / "run"
    assert run(recipe(tmp_path, tiny_llama), out) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if mode == "exit":
        assert "Engine building failed" in err  # the tail of the build log is quoted
    assert not (out / "engine").exists() and not list(out.glob(".tmp-*"))
    rec = json.loads((out / "run.json").read_text())
    assert (
        rec["status"] == "failed"
        and rec["error"]["stage"] == "build"
        and "engine" not in rec["artifacts"]
    )
    assert [s["status"] for s in rec["stages"]] == ["success", "success", "failed"]


def test_hung_build_times_out(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_TRTLLM_BUILD_FAIL", "hang")
    out = tmp_path / "run"
    assert (
        run(recipe(tmp_path, tiny_llama, BUILD.replace("timeout_s: 60", "timeout_s: 3")), out) == 1
    )
    assert "trtllm-build timed out after 3 s" in capsys.readouterr().err
    assert not (out / "engine").exists()


def run_double(ckpt, out):
    return subprocess.run(
        [sys.executable, str(DOUBLE), "--checkpoint_dir", str(ckpt), "--output_dir", str(out)],
        capture_output=True,
        text=True,
    )


def test_the_double_enforces_the_checkpoint_contract(tiny_llama, tmp_path):
    """Sanity of the double itself: it refuses what trtllm-build refuses."""
    out = tmp_path / "run"
    path = recipe(tmp_path, tiny_llama)
    assert run(path, out) == 0
    ckpt = tmp_path / "ckpt"
    shutil.copytree(out / "trtllm_checkpoint", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization"]["fp8_scales"] = 1
    (ckpt / "config.json").write_text(json.dumps(config))
    proc = run_double(ckpt, tmp_path / "e")
    assert proc.returncode == 1 and "unexpected keyword argument 'fp8_scales'" in proc.stderr
    (ckpt / "rank1.safetensors").unlink()
    config["quantization"].pop("fp8_scales")
    (ckpt / "config.json").write_text(json.dumps(config))
    proc = run_double(ckpt, tmp_path / "e")
    assert proc.returncode == 1 and "rank1.safetensors" in proc.stderr


def test_newer_tensorrt_llm_without_engines_is_refused(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_TRTLLM_VERSION", "1.3.0")
    assert run(recipe(tmp_path, tiny_llama), tmp_path / "run") == 1
    assert (
        "TensorRT-LLM 1.3.0 has no trtllm-build engine path (removed after 1.2)"
        in capsys.readouterr().err
    )


def test_docker_launcher_without_docker_fails_at_once(tiny_llama, tmp_path, monkeypatch, capsys):
    """On a machine without a Docker engine: exit 1, the stage named, no traceback."""
    out = tmp_path / "run"
    build = BUILD.replace("launcher: local", "launcher: docker")
    rc = run(recipe(tmp_path, tiny_llama, build), out)
    err = capsys.readouterr().err
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    ):
        pytest.skip("a Docker engine is running here")
    assert (
        rc == 1
        and "error: stage 'build' failed:" in err
        and "docker" in err.lower()
        and "Traceback" not in err
    )


def test_dry_run_prints_the_exact_docker_command(capsys, tmp_path):
    assert (
        main(
            [
                "run",
                "llama3-fp8",
                "--dry-run",
                "-o",
                str(tmp_path / "r"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    run_dir = tmp_path / "r"
    line = next(x for x in out.splitlines() if "docker run" in x)
    assert line.startswith("# build command: docker run --rm --gpus all --ipc=host")
    assert f"-v {run_dir.resolve()}:{run_dir.resolve()}" in line
    assert "nvcr.io/nvidia/tensorrt-llm/release:1.2.0 trtllm-build --checkpoint_dir" in line
    assert (
        "--max_batch_size 64 --max_input_len 2048 --max_seq_len 4096 --max_num_tokens 8192" in line
    )
    assert "--use_fp8_context_fmha enable" in line


@pytest.mark.parametrize(
    "sparsify,build,flag",
    [
        ("  - sparsify: {method: magnitude}\n", "{}", True),  # the plan is 2:4 sparse
        ("  - sparsify: {method: magnitude}\n", "weight_sparsity: false", False),
        ("", "{}", False),  # a dense model builds dense
    ],
)
def test_weight_sparsity_follows_the_plan(sparsify, build, flag, tiny_llama, tmp_path, capsys):
    b = BUILD if build == "{}" else BUILD[:-1] + ", " + build + "}"
    path = tmp_path / "r.yaml"
    path.write_text(
        f"name: b\nmodel: {{source: {tiny_llama}}}\n"
        f"calibration: {{dataset: {CALIBRATION}, num_samples: 2, seq_len: 32}}\nstages:\n"
        f"{sparsify}  - ptq: {{format: fp8}}\n  - export: {{trtllm_checkpoint: {{tp: 1}}}}\n"
        f"  - build: {b}\n"
    )
    assert main(["run", str(path), "-o", str(tmp_path / "run"), "--dry-run"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "--checkpoint_dir" in x)
    assert ("--weight_sparsity" in line) == flag


@pytest.mark.parametrize(
    "ptq,build,message",
    [
        ("{format: fp8}", "use_fp8_context_fmha: true", "FP8 context FMHA needs an FP8 KV cache"),
        ("{format: int4_awq, kv_cache: fp8}", "{}", "W4A16_AWQ with an FP8 KV cache"),
        ("{format: fp8}", "gpu_compute_capability: 8.0", "FP8 needs SM 8.9+"),
        (
            "{format: int4_awq}",
            "gpu_compute_capability: 10.0",
            "TensorRT-LLM 1.2 rejects W4A16_AWQ on SM 10.0",
        ),
        (
            "{format: int8_sq}",
            "weight_sparsity: true",
            "no earlier stage makes the model 2:4 sparse",
        ),
    ],
)
def test_preflight_refuses_what_tensorrt_llm_rejects(ptq, build, message, tiny_llama, tmp_path):
    b = BUILD if build == "{}" else BUILD[:-1] + ", " + build + "}"
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe(tmp_path, tiny_llama, b, ptq=ptq, tp=1), device="cpu")


def test_build_needs_a_trtllm_checkpoint(tiny_llama, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: b\nmodel: {{source: {tiny_llama}}}\nstages:\n  - build: {BUILD}\n")
    with pytest.raises(RecipeError, match="build needs a TensorRT-LLM checkpoint"):
        load_recipe(path)
    path.write_text(
        f"name: b\nmodel: {{source: {tiny_llama}}}\nstages:\n  - build: {{launcher: local}}\n"
    )
    with pytest.raises(RecipeError, match="max_batch_size: required key is missing"):
        load_recipe(path)


@pytest.mark.trtllm
@pytest.mark.skipif(
    shutil.which("trtllm-build") is None, reason="TensorRT-LLM's trtllm-build is not installed here"
)
def test_real_trtllm_build(tiny_llama, tmp_path):  # pragma: no cover - needs TensorRT-LLM and a GPU
    build = "{launcher: local, max_batch_size: 4, max_input_len: 128, max_seq_len: 256, max_num_tokens: 512}"
    out = tmp_path / "run"
    assert run(recipe(tmp_path, tiny_llama, build, tp=1), out) == 0
    assert (out / "engine" / "rank0.engine").stat().st_size > 0


def test_launchers_are_registry_entries(tmp_path):
    from optimizer.launchers import LAUNCHERS, CommandLauncher, wrap
    from optimizer.registry import UnknownName
    from optimizer.stages.build import DEFAULT_IMAGE, Build
    from optimizer.trtllm import facts

    assert LAUNCHERS.names() == ["command", "docker", "local"]
    assert isinstance(LAUNCHERS["command"], CommandLauncher)
    argv = ["trtllm-build", "--checkpoint_dir", str(tmp_path)]
    kw = {"image": "img:1", "mounts": [tmp_path], "prefix": ["srun", "--gpus=1"]}
    assert wrap("local", argv, **kw) == argv
    assert wrap("command", argv, **kw) == ["srun", "--gpus=1", *argv]
    docker = wrap("docker", argv, **kw)
    assert docker[:2] == ["docker", "run"] and docker[-4:] == ["img:1", *argv]
    assert f"{tmp_path}:{tmp_path}" in docker
    with pytest.raises(UnknownName, match="unknown launcher 'dokcer'; did you mean 'docker'"):
        wrap("dokcer", argv, **kw)
    # The recipe schema's choices are the registry's names; the default image is the table's.
    assert set(Build.model_fields["launcher"].annotation.__args__) == set(LAUNCHERS)
    assert DEFAULT_IMAGE == facts.DEFAULT_IMAGE == Build.model_fields["image"].default
