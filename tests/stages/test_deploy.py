"""deploy stage: serving files for TensorRT-LLM >= 1.3 / vLLM / SGLang from real exports of a
tiny Llama (FP8, INT4 AWQ on CPU) and from a hand-written NVFP4 export; consumer-contract
refusals before any model loads; smoke tests through the serving test double
(tests/doubles/serving-engine), which checks its arguments against the contract and serves
/health and /v1/completions; a run killed mid-deploy resumes."""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from tiny import CALIBRATION, REPO, run_tiny_recipe

from optimizer.cli import main
from optimizer.errors import RecipeError, StageError
from optimizer.recipe import load_recipe
from optimizer.serving import facts

DOUBLE = REPO / "tests" / "doubles" / "serving-engine"
EXPORT = "export: {trtllm_checkpoint: null, hf_checkpoint: true}"


@pytest.fixture(scope="module", autouse=True)
def python3_with_yaml():
    """The double's `#!/usr/bin/env python3` finds this environment's Python (it has PyYAML)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    yield
    patch.undo()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def targets(*runtimes, **versions) -> str:
    items = []
    for r in runtimes:
        version = f", version: '{versions[r]}'" if r in versions else ""
        items.append(f"{{runtime: {r}, executable: {DOUBLE}{version}}}")
    return "[" + ", ".join(items) + "]"


def deploy(*runtimes, smoke=True, port=None, extra="", timeout=60, **versions) -> str:
    port = port or free_port()
    return (
        f"deploy: {{targets: {targets(*runtimes, **versions)}, smoke_test: {str(smoke).lower()}, "
        f"port: {port}, max_seq_len: 512, max_batch_size: 8, max_num_tokens: 1024, "
        f"kv_cache_fraction: 0.8, smoke_timeout_s: {timeout}{extra}}}"
    )


def write_recipe(path: Path, model: Path, stages: list[str]) -> Path:
    path.write_text(
        f"name: d\nmodel: {{source: {model}}}\n"
        f"calibration: {{dataset: {CALIBRATION}, num_samples: 2, seq_len: 32}}\nstages:\n"
        + "".join(f"  - {s}\n" for s in stages)
    )
    return path


def exec_line(serve: Path) -> list[str]:
    line = next(x for x in serve.read_text().splitlines() if x.startswith("exec "))
    return shlex.split(line)[1:]


@pytest.fixture(scope="module")
def fp8(tiny_llama, tmp_path_factory):
    """ptq fp8 + FP8 KV -> unified HF export -> deploy to all three, smoke-tested; a run
    directory with a space in its path (every value in serve.sh must be quoted)."""
    directory = tmp_path_factory.mktemp("fp8") / "with space"
    directory.mkdir()
    stages = ["ptq: {format: fp8, kv_cache: fp8}", EXPORT, deploy("trtllm", "vllm", "sglang")]
    assert run_tiny_recipe(directory, tiny_llama, stages) == 0
    return directory / "run"


def test_fp8_deploy_files_for_every_target(fp8):
    ckpt, out = fp8 / "hf_checkpoint", fp8 / "deploy"
    rec = json.loads((fp8 / "run.json").read_text())
    assert rec["artifacts"]["deploy"] == str(out)
    summary = json.loads((out / "deploy.json").read_text())
    assert (summary["quant_algo"], summary["kv_cache_quant_algo"]) == ("FP8", "FP8")
    assert summary["contract"] == {"checked": "hf_quant_config.json", "ok": True, "problems": []}
    by = {t["runtime"]: t for t in summary["targets"]}
    assert [(r, by[r]["version"]) for r in by] == [
        ("trtllm", "1.3"),
        ("vllm", "0.16"),
        ("sglang", "0.5"),
    ]
    for runtime, t in by.items():
        serve = out / runtime / "serve.sh"
        assert serve.stat().st_mode & stat.S_IXUSR
        assert f"'{ckpt}'" in serve.read_text()  # the space is quoted
        argv = exec_line(serve)
        assert argv[:-1] == t["command"] and argv[-1] == "$@"
        assert subprocess.run(["bash", "-n", str(serve)]).returncode == 0
        smoke = t["smoke_test"]
        assert smoke["status"] == "ok" and smoke["text"] == " Paris."
        assert 0 < smoke["latency_s"] < 30 and smoke["ready_s"] >= 0.5  # the double "loads" 0.5 s
        log = Path(smoke["log"]).read_text()
        assert '"POST /v1/completions HTTP/1.1" 200' in log and "stopping" in log
    trt = by["trtllm"]["command"]
    assert trt[1:4] == [str(ckpt), "--backend", "pytorch"]
    assert trt[trt.index("--extra_llm_api_options") + 1] == str(
        out / "trtllm" / "extra_llm_api_options.yaml"
    )
    options = yaml.safe_load((out / "trtllm" / "extra_llm_api_options.yaml").read_text())
    assert options == {
        "max_batch_size": 8,
        "max_num_tokens": 1024,
        "max_seq_len": 512,
        "kv_cache_config": {
            "enable_block_reuse": True,
            "free_gpu_memory_fraction": 0.8,
            "dtype": "fp8",
        },
        "cuda_graph_config": {"enable_padding": True, "max_batch_size": 8},
    }
    vllm = by["vllm"]["command"]
    assert vllm[1:3] == ["serve", str(ckpt)]
    flags = dict(zip(vllm[3::2], vllm[4::2], strict=False))
    assert flags["--quantization"] == "modelopt" and flags["--kv-cache-dtype"] == "fp8"
    assert flags["--max-model-len"] == "512" and flags["--gpu-memory-utilization"] == "0.8"
    sgl = by["sglang"]["command"]
    assert sgl[1:5] == ["-m", "sglang.launch_server", "--model-path", str(ckpt)]
    assert sgl[sgl.index("--quantization") + 1] == "modelopt"
    assert sgl[sgl.index("--kv-cache-dtype") + 1] == "fp8_e4m3"
    assert sgl[sgl.index("--mem-fraction-static") + 1] == "0.8"
    assert not list(fp8.glob(".tmp-*"))


def test_int4_awq_deploys_to_tensorrt_llm_only(tiny_llama, tmp_path):
    stages = ["ptq: {format: int4_awq, group_size: 64}", EXPORT, deploy("trtllm")]
    assert run_tiny_recipe(tmp_path, tiny_llama, stages) == 0
    out = tmp_path / "run" / "deploy"
    quant = json.loads((tmp_path / "run" / "hf_checkpoint" / "hf_quant_config.json").read_text())
    assert quant["quantization"]["quant_algo"] == "W4A16_AWQ"
    summary = json.loads((out / "deploy.json").read_text())
    assert summary["quant_algo"] == "W4A16_AWQ" and summary["kv_cache_quant_algo"] is None
    assert summary["targets"][0]["smoke_test"]["status"] == "ok"
    options = yaml.safe_load((out / "trtllm" / "extra_llm_api_options.yaml").read_text())
    assert "dtype" not in options["kv_cache_config"]  # no KV quantization: the model's dtype
    assert not (out / "vllm").exists()
    # The same export to vLLM / SGLang is refused before any model loads.
    for runtime, name in (("vllm", "vLLM 0.16"), ("sglang", "SGLang 0.5")):
        path = write_recipe(
            tmp_path / f"{runtime}.yaml", tiny_llama, [*stages[:2], deploy(runtime)]
        )
        with pytest.raises(
            RecipeError, match=f"{name} cannot load a ModelOpt W4A16_AWQ checkpoint"
        ):
            load_recipe(path, device="cpu")


# ---------------------------------------------------------------------- NVFP4 and drafts


class FakeContext(SimpleNamespace):
    """What Deploy.run reads of a StageContext (a test stand-in for the runner's)."""

    def new_output(self, key):
        tmp = self.run_dir / f".tmp-02-{key}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp


def fake_export(run_dir: Path, model: Path, quant_algo: str, kv: str | None, **extra) -> Path:
    """A hand-written stand-in of a ModelOpt unified HF export (config.json of the tiny Llama
    and an hf_quant_config.json), for formats that need a GPU to quantize."""
    ckpt = run_dir / "hf_checkpoint"
    ckpt.mkdir(parents=True)
    shutil.copy(model / "config.json", ckpt / "config.json")
    quant = {"quant_algo": quant_algo, "kv_cache_quant_algo": kv, "exclude_modules": ["lm_head"]}
    (ckpt / "hf_quant_config.json").write_text(
        json.dumps(
            {
                "producer": {"name": "modelopt", "version": "0.47.0"},
                "quantization": {**quant, **extra},
            }
        )
    )
    return ckpt


def plan_and_stage(tmp_path, model, stages, device="gpu", stage_index=-1):
    path = tmp_path / "plan.yaml"
    path.write_text(
        f"name: p\nmodel: {{source: {model}}}\ncalibration: {{dataset: {CALIBRATION}}}\nstages:\n"
        + "".join(f"  - {s}\n" for s in stages)
    )
    recipe = load_recipe(path, device=device)
    i = len(recipe.stages) + stage_index if stage_index < 0 else stage_index
    return recipe.plans[i], recipe.stages[i]


def run_stage(stage, plan, run_dir):
    ctx = FakeContext(run_dir=run_dir, plan=plan, log=__import__("logging").getLogger("t"))
    return stage.run(ctx)


def test_nvfp4_deploy_files_from_the_plan_and_hf_quant_config(tiny_llama, tmp_path):
    plan, stage = plan_and_stage(
        tmp_path,
        tiny_llama,
        ["ptq: {format: nvfp4, kv_cache: fp8}", EXPORT, deploy("trtllm", "vllm", "sglang")],
    )
    assert plan.quantization.formats[0].format == "nvfp4"
    run_dir = tmp_path / "fake-nvfp4-export"
    ckpt = fake_export(run_dir, tiny_llama, "NVFP4", "FP8", group_size=16)
    result = run_stage(stage, plan, run_dir)
    out = result.outputs["deploy"]
    summary = json.loads((out / "deploy.json").read_text())
    by = {t["runtime"]: t for t in summary["targets"]}
    assert all(t["smoke_test"]["status"] == "ok" for t in by.values())  # the double accepted them
    vllm, sgl = by["vllm"]["command"], by["sglang"]["command"]
    assert vllm[vllm.index("--quantization") + 1] == "modelopt_fp4"
    assert sgl[sgl.index("--quantization") + 1] == "modelopt_fp4"
    assert str(ckpt) in vllm
    options = yaml.safe_load((out / "trtllm" / "extra_llm_api_options.yaml").read_text())
    assert options["kv_cache_config"]["dtype"] == "fp8"
    assert result.metrics["quant_algo"] == "NVFP4"


DRAFT_PLUGIN = '''
import json
from optimizer.stages.base import Stage, StageResult


class Eagle3Head(Stage):
    """A stand-in written only for these tests (no speculative stage exists yet): it marks
    the plan as having an EAGLE-3 draft head and writes a draft/ with a config.json."""

    name = "eagle3_head"
    artifact_keys = ("draft",)

    def plan(self, prev, env):
        plan, problems = super().plan(prev, env)
        return plan.but(draft="eagle3"), problems

    def run(self, ctx):
        out = ctx.new_output("draft")
        (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLMEagle3"]}))
        return StageResult(outputs={"draft": out})


class Sparse24(Stage):
    """A stand-in marking the model 2:4 sparse in the plan (for the dense-serving warning)."""

    name = "sparse24"
    transforms_model = True

    def plan(self, prev, env):
        plan, problems = super().plan(prev, env)
        return plan.but(sparsity="2:4"), problems
'''


@pytest.fixture
def test_stages(tmp_path, monkeypatch):
    """Register the stand-in stages (tests/test_registry_and_plan.py's way: a stage module
    the core never names)."""
    from optimizer.registry import Registry
    from optimizer.stages import STAGES, stage_class, stage_modules

    package = tmp_path / "deploy_test_stages"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("eagle3_head", "sparse24"):  # each module's stage is the one of its name
        (package / f"{name}.py").write_text(DRAFT_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry(
        "stage type",
        {n: f"optimizer.stages.{n}" for n in STAGES.names()},
        discover=lambda: stage_modules("deploy_test_stages", package),
        loader=stage_class,
    )
    monkeypatch.setattr("optimizer.recipe.STAGES", registry)


def test_a_draft_head_is_served_with_eagle3_by_every_target(fp8, tiny_llama, tmp_path, test_stages):
    plan, stage = plan_and_stage(
        tmp_path,
        tiny_llama,
        [
            "ptq: {format: fp8, kv_cache: fp8}",
            EXPORT,
            "eagle3_head: {}",
            deploy("trtllm", "vllm", "sglang", extra=", max_draft_len: 4"),
        ],
    )
    assert plan.draft == "eagle3"
    run_dir = tmp_path / "run"
    shutil.copytree(fp8 / "hf_checkpoint", run_dir / "hf_checkpoint")
    (run_dir / "draft").mkdir()
    (run_dir / "draft" / "config.json").write_text("{}")
    out = run_stage(stage, plan, run_dir).outputs["deploy"]
    summary = json.loads((out / "deploy.json").read_text())
    assert summary["draft"] == {"kind": "eagle3", "dir": str(run_dir / "draft")}
    by = {t["runtime"]: t for t in summary["targets"]}
    assert all(t["smoke_test"]["status"] == "ok" for t in by.values())
    options = yaml.safe_load((out / "trtllm" / "extra_llm_api_options.yaml").read_text())
    assert options["speculative_config"] == {
        "decoding_type": "Eagle3",
        "max_draft_len": 4,
        "speculative_model_dir": str(run_dir / "draft"),
    }
    vllm = by["vllm"]["command"]
    spec = json.loads(vllm[vllm.index("--speculative-config") + 1])
    assert spec == {
        "method": "eagle3",
        "model": str(run_dir / "draft"),
        "num_speculative_tokens": 4,
    }
    serve = (out / "vllm" / "serve.sh").read_text()
    assert shlex.quote(json.dumps(spec, separators=(",", ":"))) in serve  # JSON quoted for bash
    sgl = by["sglang"]["command"]
    assert sgl[sgl.index("--speculative-algorithm") + 1] == "EAGLE3"
    assert sgl[sgl.index("--speculative-num-draft-tokens") + 1] == "5"
    # The draft dir missing at run time is a stage failure naming it.
    shutil.rmtree(run_dir / "draft")
    with pytest.raises(StageError, match="eagle3 draft, but .*draft holds no config.json"):
        run_stage(stage, plan, run_dir)


def test_a_draft_on_a_runtime_without_eagle3_is_refused(tiny_llama, tmp_path, test_stages, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(
        f"name: d\nmodel: {{source: {tiny_llama}}}\ncalibration: {{dataset: {CALIBRATION}}}\nstages:\n"
        f"  - ptq: {{format: fp8}}\n  - {EXPORT}\n  - eagle3_head: {{}}\n  - {deploy('vllm', vllm='0.6')}\n"
    )
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        "vLLM 0.6 cannot serve the eagle3 draft (EAGLE-3 speculative decoding is supported from 0.9 on)"
        in err
    )
    assert "Traceback" not in err


def test_sparsity_is_a_warning_not_a_refusal(tiny_llama, tmp_path, test_stages, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(
        f"name: s\nmodel: {{source: {tiny_llama}}}\ncalibration: {{dataset: {CALIBRATION}}}\nstages:\n"
        f"  - sparse24: {{}}\n  - ptq: {{format: fp8}}\n  - {EXPORT}\n  - {deploy('trtllm')}\n"
    )
    assert main(["validate", str(path)]) == 0
    err = capsys.readouterr().err
    assert "the model is 2:4 sparse, but the unified HF checkpoint is served dense" in err


def test_the_sparsify_stage_warns_that_deploy_serves_dense(tiny_llama, tmp_path, capsys):
    """The real stage: validation passes and says the speed-up is not there (a warning)."""
    path = tmp_path / "r.yaml"
    path.write_text(
        f"name: s\nmodel: {{source: {tiny_llama}}}\nstages:\n"
        f"  - sparsify: {{method: magnitude}}\n  - {EXPORT}\n  - {deploy('trtllm')}\n"
    )
    assert main(["validate", str(path)]) == 0
    err = capsys.readouterr().err
    assert "error" not in err.lower()
    assert "the model is 2:4 sparse, but the unified HF checkpoint is served dense" in err


# ---------------------------------------------------------------------- consumer contract


@pytest.mark.parametrize(
    "ptq,target,versions,message",
    [
        (
            "{format: nvfp4, kv_cache: fp8}",
            "vllm",
            {"vllm": "0.6"},
            "vLLM 0.6 cannot load a ModelOpt NVFP4 checkpoint (it does from vLLM 0.9 on",
        ),
        (
            "{format: fp8, kv_cache: nvfp4}",
            "trtllm",
            {"trtllm": "1.2"},
            "TensorRT-LLM 1.2 has no NVFP4 KV cache for ModelOpt checkpoints (it does from 1.3 on",
        ),
        (
            "{format: fp8, kv_cache: nvfp4}",
            "vllm",
            {},
            "vLLM 0.16 has no NVFP4 KV cache for ModelOpt checkpoints (no vLLM version in this "
            "table has one; it has FP8)",
        ),
        (
            "{format: w4a8_awq}",
            "sglang",
            {},
            "SGLang 0.5 cannot load a ModelOpt W4A8_AWQ checkpoint (no SGLang version in this table does",
        ),
        (
            "{format: int8_sq}",
            "trtllm",
            {},
            "TensorRT-LLM 1.3 cannot load a ModelOpt W8A8_SQ_PER_CHANNEL checkpoint",
        ),
    ],
)
def test_formats_a_target_cannot_load_are_refused_before_any_model_loads(
    ptq, target, versions, message, tiny_llama, tmp_path, capsys
):
    path = tmp_path / "r.yaml"
    path.write_text(
        f"name: c\nmodel: {{source: {tiny_llama}}}\ncalibration: {{dataset: {CALIBRATION}}}\nstages:\n"
        f"  - ptq: {ptq}\n  - {EXPORT}\n  - {deploy(target, **versions)}\n"
    )
    assert main(["validate", str(path), "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert [x for x in err.splitlines() if x.startswith("error:")] == [
        next(x for x in err.splitlines() if message in x)
    ]


def test_run_refuses_with_exit_2_and_writes_nothing(tiny_llama, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(
        f"name: c\nmodel: {{source: {tiny_llama}}}\ncalibration: {{dataset: {CALIBRATION}}}\nstages:\n"
        f"  - ptq: {{format: int4_awq}}\n  - {EXPORT}\n  - {deploy('vllm')}\n"
    )
    out = tmp_path / "run"
    t0 = time.monotonic()
    assert main(["run", str(path), "-o", str(out), "-q"]) == 2
    assert time.monotonic() - t0 < 10  # validation only: no model loaded, nothing calibrated
    assert "vLLM 0.16 cannot load a ModelOpt W4A16_AWQ checkpoint" in capsys.readouterr().err
    assert not out.exists()


def test_the_shipped_checkpoint_is_checked_at_run_time(fp8, tiny_llama, tmp_path):
    """The plan said FP8, the export on disk says W4A16_AWQ: refused for vLLM at run time."""
    plan, stage = plan_and_stage(
        tmp_path, tiny_llama, ["ptq: {format: fp8}", EXPORT, deploy("vllm", smoke=False)]
    )
    run_dir = tmp_path / "run"
    fake_export(run_dir, tiny_llama, "W4A16_AWQ", None, group_size=128)
    with pytest.raises(
        StageError,
        match="hf_quant_config.json: quant_algo W4A16_AWQ.*\n  vLLM 0.16 cannot load a ModelOpt W4A16_AWQ",
    ):
        run_stage(stage, plan, run_dir)


# ---------------------------------------------------------------------- smoke test failures


@pytest.mark.parametrize(
    "mode,extra,message",
    [
        ("exit", "", "the server exited with code 1 before it was ready"),
        ("never_ready", ", smoke_timeout_s: 2", "not ready (GET /health) within 2 s"),
    ],
)
def test_a_failed_smoke_test_fails_the_stage_and_stops_the_server(
    mode, extra, message, fp8, tiny_llama, tmp_path, monkeypatch
):
    port = free_port()
    spec = deploy("vllm", port=port).replace(
        ", smoke_timeout_s: 60", extra or ", smoke_timeout_s: 60"
    )
    plan, stage = plan_and_stage(
        tmp_path, tiny_llama, ["ptq: {format: fp8, kv_cache: fp8}", EXPORT, spec]
    )
    run_dir = tmp_path / "run"
    shutil.copytree(fp8 / "hf_checkpoint", run_dir / "hf_checkpoint")
    monkeypatch.setenv("FAKE_SERVE_FAIL", mode)
    with pytest.raises(StageError, match=re.escape(message)) as e:
        run_stage(stage, plan, run_dir)
    if mode == "exit":
        assert "CUDA out of memory" in str(e.value)  # the log's tail is quoted
    log = (run_dir / "logs" / "deploy-vllm.log").read_text()
    pid = int(log.split(" pid ")[1].split()[0])
    with pytest.raises(ProcessLookupError):  # the server was stopped (and reaped)
        os.kill(pid, 0)
    with socket.socket() as s:  # and nothing listens on its port any more
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_the_double_checks_the_quantization_flag(fp8):
    """Sanity of the double itself: a --quantization that does not match the checkpoint is
    refused, as vLLM refuses it."""
    ckpt = fp8 / "hf_checkpoint"
    argv = [str(DOUBLE), "serve", str(ckpt), "--host", "127.0.0.1", "--port", str(free_port()),
            "--tensor-parallel-size", "1", "--max-model-len", "64", "--max-num-seqs", "1",
            "--max-num-batched-tokens", "64", "--gpu-memory-utilization", "0.5",
            "--quantization", "modelopt_fp4", "--kv-cache-dtype", "fp8"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert (
        "--quantization modelopt_fp4 does not match the checkpoint's quant_algo FP8" in proc.stdout
    )


def test_a_smoke_test_without_its_server_fails_before_any_model_loads(tiny_llama, tmp_path, capsys):
    stages = [
        "ptq: {format: fp8}",
        EXPORT,
        "deploy: {targets: [{runtime: vllm, executable: no-such-vllm}], smoke_test: true}",
    ]
    assert run_tiny_recipe(tmp_path, tiny_llama, stages) == 1
    err = capsys.readouterr().err
    assert "stage 'deploy' failed: smoke test: no-such-vllm (vLLM 0.16) is not on PATH" in err
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [s["status"] for s in rec["stages"]] == ["pending", "pending", "failed"]


def test_docker_smoke_test_without_docker_fails_at_once(tiny_llama, tmp_path, capsys):
    """No Docker engine here: exit 1 before any model loads, the stage named, no traceback."""
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    ):
        pytest.skip("a Docker engine is running here")
    stages = [
        "ptq: {format: fp8}",
        EXPORT,
        "deploy: {targets: [trtllm], smoke_test: true, launcher: docker}",
    ]
    assert run_tiny_recipe(tmp_path, tiny_llama, stages) == 1
    err = capsys.readouterr().err
    assert "stage 'deploy' failed:" in err and "docker" in err.lower() and "Traceback" not in err
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [s["status"] for s in rec["stages"]] == ["pending", "pending", "failed"]


def test_the_docker_command_publishes_the_port_and_names_the_container(tiny_llama, tmp_path):
    _, stage = plan_and_stage(
        tmp_path,
        tiny_llama,
        ["ptq: {format: fp8}", EXPORT, "deploy: {targets: [vllm], launcher: docker, port: 8123}"],
    )
    cmd = stage.launch_command(stage.targets[0], ["vllm", "serve", "x"], tmp_path)
    assert cmd[:2] == ["docker", "run"]
    assert cmd[cmd.index("-p") + 1] == "8123:8123" and "--name" in cmd
    assert cmd[cmd.index("--entrypoint") + 1] == "" and cmd[-4:] == [
        "vllm/vllm-openai:v0.16.0",
        "vllm",
        "serve",
        "x",
    ]


# ---------------------------------------------------------------------- kill and resume


def test_a_run_killed_mid_deploy_resumes_and_then_skips_deploy(tiny_llama, tmp_path, monkeypatch):
    stages = ["ptq: {format: fp8, kv_cache: fp8}", EXPORT, deploy("trtllm", timeout=600)]
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_llama, stages)
    run_dir = tmp_path / "run"
    # 1. The server fails: the stage fails, ptq and export stay committed.
    monkeypatch.setenv("FAKE_SERVE_FAIL", "exit")
    assert main(["run", str(recipe), "-o", str(run_dir), "-q"]) == 1
    monkeypatch.delenv("FAKE_SERVE_FAIL")
    rec = json.loads((run_dir / "run.json").read_text())
    assert [s["status"] for s in rec["stages"]] == ["success", "success", "failed"]
    # 2. Resumed, then SIGKILLed while its smoke test waits for the server to be ready.
    env = {**os.environ, "FAKE_SERVE_FAIL": "never_ready"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "optimizer", "run", str(recipe), "-o", str(run_dir), "-q", "--resume"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    log = run_dir / "logs" / "deploy-trtllm.log"
    server_pid = None
    try:
        deadline = time.monotonic() + 120
        while server_pid is None and time.monotonic() < deadline and proc.poll() is None:
            text = log.read_text() if log.is_file() else ""
            if "serving on" in text:
                server_pid = int(text.split(" pid ")[1].split()[0])
            time.sleep(0.2)
        assert server_pid, proc.stderr.read().decode() if proc.poll() is not None else "no server"
        os.killpg(proc.pid, signal.SIGKILL)  # as an OOM kill: no clean-up at all
        proc.wait()
    finally:
        if server_pid:
            os.kill(server_pid, signal.SIGKILL)  # the orphaned server double this test started
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()
    rec = json.loads((run_dir / "run.json").read_text())
    assert [s["status"] for s in rec["stages"]] == ["skipped", "skipped", "running"]
    assert (run_dir / ".tmp-02-deploy").exists() and not (run_dir / "deploy").exists()
    # 3. Resumed again: the half-written deploy is discarded and redone; then it is skipped.
    assert main(["run", str(recipe), "-o", str(run_dir), "-q", "--resume"]) == 0
    rec = json.loads((run_dir / "run.json").read_text())
    assert [s["status"] for s in rec["stages"]] == ["skipped", "skipped", "success"]
    summary = json.loads((run_dir / "deploy" / "deploy.json").read_text())
    assert summary["targets"][0]["smoke_test"]["status"] == "ok" and not list(
        run_dir.glob(".tmp-*")
    )
    assert main(["run", str(recipe), "-o", str(run_dir), "-q", "--resume"]) == 0
    rec = json.loads((run_dir / "run.json").read_text())
    assert [s["status"] for s in rec["stages"]] == ["skipped", "skipped", "skipped"]
    assert rec["artifacts"]["deploy"] == str(run_dir / "deploy")


# ---------------------------------------------------------------------- the facts table


def test_every_release_of_the_table_is_consistent():
    for runtime in facts.RUNTIMES:
        listed = facts.releases(runtime)
        default = facts.release(runtime, facts.DEFAULT_VERSIONS[runtime])
        # the newest release, or one whose newer rows say what they did not re-check
        assert default in listed
        assert all("not re-checked" in r.source for r in listed[listed.index(default) + 1 :])
        for rel in listed:
            assert rel.source and rel.image
            for algo in rel.quant_algos:
                assert algo == algo.upper()
    assert (
        facts.release("vllm", "0.5") is None
        and facts.release("vllm", "0.28.1") == facts.releases("vllm")[-1]
    )
    assert facts.release("trtllm", "1.3.0rc27").since == "1.3"
    # ModelOpt's quant_algo of every simple format the project has is named in the table.
    from optimizer.formats import FORMAT_NAMES

    assert set(FORMAT_NAMES) == set(facts.FORMAT_QUANT_ALGOS)
