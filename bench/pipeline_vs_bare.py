"""The pipeline against the same work done with bare ModelOpt / transformers / lm-eval calls.

For each model, two fresh processes do the same work, one after the other, each timed from
the outside (whole-process wall time, peak host RSS of that child from ``wait4``):

* bare: bench/bare_modelopt.py -- load, calibration windows, ``mtq.quantize(model,
  FP8_DEFAULT_CFG, forward_loop)``, lm-eval on the quantized model, both ModelOpt exports,
  lm-eval on the bf16 model;
* pipeline: the real CLI, ``python -m optimizer run RECIPE -o DIR -q``, on a recipe written
  here: ptq fp8 + export (trtllm_checkpoint + hf_checkpoint) + gate (suite quick with the same
  task and limit). Its per-stage ``seconds`` and ``run.json["startup"]`` are read back; phase
  spans inside it come from bench/probe/sitecustomize.py, which Python itself imports when
  the bench puts bench/probe first on the child's PYTHONPATH (the command line stays the
  CLI's; ``--no-probes`` runs it without them).

Both sides calibrate on the same windows (the bare script uses the project's
``calibration.tokenize``; their sha256 are compared), the same samples, seq_len and batch
size. Phases: imports, model load, calibration windows, calibration forward, PTQ
(``mtq.quantize``, forward included), the pipeline's hand-over save, TensorRT-LLM export,
HF export, gate evaluation; peak GPU memory (``torch.cuda.max_memory_allocated``) per phase
and per process; calibration tokens/s and its fraction of the GPU's dense bf16 peak.

Models: ``builtin`` (SmolLM2-135M-Instruct, the directory ``builtin:smollm2-135m-instruct``
resolves to: both sides load the same files, and the pipeline's baseline is evaluated anew
in a per-run OPTIMIZER_CACHE_DIR), ``llama8b-shape`` (Llama-3-8B dimensions, random bf16
weights saved once to --models-dir, default --work/models; the builtin's tokenizer when it is
available), ``llama13b-shape`` (Llama-2-13B layers with Llama-3's GQA and vocabulary, 12.3B), ``tiny`` (a
random Llama of hidden 64 and 2 layers: --tiny). ``--memory-cap GiB`` also runs the
8B-shaped model through the pipeline with ``model.max_memory.gpu`` below its size (ptq +
export; the gate loads whole models and is left out) and records its peak GPU memory.

  python bench/pipeline_vs_bare.py --device cpu --tiny --memory-cap 1    # CPU smoke, ~2 min
  python bench/pipeline_vs_bare.py --models builtin llama8b-shape --memory-cap 8   # a GPU
  python bench/pipeline_vs_bare.py --models llama8b-shape llama13b-shape --batch-size auto \
      --models-dir /dev/shm/pvb-models    # the 13B shape's source off a 64 GiB disk
  python bench/pipeline_vs_bare.py --report-only                          # md from the json

Results (merged into what --out holds): --out/pipeline_vs_bare-<gpu|cpu-smoke>.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
PROBE = BENCH / "probe"
sys.path.insert(0, str(REPO))

from optimizer import batching, hardware  # noqa: E402  (stdlib only: no torch in this process)
from optimizer.calibration import DEFAULT_BATCH_SIZE  # noqa: E402
from optimizer.resources import CALIBRATION, TASKS  # noqa: E402

GiB = 2**30
CALIB_FILE = CALIBRATION / "python-docs.jsonl"
TASK = "local_arc_easy"
#: Dense bf16 tensor-core peak, FLOP/s (NVIDIA's spec sheets: H100 SXM and H200, no sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12}
LLAMA3_8B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
}
#: Llama-2-13B's layer shapes (40 x 5120, MLP 13824) with Llama-3's GQA (8 KV heads) and
#: vocabulary: 12.3B parameters, 24.6 GB in bf16; the largest shape whose pipeline outputs
#: (hand-over 1x + two FP8 exports 0.5x each) fit the H200 machine's 64 GiB disk with the
#: source model in /dev/shm (--models-dir).
LLAMA_13B = {
    **LLAMA3_8B,
    "hidden_size": 5120,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "intermediate_size": 13824,
}
SHAPES = {"llama8b-shape": LLAMA3_8B, "llama13b-shape": LLAMA_13B}
TINY = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128}
BUILTIN = "builtin:smollm2-135m-instruct"
DESCRIPTIONS = {
    "builtin": "SmolLM2-135M-Instruct (builtin)",
    "llama8b-shape": "Llama-3-8B-shaped model (random bf16 weights)",
    "llama13b-shape": "13B-shaped Llama (Llama-2-13B layers, Llama-3 GQA and vocabulary; "
    "12.3B random bf16 weights)",
    "tiny": "tiny random Llama (hidden 64, 2 layers)",
}

#: (row label, bare phases, pipeline phases); a phase is "name" or "name@role" / "name#stage".
ROWS = [
    ("model load", ["load@model"], ["load#ptq"]),
    ("calibration windows", ["calibration_data"], ["calibration_data"]),
    ("calibration forward", ["calibration_forward"], ["calibration_forward"]),
    ("PTQ (mtq.quantize, forward included)", ["ptq"], ["ptq"]),
    ("hand-over save (+ reload)", [], ["save", "load#export"]),
    ("TensorRT-LLM export", ["trtllm_export"], ["trtllm_export"]),
    ("HF export", ["hf_export"], ["hf_export"]),
    ("gate: loads / rebuild", ["load@baseline"], ["load#gate", "rebuild_export"]),
    ("gate: lm-eval", ["evaluate"], ["evaluate"]),
]


# ----------------------------------------------------------------------------- children


def run_child(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> dict[str, Any]:
    """Run ``cmd`` in its own session; wall seconds, exit code, peak RSS of that child."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        t = time.perf_counter()
        proc = subprocess.Popen(
            cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "cmd": cmd,
        "rc": proc.returncode,
        "timed_out": killed.is_set(),
        "wall_seconds": round(wall, 2),
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux: KiB
        "log": str(log),
    }


