"""2:4 sparsity and structured pruning of the builtin SmolLM2-135M-Instruct, each with its
recovery (distillation) and then FP8 / INT4 AWQ, gated on the `general` suite.

Structural variants (`--variants`):
  sparse24  sparsify: SparseGPT 2:4, every linear but lm_head
  width     prune: params_fraction 0.75 over MLP and hidden channels (Minitron's width-first;
            size_multiple 16: picks hidden 576 -> 432, MLP kept)
  depth     prune: 20 of 30 decoder layers (~74 % of parameters)
  both      prune: params_fraction 0.75 over MLP, hidden and depth (size_multiple 64: hidden
            cannot shrink with 9 heads, so it picks MLP 1536 -> 1088 and 26 layers)
Every variant runs as a chain of real `optimize run --resume` calls in one run directory, so
the compression (and the distillation) is computed once and reused by the later steps:
  raw       compress -> gate
  distill   compress -> distill -> gate
  fp8       compress -> distill -> ptq fp8 -> export (unified HF) -> gate (rebuilt export)
  int4_awq  compress -> distill -> ptq int4_awq -> export -> gate
Each step's gate.json metrics, stage times, training metrics, parameter count and checkpoint
size are written to --out/<variant>-<step>.json; --table merges them into Markdown.

Forward latency (PyTorch, bf16, batch 1 and 32 x --latency-seq tokens, CUDA events, median of
--latency-rounds interleaved rounds of --latency-iters) is measured for the baseline and each
distilled bf16 model. 2:4 models are also timed with PyTorch's semi-structured sparse kernels (``to_sparse_semi_structured`` on
every 2:4 linear): that is the speed 2:4 can give in PyTorch; TensorRT-LLM >= 1.3, vLLM and
SGLang serve the unified checkpoint dense. Quantized models are not timed: in PyTorch they run
as fake quantization, which says nothing of a serving engine's speed.

  python bench/compress.py --variants sparse24 width depth both --out DIR      # GPU
  # one GPU, the four chains side by side (a 135M model leaves the H200 mostly idle):
  for v in sparse24 width depth both; do
    python bench/compress.py --variants $v --no-latency --out DIR --work W & done; wait
  python bench/compress.py --variants sparse24 width depth both --out DIR --work W  # latency
A step whose cell is in --work already is not re-run (--redo re-runs it), so an interrupted
call continues where it stopped.
  python bench/compress.py --table DIR [DIR ...] > bench/results/compress-gpu.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SUITES = REPO / "optimizer" / "resources" / "suites"
MODEL = {"source": "builtin:smollm2-135m-instruct", "dtype": "bfloat16"}
CALIBRATION = {"dataset": "python-docs", "num_samples": 128, "seq_len": 512, "batch_size": 8}
COMPRESS = {
    "sparse24": {"sparsify": {"method": "sparsegpt", "pattern": "2:4"}},
    # size_multiple 16: hidden must stay a multiple of the 9 heads (transformers' Llama
    # config); no multiple of 64 below 576 is one. Picks hidden 432, MLP 1536 (75.0 %).
    "width": {
        "prune": {
            "params_fraction": 0.75,
            "search": ["ffn_hidden_size", "hidden_size"],
            "size_multiple": 16,
        }
    },
    "depth": {"prune": {"num_layers": 20}},
    "both": {
        "prune": {
            "params_fraction": 0.75,
            "search": ["ffn_hidden_size", "hidden_size", "num_layers"],
        }
    },
}
DISTILL = {
    "teacher": "original",
    "data": {"dataset": "chitchat-en"},
    "steps": 300,
    "learning_rate": 1.0e-4,
    "lr_scheduler": "cosine",
    "warmup_ratio": 0.1,
    "batch_size": 16,
    "seq_len": 512,
}
STEPS = ("raw", "distill", "fp8", "int4_awq")
PTQ = {"fp8": {"format": "fp8"}, "int4_awq": {"format": "int4_awq", "group_size": 64}}
#: width's hidden 432 is no multiple of 64 (or 32): its INT4 groups are 16 channels wide.
GROUP_SIZE = {"width": 16}


def recipe_for(variant: str, step: str, args: argparse.Namespace, suite: Path) -> dict:
    distill = {**DISTILL, **{k: v for k, v in vars(args).items() if k in DISTILL and v}}
    stages: list[dict] = [COMPRESS[variant]]
    if step != "raw":
        stages.append({"distill": distill})
    if step in PTQ:
        stages += [
            {
                "ptq": PTQ[step]
                | (
                    {"group_size": GROUP_SIZE[variant]}
                    if variant in GROUP_SIZE and "group_size" in PTQ[step]
                    else {}
                )
            },
            {"export": {"trtllm_checkpoint": None, "hf_checkpoint": True}},
        ]
    stages.append({"gate": {"suite": str(suite)}})
    # One name for the whole chain: --resume continues the same run.
    return {
        "name": f"bench-{variant}",
        "model": MODEL,
        "calibration": {
            **CALIBRATION,
            **({"num_samples": args.calib_samples} if args.calib_samples else {}),
        },
        "stages": stages,
    }


def suite_file(work: Path, limit: int | None, batch: int) -> Path:
    data = yaml.safe_load((SUITES / "general.yaml").read_text())
    data["batch_size"] = batch
    if limit:
        for t in data["tasks"]:
            t["limit"] = limit
    path = work / "suite.yaml"
    # atomic: chains started side by side on one --work write it at the same moment
    tmp = path.with_name(f".suite-{os.getpid()}.yaml")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)
    return path


def parameter_count(model_dir: Path) -> int:
    """Weights of a saved (unquantized-layout) model, from the safetensors headers: ModelOpt's
    quantizer buffers are not parameters, a tied lm_head is not stored twice."""
    from optimizer.safetensors_header import read_safetensors_header

    params = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        for name, info in read_safetensors_header(f).items():
            # (ModelOpt's 2:4 masks, saved with a sparsify stage's model, are not weights)
            if "quantizer" not in name and not name.endswith(("_amax", "_mask")):
                params += math.prod(info["shape"])
    return params


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_step(variant: str, step: str, args: argparse.Namespace, suite: Path) -> dict:
    work = Path(args.work) / variant
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / f"recipe-{step}.yaml"
    recipe.write_text(yaml.safe_dump(recipe_for(variant, step, args, suite), sort_keys=False))
    run_dir = work / "run"
    flag = "--resume" if (run_dir / "run.json").exists() else "--force"
    t0 = time.time()
    cmd = [sys.executable, "-m", "optimizer", "run", str(recipe), "-o", str(run_dir), "-q", flag]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    rec = json.loads((run_dir / "run.json").read_text())
    if proc.returncode not in (0, 3):  # 3: the gate rejected it; still a measurement
        raise SystemExit(f"{variant}-{step} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    gate = json.loads(Path(rec["artifacts"]["gate"]).read_text())
    stages = {s["name"]: s for s in rec["stages"]}
    compress = stages.get("sparsify") or stages.get("prune")
    saved = Path(_saved_model(rec))
    shipped = Path(rec["artifacts"].get("hf_checkpoint") or saved)
    training = (stages.get("distill") or {}).get("metrics")
    return {
        "variant": variant,
        "step": step,
        "exit_code": proc.returncode,
        "wall_seconds": round(wall, 1),
        "stage_seconds": {s["name"]: s["seconds"] for s in rec["stages"]},
        "compress_metrics": compress.get("metrics"),
        "metrics": {
            m["metric"]: {"baseline": m["baseline"], "candidate": m["candidate"], "docs": m["n"]}
            for m in gate["metrics"]
        },
        "passed": gate["passed"],
        "evaluated": gate["meta"]["evaluated"],
        "params": parameter_count(saved),
        "checkpoint_bytes": dir_bytes(shipped),
        "training": None
        if training is None
        else {k: training.get(k) for k in ("steps", "tokens", "train_seconds", "before", "after")},
        "recipe": recipe.read_text(),
        "device": rec.get("device"),
        "versions": rec.get("versions"),
    }


def _saved_model(rec: dict) -> str:
    """The model the last model-changing stage handed over (its recorded `model` output)."""
    for s in reversed(rec["stages"]):
        out = (s.get("outputs") or {}).get("model")
        if out:
            return out["path"]
    raise SystemExit("no saved model in run.json")


def load_for_latency(model_dir: Path, sparse: bool):
    """``model_dir`` in bf16 on CUDA; ``sparse``: its 2:4 linears as semi-structured tensors."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    if sparse:
        from torch.sparse import to_sparse_semi_structured

        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                m.weight = torch.nn.Parameter(to_sparse_semi_structured(m.weight.detach()))
    return model