def base_env(args) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def python_snippet(code: str, env: dict[str, str], log: Path, argv: tuple[str, ...] = ()) -> str:
    """Run ``code`` (with ``argv``) in a child; its last output line."""
    res = run_child([sys.executable, "-c", code, *argv], env, log, 3600)
    lines = Path(log).read_text().strip().splitlines()
    if res["rc"] != 0:
        raise SystemExit(f"failed ({res['rc']}): see {log}:\n" + "\n".join(lines[-15:]))
    return lines[-1]


# ----------------------------------------------------------------------------- models


def resolve_builtin(args, env) -> Path | None:
    code = (
        "from pathlib import Path; from optimizer import models; "
        f"print(models.resolve_source({BUILTIN!r}, Path('.')).path)"
    )
    try:
        return Path(python_snippet(code, env, args.work / "logs" / "resolve-builtin.log"))
    except SystemExit as e:
        print(f"builtin model unavailable: {str(e).splitlines()[0]}", flush=True)
        return None


def converted_builtin() -> Path | None:
    """The builtin's converted checkpoint if it is in the cache already (no download)."""
    from optimizer import models

    path = models.cache_dir() / "models" / "smollm2-135m-instruct-bf16"
    return path if (path / "tokenizer.json").is_file() else None


MAKE_MODEL = r"""
import json, shutil, sys, time
from pathlib import Path
import torch
kind, target, tokenizer_from, spec = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
tmp = target.with_name(target.name + ".tmp")
shutil.rmtree(tmp, ignore_errors=True)
t = time.time()
if kind == "tiny":
    sys.path.insert(0, "tests")
    from tiny import make_tiny_llama
    make_tiny_llama(tmp, **json.loads(spec))
else:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    if tokenizer_from != "-":
        tok = AutoTokenizer.from_pretrained(tokenizer_from)
    else:
        sys.path.insert(0, "tests")
        from tiny import make_tokenizer
        tok = make_tokenizer()
    config = LlamaConfig(**json.loads(spec), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config.architectures = ["LlamaForCausalLM"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp, max_shard_size="5GB")
    tok.save_pretrained(tmp)
shutil.rmtree(target, ignore_errors=True)
tmp.rename(target)
print(f"made {kind} in {time.time() - t:.0f} s")
"""


def prepare_model(name: str, args, env, builtin: Path | None) -> Path:
    if name == "builtin":
        if builtin is None:
            raise SystemExit("the builtin model is not available (see logs/resolve-builtin.log)")
        return builtin
    target = (args.models_dir or args.work / "models") / name
    if (target / "config.json").is_file():
        return target
    if name != "tiny" and name not in SHAPES:
        raise SystemExit(f"unknown model {name!r}: builtin, tiny or one of {sorted(SHAPES)}")
    spec = TINY if name == "tiny" else SHAPES[name]
    tokenizer_from = str(builtin) if (name != "tiny" and builtin) else "-"
    print(f"making the {name} model in {target} ...", flush=True)
    line = python_snippet(
        MAKE_MODEL,
        env,
        args.work / "logs" / f"make-{name}.log",
        (name, str(target), tokenizer_from, json.dumps(spec)),
    )
    print(line, flush=True)
    return target


def warm_page_cache(path: Path) -> float:
    """Read the model's files once, so that neither side pays the first read from disk."""
    t = time.perf_counter()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 26):
                    pass
    return round(time.perf_counter() - t, 2)


# ----------------------------------------------------------------------------- the two sides


def calibration_settings(args) -> dict[str, int]:
    return {"num_samples": args.num_samples, "seq_len": args.seq_len, "batch_size": args.batch_size}


def bare_side(name, model_dir: Path, args, env, compute: str, gate_limit: int, **extra):
    """``extra``: ``batch_size`` (the pipeline's resolved ``auto``), ``max_memory_gpu``, ``label``."""
    work = args.work / name / "bare"
    shutil.rmtree(work, ignore_errors=True)
    out = work / "phases.json"
    cmd = [
        sys.executable,
        str(BENCH / "bare_modelopt.py"),
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--work",
        str(work),
        "--dtype",
        compute,
        "--calib",
        str(CALIB_FILE),
        "--num-samples",
        str(args.num_samples),
        "--seq-len",
        str(args.seq_len),
        "--batch-size",
        str(extra.get("batch_size") or batching.fixed(args.batch_size, DEFAULT_BATCH_SIZE)),
        "--task",
        TASK,
        "--tasks-dir",
        str(TASKS),
        "--gate-limit",
        str(gate_limit),
    ]
    if extra.get("max_memory_gpu"):
        cmd += ["--max-memory-gpu", extra["max_memory_gpu"]]
    label = extra.get("label", "bare")
    print(f"[{name}] {label} ...", flush=True)
    res = run_child(cmd, env, args.work / "logs" / f"{name}-{label}.log", args.timeout)
    res.update(_read_json(out) or {"errors": {"fatal": "no phases.json (see the log)"}})
    res["artifacts"] = artifacts(work, args.keep_artifacts)
    print(f"[{name}] {label}: rc {res['rc']}, {res['wall_seconds']} s", flush=True)
    return res


def resolved_batch_size(pipe: dict) -> int | None:
    """The calibration batch size the pipeline's ptq used (run.json metrics)."""
    for stage in pipe.get("stages", []):
        if stage["name"] == "ptq":
            return (stage.get("metrics") or {}).get("calibration_batch_size")
    return None


def bare_batch(bare: dict) -> int | None:
    cmd = bare.get("cmd") or []
    return int(cmd[cmd.index("--batch-size") + 1]) if "--batch-size" in cmd else None


def write_recipe(path: Path, model_dir: Path, args, gate_limit: int, max_memory: str | None):
    model = f"  source: {json.dumps(str(model_dir))}\n  dtype: bfloat16\n"
    if max_memory:
        model += f"  max_memory: {{gpu: {max_memory}}}\n"
    gate = f"  - gate: {{suite: quick, limit: {gate_limit}}}\n" if gate_limit else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"name: pipeline-vs-bare\nmodel:\n{model}"
        f"calibration:\n  dataset: {json.dumps(str(CALIB_FILE))}\n"
        f"  num_samples: {args.num_samples}\n  seq_len: {args.seq_len}\n"
        f"  batch_size: {args.batch_size}\n"
        "stages:\n  - ptq: {format: fp8}\n"
        "  - export: {trtllm_checkpoint: {tp: 1, pp: 1}, hf_checkpoint: true}\n" + gate
    )


def pipeline_side(
    name, model_dir: Path, args, env, gate_limit: int, max_memory=None, label="pipeline"
):
    work = args.work / name / label
    shutil.rmtree(work, ignore_errors=True)
    recipe, run_dir, probe_out = work / "recipe.yaml", work / "run", work / "phases.json"
    write_recipe(recipe, model_dir, args, gate_limit, max_memory)
    env = dict(env)
    env["OPTIMIZER_CACHE_DIR"] = str(work / "cache")  # a fresh baseline cache: evaluated anew
    if not args.no_probes:
        env["PYTHONPATH"] = os.pathsep.join([str(PROBE), env["PYTHONPATH"]])
        env["BENCH_PROBE_OUT"] = str(probe_out)
    cmd = [sys.executable, "-m", "optimizer", "run", str(recipe), "-o", str(run_dir), "-q"]
    print(f"[{name}] {label} ...", flush=True)
    res = run_child(cmd, env, args.work / "logs" / f"{name}-{label}.log", args.timeout)
    res["recipe"] = recipe.read_text()
    res.update(_read_json(probe_out) or {})
    record = _read_json(run_dir / "run.json") or {}
    res["run_json"] = {
        k: record.get(k) for k in ("status", "startup", "versions", "device", "error")
    }
    res["stages"] = [
        {
            **{k: s.get(k) for k in ("name", "status", "seconds", "metrics")},
            "outputs": {k: (v or {}).get("sha256") for k, v in (s.get("outputs") or {}).items()},
        }
        for s in record.get("stages", [])
    ]
    log = run_dir / "logs" / "run.log"
    if log.is_file():
        res["placement"] = [
            line.split("placement under model.max_memory: ", 1)[1]
            for line in log.read_text(errors="replace").splitlines()
            if "placement under model.max_memory: " in line
        ]
    if name.removesuffix("-cap") in ("llama8b-shape", "tiny"):
        # what the capped run's outputs are compared with, tensor by tensor
        res["digests"] = {
            key: tensor_digests(run_dir / key)
            for key in ("stages/00-ptq/model", "trtllm_checkpoint", "hf_checkpoint")
            if (run_dir / key).is_dir()
        }
    res["artifacts"] = artifacts(run_dir, args.keep_artifacts)
    print(
        f"[{name}] {label}: rc {res['rc']} ({res['run_json'].get('status')}), "
        f"{res['wall_seconds']} s",
        flush=True,
    )
    return res