def forward_times(model, batch: int, seq: int, iters: int) -> list[float]:
    """``iters`` forward latencies in ms (CUDA events), after 3 untimed forwards."""
    import torch

    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
    times = []
    with torch.inference_mode():
        for i in range(iters + 3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(ids)
            end.record()
            torch.cuda.synchronize()
            if i >= 3:
                times.append(start.elapsed_time(end))
    return times


def latencies(args: argparse.Namespace) -> dict:
    """Median forward latency (ms) per model and batch. The models are timed in interleaved
    rounds after a throw-away pass, so clock ramp-up and lazy CUDA set-up do not all fall on
    whichever model comes first."""
    from optimizer.models import resolve_source

    found = {"baseline": {"dir": str(resolve_source(MODEL["source"], REPO).path), "sparse": False}}
    for variant in args.variants:
        run = Path(args.work) / variant / "run" / "run.json"
        if not run.exists():
            continue
        rec = json.loads(run.read_text())
        distill = next((s for s in rec["stages"] if s["name"] == "distill"), None)
        if distill and (distill.get("outputs") or {}).get("model"):
            path = distill["outputs"]["model"]["path"]
            found[variant] = {"dir": path, "sparse": False}
            if variant == "sparse24":
                found["sparse24 (semi-structured kernels)"] = {"dir": path, "sparse": True}
    models = {name: load_for_latency(Path(m["dir"]), m["sparse"]) for name, m in found.items()}
    times: dict[tuple[str, int], list[float]] = {}
    first = next(iter(models.values()))
    for b in (1, 32):
        forward_times(first, b, args.latency_seq, args.latency_iters)  # throw-away
    for _ in range(args.latency_rounds):
        for name, model in models.items():
            for b in (1, 32):
                times.setdefault((name, b), []).extend(
                    forward_times(model, b, args.latency_seq, args.latency_iters)
                )
    out = {
        name: {f"batch {b}": round(statistics.median(times[name, b]), 2) for b in (1, 32)}
        for name in models
    }
    for name, row in out.items():
        print(f"latency {name}: {row}", flush=True)
    return out


def mean(cell: dict, which: str) -> float:
    vals = [m[which] for m in cell["metrics"].values()]
    return sum(vals) / len(vals)


def table(dirs: list[Path]) -> str:
    cells, lat = {}, {}
    for d in dirs:
        for f in sorted(d.glob("*.json")):
            data = json.loads(f.read_text())
            if f.name == "latency.json":
                lat.update(data)
            else:
                cells[(data["variant"], data["step"])] = data
    if not cells:
        raise SystemExit("no results")
    any_cell = next(iter(cells.values()))
    names = list(any_cell["metrics"])
    base = mean(any_cell, "baseline")
    head = ["variant", "step", *(n.removeprefix("local_") for n in names), "mean", "of baseline"]
    head += ["params", "checkpoint MB", "gated", "train s", "run s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append(
        "| bf16 | baseline | "
        + " | ".join(f"{any_cell['metrics'][n]['baseline']:.4f}" for n in names)
        + f" | {base:.4f} | 100 % | | | | | |"
    )
    order = {v: i for i, v in enumerate(COMPRESS)} | {s: i for i, s in enumerate(STEPS)}
    for variant, step in sorted(cells, key=lambda k: (order[k[0]], order[k[1]])):
        c = cells[(variant, step)]
        m = mean(c, "candidate")
        t = c["training"] or {}
        lines.append(
            f"| {variant} | {step} | "
            + " | ".join(f"{c['metrics'][n]['candidate']:.4f}" for n in names)
            + f" | {m:.4f} | {m / base:.1%} | {c['params'] / 1e6:.1f} M | "
            f"{c['checkpoint_bytes'] / 1e6:.0f} | {c['evaluated']} | "
            f"{t.get('train_seconds') or ''} | {c['wall_seconds']:.0f} |"
        )
    out = "\n".join(lines) + "\n"
    if lat:
        out += "\n| model (bf16) | batch 1 ms | batch 32 ms |\n|---|---|---|\n"
        for name, v in lat.items():
            out += f"| {name} | {v['batch 1']} | {v['batch 32']} |\n"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--variants", nargs="*", choices=list(COMPRESS), default=list(COMPRESS))
    ap.add_argument("--steps-to-run", nargs="*", choices=STEPS, default=list(STEPS))
    ap.add_argument("--steps", type=int, help="override the distillation steps")
    ap.add_argument("--learning-rate", type=float)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--eval-batch-size", type=int, default=64, help="lm-eval batch size (GPU)")
    ap.add_argument("--limit", type=int, help="docs per task (default: all; for smoke tests)")
    ap.add_argument("--calib-samples", type=int, help="calibration windows (smoke tests)")
    ap.add_argument("--latency-seq", type=int, default=512)
    ap.add_argument("--latency-iters", type=int, default=20, help="timed forwards per round")
    ap.add_argument("--latency-rounds", type=int, default=3)
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--redo", action="store_true", help="re-run steps already measured in --work")
    ap.add_argument("--out", default="bench-compress")
    ap.add_argument("--work", default="/tmp/bench-compress")
    ap.add_argument("--table", nargs="*", type=Path)
    args = ap.parse_args()
    if args.table:
        print(table(args.table), end="")
        return 0
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    suite = suite_file(work, args.limit, args.eval_batch_size)
    for variant in args.variants:
        for step in args.steps_to_run:
            # A step measured by an earlier (interrupted) call is kept, not re-run: the chain
            # resumes at the first step without a cell.
            done = work / variant / "cells" / f"{step}.json"
            if done.exists() and not args.redo:
                cell = json.loads(done.read_text())
            else:
                cell = run_step(variant, step, args, suite)
                done.parent.mkdir(parents=True, exist_ok=True)
                done.write_text(json.dumps(cell, indent=1) + "\n")
            (out / f"{variant}-{step}.json").write_text(json.dumps(cell, indent=1) + "\n")
            print(
                f"{variant:9s} {step:8s}: mean {mean(cell, 'candidate'):.4f} "
                f"(baseline {mean(cell, 'baseline'):.4f}), {cell['params'] / 1e6:.1f} M params, "
                f"{cell['wall_seconds']:.0f} s",
                flush=True,
            )
    if not args.no_latency:
        (out / "latency.json").write_text(json.dumps(latencies(args), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