def tensor_digests(directory: Path) -> dict[str, Any]:
    """sha256 of every tensor's bytes (with its dtype and shape) in ``directory``'s
    safetensors files, whatever the sharding, and its config.json parsed: what tells two
    exports apart. stdlib only: read from the header's byte ranges."""
    import hashlib
    import struct

    digests: dict[str, str] = {}
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
            base = 8 + size
            for name, meta in sorted(header.items(), key=lambda kv: kv[1].get("data_offsets", [0])):
                if name == "__metadata__":
                    continue
                begin, end = meta["data_offsets"]
                fh.seek(base + begin)
                h = hashlib.sha256(f"{meta['dtype']}{meta['shape']}".encode())
                left = end - begin
                while left:
                    chunk = fh.read(min(left, 1 << 26))
                    h.update(chunk)
                    left -= len(chunk)
                digests[name] = h.hexdigest()
    return {"tensors": digests, "config": _read_json(directory / "config.json")}


def artifacts(work: Path, keep: bool) -> dict[str, int]:
    """Bytes of each model-sized output under ``work``; their weight files are then deleted
    unless ``keep`` (an 8B run writes ~33 GB; the device has 64 GiB of disk)."""
    sizes: dict[str, int] = {}
    for d in sorted(p for p in work.rglob("*") if p.is_dir()):
        weights = [f for f in d.iterdir() if f.is_file() and f.suffix in (".safetensors", ".pth")]
        if weights:
            sizes[str(d.relative_to(work))] = sum(
                f.stat().st_size for f in d.iterdir() if f.is_file()
            )
            if not keep:
                for f in weights:
                    f.unlink()
    return sizes


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- numbers


def _match(rec: dict, key: str) -> bool:
    if "@" in key:
        name, role = key.split("@")
        return rec["phase"] == name and rec.get("role") == role
    if "#" in key:
        name, stage = key.split("#")
        return rec["phase"] == name and rec.get("stage") == stage
    return rec["phase"] == key


def phase_total(side: dict, keys: list[str]) -> tuple[float | None, int | None]:
    """Seconds (summed) and peak GPU bytes (max over the spans and devices) of the phases."""
    recs = [r for r in side.get("phases", []) if any(_match(r, k) for k in keys)]
    if not recs:
        return None, None
    peaks = [max(r.get("gpu_peak_allocated", {}).values(), default=0) for r in recs]
    return round(sum(r["seconds"] for r in recs), 3), max(peaks) or None


def windows_digest(side: dict) -> str | None:
    return next(
        (r.get("sha256") for r in side.get("phases", []) if r["phase"] == "calibration_data"),
        None,
    )


def process_peak(side: dict) -> int | None:
    peaks = side.get("gpu_peak_allocated") or {}
    return max(peaks.values()) if peaks else None


def calibration_rate(side: dict, params: dict, seq_len: int, peak: float | None) -> dict:
    rec = next((r for r in side.get("phases", []) if r["phase"] == "calibration_forward"), None)
    if rec is None or not params:
        return {}
    tokens, seconds = rec["tokens"], rec["seconds"]
    matmul = params["total"] - (0 if params["tied"] else params["embedding"])
    flops = 2 * matmul * tokens
    if rec.get("logits") != "all":  # the pipeline's loop: lm_head on the last position only
        flops -= 2 * params["lm_head"] * (tokens - tokens // seq_len)
    out = {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": round(tokens / seconds, 1),
        "flops": flops,
        "logits": "all positions" if rec.get("logits") == "all" else "last position",
    }
    if peak:
        out["fraction_of_peak"] = round(flops / seconds / peak, 6)
    return out


def compare(result: dict) -> list[dict]:
    bare, pipe = result["bare"], result["pipeline"]
    rows = []
    imports_pipe = (pipe.get("run_json", {}).get("startup") or {}).get("seconds")
    rows.append(_row("imports (startup)", phase_total(bare, ["imports"]), (imports_pipe, None)))
    for label, bare_keys, pipe_keys in ROWS:
        b = phase_total(bare, bare_keys) if bare_keys else (None, None)
        p = phase_total(pipe, pipe_keys)
        rows.append(_row(label, b, p))
    gate_stage = next((s for s in pipe.get("stages", []) if s["name"] == "gate"), None)
    b_gate = [phase_total(bare, k) for k in (["load@baseline"], ["evaluate"])]
    b_gate_s = sum(x[0] or 0 for x in b_gate) if any(x[0] for x in b_gate) else None
    rows.append(
        _row(
            "gate evaluation, total",
            (b_gate_s, None),
            (gate_stage["seconds"] if gate_stage else None, None),
        )
    )

    def listed(data: dict, skip_gate: bool) -> float:
        return sum(
            r["seconds"]
            for r in data.get("phases", [])
            if r["phase"] in TOP_LEVEL and not (skip_gate and r.get("stage") == "gate")
        )

    gate_s = gate_stage["seconds"] if gate_stage else 0
    # the pipeline: wall - startup - its phases outside the gate - the gate stage
    rest_pipe = pipe["wall_seconds"] - (imports_pipe or 0) - listed(pipe, True) - gate_s
    rest_bare = bare["wall_seconds"] - listed(bare, False)
    rows.append(
        _row(
            "everything else (wall - the phases above)",
            (round(rest_bare, 2), None),
            (round(rest_pipe, 2), None),
        )
    )
    rows.append(
        _row(
            "whole process (wall)",
            (bare["wall_seconds"], process_peak(bare)),
            (pipe["wall_seconds"], process_peak(pipe)),
        )
    )
    # issue 17's target: PTQ + export, whole process with the gate's evaluation taken out
    rows.append(
        _row(
            PTQ_EXPORT_ROW,
            (round(bare["wall_seconds"] - (b_gate_s or 0), 2), None),
            (round(pipe["wall_seconds"] - gate_s, 2), None),
        )
    )
    return rows


PTQ_EXPORT_ROW = "PTQ + both exports, whole process (wall - gate evaluation)"


#: Phases that do not nest in another (calibration_forward is inside ptq).
TOP_LEVEL = {
    "imports",
    "load",
    "calibration_data",
    "ptq",
    "save",
    "trtllm_export",
    "hf_export",
    "rebuild_export",
    "evaluate",
}


def _row(label, b, p) -> dict:
    ratio = round(p[0] / b[0], 2) if b[0] and p[0] is not None else None
    return {
        "phase": label,
        "bare_seconds": b[0],
        "pipeline_seconds": p[0],
        "ratio": ratio,
        "bare_gpu_peak": b[1],
        "pipeline_gpu_peak": p[1],
    }


# ----------------------------------------------------------------------------- machine


def machine(args) -> dict[str, Any]:
    info: dict[str, Any] = {"host_cpus": os.cpu_count()}
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode == 0 and out.stdout.strip() and args.device != "cpu":
            info["gpus"] = [line.strip() for line in out.stdout.strip().splitlines()]
            info["driver"] = info["gpus"][0].split(",")[1].strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    if "driver" not in info and args.device != "cpu":
        try:  # nvidia-ml-py: no CUDA context in this process
            import pynvml

            pynvml.nvmlInit()
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:
            pass
    versions = {}
    for dist in ("torch", "transformers", "nvidia-modelopt", "lm-eval", "accelerate", "optimizer"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    info["versions"] = versions
    return info


def peak_flops(result: dict, args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    for gpu in result["bare"].get("gpus") or []:
        for key, value in PEAK_BF16.items():
            if key in gpu:
                return value
    return None


# ----------------------------------------------------------------------------- report


def fmt_s(x) -> str:
    return "—" if x is None else (f"{x:.2f}" if x < 10 else f"{x:.1f}")


def fmt_bytes(x: int) -> str:
    return f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.1f} MB"


def fmt_gib(x) -> str:
    return "—" if not x else f"{x / GiB:.2f}"


def render(results: dict) -> str:
    lines = [
        f"# The pipeline against bare ModelOpt / transformers / lm-eval ({results['tag']})",
        "",
    ]
    m = results.get("machine", {})
    lines += [
        f"Machine: {', '.join(m.get('gpus') or ['no GPU'])}; driver {m.get('driver', '—')}; "
        f"CUDA (torch) {results.get('torch_cuda', '—')}; {m.get('host_cpus')} CPU threads.  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items()) + ".  ",
        f"Command: `{results.get('command', '')}`  ",
        f"Measured: {results.get('date', '')}.",
        "",
    ]
    for name, r in (results.get("models") or {}).items():
        s = r["settings"]
        lines += [
            f"## {name}: {r.get('description', '')}",
            "",
            f"Calibration {s['num_samples']} x {s['seq_len']} tokens, batch {s['batch_size']}"
            + (
                " (used: bare {bare}, pipeline {pipeline})".format(**s["batch_size_used"])
                if s.get("batch_size_used")
                else ""
            )
            + " "
            f"(windows identical: {r.get('windows_identical')}); gate: {TASK}, "
            f"{s['gate_limit'] or 'no'} documents, baseline and quantized model; compute dtype "
            f"{s['compute_dtype']}. Each side a fresh process"
            + (
                ", after a warm-up process (ModelOpt's CUDA extensions built)"
                if results.get("warmup")
                else ""
            )
            + f"; model files read once beforehand ({r.get('page_cache_seconds')} s).",
            "",
            "| phase | bare s | pipeline s | pipeline / bare | bare peak GPU GiB | pipeline peak GPU GiB |",
            "|---|---|---|---|---|---|",
        ]
        for row in r["comparison"]:
            ratio = "—" if row["ratio"] is None else f"{row['ratio']:.2f}x"
            lines.append(
                f"| {row['phase']} | {fmt_s(row['bare_seconds'])} | {fmt_s(row['pipeline_seconds'])} "
                f"| {ratio} | {fmt_gib(row['bare_gpu_peak'])} | {fmt_gib(row['pipeline_gpu_peak'])} |"
            )
        b, p = r["bare"], r["pipeline"]
        lines += [
            "",
            f"Peak host RSS: bare {fmt_gib(b.get('peak_rss_bytes'))} GiB, pipeline "
            f"{fmt_gib(p.get('peak_rss_bytes'))} GiB. Exit codes: bare {b['rc']}, pipeline "
            f"{p['rc']} (run.json status {p.get('run_json', {}).get('status')}).",
        ]
        for side_name, rate in (("bare", r.get("bare_rate")), ("pipeline", r.get("pipeline_rate"))):
            if rate:
                frac = rate.get("fraction_of_peak")
                lines.append(
                    f"Calibration, {side_name}: {rate['tokens']} tokens in {rate['seconds']:.3f} s = "
                    f"{rate['tokens_per_second']:,.0f} tokens/s, {rate['flops'] / 1e12:.2f} TFLOP "
                    f"executed (2 x matmul params x tokens, logits at {rate['logits']})"
                    + (f", {100 * frac:.3g} % of the dense bf16 peak" if frac is not None else "")
                    + "."
                )
        sizes = {
            side: ", ".join(f"{k} {fmt_bytes(v)}" for k, v in (data.get("artifacts") or {}).items())
            for side, data in (("bare", b), ("pipeline", p))
        }
        lines.append(f"Outputs: bare {sizes['bare'] or '—'}; pipeline {sizes['pipeline'] or '—'}.")
        stages = ", ".join(f"{s['name']} {fmt_s(s['seconds'])} s" for s in p.get("stages", []))
        startup = (p.get("run_json", {}).get("startup") or {}).get("seconds")
        lines += [f"Pipeline run.json: startup {fmt_s(startup)} s; stages: {stages}."]
        errors = {**(b.get("errors") or {})}
        if errors:
            lines.append(f"Bare errors: {errors}.")
        lines.append("")
    cap = results.get("memory_cap")
    if cap:
        lines += [f"## Memory cap: {cap['model']} with model.max_memory.gpu = {cap['cap']}", ""]
        for side in cap["runs"]:
            peak = side.get("peak")
            below = "—" if not peak else ("below" if peak < cap["cap_bytes"] else "ABOVE")
            lines.append(
                f"- {side['label']}: rc {side['rc']}, wall {fmt_s(side['wall_seconds'])} s, peak GPU "
                f"{fmt_gib(peak)} GiB allocated ({below} the cap; reserved "
                f"{fmt_gib(side.get('reserved'))} GiB), peak host RSS "
                f"{fmt_gib(side.get('peak_rss_bytes'))} GiB; "
                + (f"stages: {side['stages']}; " if side.get("stages") else "")
                + (f"placement: {side['placement']}; " if side.get("placement") else "")
                + (f"errors: {side['errors']}" if side.get("errors") else "")
            )
        same = cap.get("same_as_uncapped")
        lines.append(
            "- outputs against the uncapped pipeline run of the same model, tensor by tensor "
            "and config.json: "
            + (
                ", ".join(
                    f"{k} {'identical' if v else ('DIFFERENT' if v is False else '—')}"
                    for k, v in same.items()
                )
                if same
                else "not compared (no uncapped run of this model on the same calibration windows)"
            )
        )
        lines.append("")
    if results.get("readme"):
        lines += ["## README paragraph", "", results["readme"], ""]
    lines += ["## What differs between the two sides", "", NOTES, ""]
    return "\n".join(lines)


NOTES = """\
- Same: model files, dtype, calibration windows (sha256 compared), samples / seq_len /
  batch size (with `--batch-size auto` the pipeline measures its own, `calibration.batch_size:
  auto`, and the bare script then calibrates in the batches it chose), FP8 config (`mtq.FP8_DEFAULT_CFG`; the pipeline's `format: fp8` builds the
  same), export calls and tp = pp = 1, lm-eval task, limit, max_length 2048; lm-eval batch size
  16 in the bare script, the suite's `auto` in the pipeline (a measured first row on a GPU).
- The pipeline does more: it validates the recipe, hashes inputs, saves the quantized model
  with its ModelOpt state after ptq (the resume hand-over), checks both exports, repairs the
  TensorRT-LLM rope settings, and its gate evaluates the model *rebuilt from the HF export's
  files* (what a server loads) where the bare script evaluates the live fake-quant model;
  it hashes every committed output for run.json, and (since 2026-12-03, after the first H200
  run) reloads the hand-over before the HF export when a TensorRT-LLM export ran first
  (ModelOpt's TensorRT-LLM export fuses q/k/v and gate/up in place, which the bare script's
  HF export then writes); it writes reports and run.json.
- The pipeline does some things faster: lm-eval through its prefix-sharing HFLM (each
  question's context scored once for all choices), and calibration with the logits of the
  last position only when the output layer is not quantized (the same scales; `logits` in
  the calibration line says which).
- Peak GPU memory is `torch.cuda.max_memory_allocated` (tensors; the CUDA context and the
  allocator's cache come on top, see the reserved figure under the memory cap)."""


def readme_paragraph(results: dict) -> str:
    parts = []
    for name, r in (results.get("models") or {}).items():
        rows = {row["phase"]: row for row in r["comparison"]}
        whole = rows.get("whole process (wall)", {})
        ptq = rows.get("PTQ (mtq.quantize, forward included)", {})
        target = rows.get(PTQ_EXPORT_ROW, {})
        rate = r.get("pipeline_rate") or {}
        frac = rate.get("fraction_of_peak")
        parts.append(
            f"{r.get('description', name)}: the whole pipeline process (ptq fp8, both exports, "
            f"gate on {r['settings']['gate_limit']} ARC-Easy documents) took "
            f"{fmt_s(whole.get('pipeline_seconds'))} s against {fmt_s(whole.get('bare_seconds'))} s "
            f"for the bare script ({whole.get('ratio')}x)"
            + (
                f", PTQ + both exports without the gate {fmt_s(target['pipeline_seconds'])} s vs "
                f"{fmt_s(target['bare_seconds'])} s ({target['ratio']}x)"
                if target.get("ratio")
                else ""
            )
            + f"; PTQ {fmt_s(ptq.get('pipeline_seconds'))} s "
            f"vs {fmt_s(ptq.get('bare_seconds'))} s; calibration "
            f"{rate.get('tokens_per_second', 0):,.0f} tokens/s"
            + (f" ({100 * frac:.3g} % of the bf16 dense peak)" if frac is not None else "")
            + f"; peak GPU memory {fmt_gib(whole.get('pipeline_gpu_peak'))} GiB vs "
            f"{fmt_gib(whole.get('bare_gpu_peak'))} GiB."
        )
    cap = results.get("memory_cap")
    if cap:
        run = next((x for x in cap["runs"] if x["label"] == "pipeline"), None)
        if run:
            parts.append(
                f"With `model.max_memory: {{gpu: {cap['cap']}}}` the {cap['description']} "
                f"({fmt_gib(cap.get('weights_bytes'))} GiB of bf16 weights) ran ptq and both "
                f"exports in {fmt_s(run['wall_seconds'])} s (whole process) with a peak of "
                f"{fmt_gib(run.get('peak'))} GiB allocated on the GPU."
            )
    gpus = (results.get("machine") or {}).get("gpus") or ["a CPU"]
    machine_name = ", ".join(g.split(",")[0] for g in gpus)
    return f"Measured on {machine_name} (`bench/pipeline_vs_bare.py`): " + " ".join(parts)


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", nargs="*", default=["builtin", "llama8b-shape"])
    ap.add_argument("--tiny", action="store_true", help="the tiny random Llama, small settings")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    ap.add_argument("--work", type=Path, default=Path("/tmp/pipeline_vs_bare"))
    ap.add_argument("--num-samples", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument(
        "--batch-size",
        type=lambda v: v if v == "auto" else int(v),
        help="calibration windows per forward, or auto (the pipeline measures; the bare "
        "script then uses the pipeline's choice)",
    )
    ap.add_argument(
        "--models-dir",
        type=Path,
        help="where the random models are made (default WORK/models; /dev/shm keeps the 13B "
        "shape off a small disk)",
    )
    ap.add_argument("--gate-limit", type=int, help="documents (default 400; tiny 10)")
    ap.add_argument(
        "--gate-limit-8b", type=int, default=25, help="the 8B and 13B shapes'; 0: no gate"
    )
    ap.add_argument("--memory-cap", type=float, help="GiB: also the capped 8B pipeline run")
    ap.add_argument("--memory-cap-bare", action="store_true", help="and bare ModelOpt capped")
    ap.add_argument("--no-probes", action="store_true", help="the CLI without phase spans")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--keep-artifacts", action="store_true", help="keep the weight files")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak (default: by GPU name)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per child process")
    ap.add_argument("--report-only", action="store_true", help="rewrite the md from the json")
    args = ap.parse_args()

    cuda = {"cpu": False, "cuda": True}.get(args.device)
    if cuda is None:
        cuda = hardware.gpu_present()
    if args.device == "auto":
        args.device = "cuda" if cuda else "cpu"
    tag = "gpu" if cuda else "cpu"
    if args.tiny:
        args.models = ["tiny"]
        tag += "-smoke"
        defaults = {"num_samples": 8, "seq_len": 64, "batch_size": 4, "gate_limit": 10}
    else:
        defaults = {"num_samples": 128, "seq_len": 512, "batch_size": 8, "gate_limit": 400}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    stem = args.out / f"pipeline_vs_bare-{tag}"
    results = _read_json(stem.with_suffix(".json")) or {"models": {}}
    if args.report_only:
        if "tag" not in results:
            raise SystemExit(f"no results to report: {stem.with_suffix('.json')} is missing")
        stem.with_suffix(".md").write_text(render(results))
        print(stem.with_suffix(".md"))
        return 0

    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    env = base_env(args)
    compute = hardware.compute_dtype("bfloat16", "auto", cuda=cuda)
    results.update(
        tag=tag,
        machine=machine(args),
        command=" ".join(["python", _relative(sys.argv[0]), *sys.argv[1:]]),
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )

    def save() -> None:
        results["readme"] = readme_paragraph(results)
        stem.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
        stem.with_suffix(".md").write_text(render(results))

    # the builtin is resolved (converted once; its GGUF file must be there) only when it is
    # benchmarked; the 8B shape borrows its tokenizer when a converted copy exists
    builtin = resolve_builtin(args, env) if "builtin" in args.models else converted_builtin()

    if cuda and not args.no_warmup:
        # ModelOpt JIT-builds its CUDA extensions on first use (~45 s each): once, here, not
        # inside whichever side would run first.
        tiny = prepare_model("tiny", args, env, None)
        warm = bare_side("warmup", tiny, args, env, compute, 0, label="warmup")
        results["warmup"] = {"wall_seconds": warm["wall_seconds"], "rc": warm["rc"]}

    for name in args.models:
        try:
            model_dir = prepare_model(name, args, env, builtin)
        except SystemExit as e:  # the others still run
            print(f"[{name}] skipped: {e}", flush=True)
            results.setdefault("skipped", {})[name] = str(e)[:500]
            continue
        limit = args.gate_limit_8b if name in SHAPES else args.gate_limit
        page = warm_page_cache(model_dir)
        if args.batch_size == "auto":
            # the pipeline first: the bare script calibrates in the batches it chose
            pipe = pipeline_side(name, model_dir, args, env, limit)
            chosen = resolved_batch_size(pipe)
            warm_page_cache(model_dir)
            bare = bare_side(name, model_dir, args, env, compute, limit, batch_size=chosen)
        else:
            bare = bare_side(name, model_dir, args, env, compute, limit)
            pipe = pipeline_side(name, model_dir, args, env, limit)
        result = {
            "description": DESCRIPTIONS.get(name, name),
            "source": str(model_dir),
            "settings": {
                **calibration_settings(args),
                "batch_size_used": {
                    "bare": bare.get("batch_size") or bare_batch(bare),
                    "pipeline": resolved_batch_size(pipe),
                },
                "gate_limit": limit,
                "compute_dtype": compute,
            },
            "page_cache_seconds": page,
            "bare": bare,
            "pipeline": pipe,
        }
        digests = {
            side: next(
                (
                    r.get("sha256")
                    for r in result[side].get("phases", [])
                    if r["phase"] == "calibration_data"
                ),
                None,
            )
            for side in ("bare", "pipeline")
        }
        result["windows_identical"] = (
            digests["bare"] == digests["pipeline"] if all(digests.values()) else None
        )
        peak = peak_flops(result, args) if cuda else None
        params = bare.get("params") or {}
        result["bare_rate"] = calibration_rate(bare, params, args.seq_len, peak)
        result["pipeline_rate"] = calibration_rate(pipe, params, args.seq_len, peak)
        result["comparison"] = compare(result)
        results["models"][name] = result
        results["torch_cuda"] = bare.get("torch_cuda")
        save()

    if args.memory_cap:
        name = "tiny" if args.tiny else "llama8b-shape"
        model_dir = prepare_model(name, args, env, builtin)
        cap = f"{args.memory_cap:g}GiB"
        warm_page_cache(model_dir)
        runs = []
        pipe = pipeline_side(f"{name}-cap", model_dir, args, env, 0, max_memory=cap)
        runs.append(_cap_run("pipeline", pipe))
        reference = (results["models"].get(name) or {}).get("pipeline", {})
        uncapped = reference.get("digests")
        same = None
        if windows_digest(reference) != windows_digest(pipe):
            uncapped = None  # another session's model or tokenizer: not comparable
        if uncapped and "digests" in pipe:
            same = {
                key: uncapped.get(key) == digest if key in uncapped else None
                for key, digest in pipe["digests"].items()
            }
        if args.memory_cap_bare:
            bare = bare_side(
                f"{name}-cap", model_dir, args, env, compute, 0, max_memory_gpu=cap, label="bare"
            )
            runs.append(_cap_run("bare (accelerate max_memory as given)", bare))
        results["memory_cap"] = {
            "model": name,
            "description": DESCRIPTIONS.get(name, name),
            "weights_bytes": sum(f.stat().st_size for f in model_dir.glob("*.safetensors")),
            "cap": cap,
            "cap_bytes": int(args.memory_cap * GiB),
            "runs": runs,
            # per output: every tensor and config.json the same as the uncapped run's
            "same_as_uncapped": same,
        }
        save()
    save()
    print(stem.with_suffix(".md"))
    print(stem.with_suffix(".md").read_text())
    return 0


def _relative(path: str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else path


def _cap_run(label: str, side: dict) -> dict:
    return {
        "label": label,
        "rc": side["rc"],
        "wall_seconds": side["wall_seconds"],
        "peak": process_peak(side),
        "reserved": max((side.get("gpu_peak_reserved") or {}).values(), default=None),
        "peak_rss_bytes": side.get("peak_rss_bytes"),
        "stages": ", ".join(f"{s['name']} {fmt_s(s['seconds'])} s" for s in side.get("stages", [])),
        "placement": side.get("placement"),
        "phases": [
            {k: r.get(k) for k in ("phase", "stage", "role", "seconds", "gpu_peak_allocated")}
            for r in side.get("phases", [])
        ],
        "errors": side.get("errors") or side.get("run_json", {}).get("error"),
    }


if __name__ == "__main__":
    sys.exit(main())
