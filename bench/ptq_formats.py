"""Accuracy and checkpoint size of every PTQ format on the builtin SmolLM2-135M-Instruct.

Each format runs through the real pipeline (`optimize run quickstart` with the format
swapped in), then the quantized hand-over checkpoint is reloaded with its ModelOpt state and
evaluated with lm-eval on the shipped offline tasks (optimizer/resources/evals), next to the
bf16 baseline. Results: bench/results/ptq_formats-<device>.{json,md}.

  python bench/ptq_formats.py                         # CPU formats, --limit 200 per task
  python bench/ptq_formats.py --limit 0 --all-formats # on a GPU: every format, all docs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from optimizer.formats import FORMATS  # noqa: E402

TASKS = [
    "local_hellaswag",
    "local_arc_easy",
    "local_arc_challenge",
    "local_piqa",
    "local_winogrande",
]
METRIC = {
    "local_hellaswag": "acc_norm",
    "local_arc_easy": "acc",
    "local_arc_challenge": "acc_norm",
    "local_piqa": "acc",
    "local_winogrande": "acc",
}
GROUP_64 = {"int4_awq", "w4a8_awq"}  # SmolLM2's hidden 576 is not a multiple of 128


def overrides_for(fmt: str) -> list[str]:
    spec = FORMATS[fmt]
    sets = [f"stages.ptq.format={fmt}", "calibration.num_samples=128", "calibration.seq_len=512"]
    if fmt in GROUP_64:
        sets.append("stages.ptq.group_size=64")
    trtllm_ok = spec.trtllm_algo is not None and fmt != "w4a8_awq"  # W4A8 g64: no TRT-LLM kernels
    sets.append("stages.export.trtllm_checkpoint=" + ("{tp: 1, pp: 1}" if trtllm_ok else "null"))
    sets.append("stages.export.hf_checkpoint=true")
    return sets


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--formats", nargs="*", help="formats to run (default: all this machine can)")
    ap.add_argument("--all-formats", action="store_true", help="include GPU-only formats")
    ap.add_argument("--limit", type=int, default=200, help="docs per task (0 = all)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "runs")
    ap.add_argument(
        "--results",
        type=Path,
        help="results path without suffix (default: bench/results/ptq_formats-<cpu|gpu>)",
    )
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import torch

    from optimizer import models
    from optimizer.evaluation import Suite, SuiteTask
    from optimizer.evaluation.harness import score_suite
    from optimizer.pipeline import run_recipe
    from optimizer.recipe import load_recipe

    gpu = torch.cuda.is_available()
    formats = args.formats or [f for f, s in FORMATS.items() if args.all_formats or not s.needs_gpu]
    limit = args.limit or None
    out = args.results or REPO / "bench" / "results" / f"ptq_formats-{'gpu' if gpu else 'cpu'}"
    meta = {
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "limit_per_task": limit,
        "tasks": METRIC,
        "command": " ".join(["python", *sys.argv]),
        "calibration": "128 x 512 tokens of the shipped python-docs calibration set",
    }
    rows: list[dict] = []

    def record(row: dict) -> None:  # saved after every model: a cut-off run keeps what it measured
        rows.append(row)
        print(json.dumps(row), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(
            json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n"
        )
        out.with_suffix(".md").write_text(markdown(meta, rows))

    suite = Suite(
        name="ptq_formats",
        limit=limit,
        batch_size=args.batch_size,
        tasks=[SuiteTask(task=t, metric=METRIC[t]) for t in TASKS],
    )

    def score(model, tok) -> tuple[dict, float]:
        t0 = time.time()
        means = score_suite((model, tok), suite).means()
        return {t: means[f"{t}/{METRIC[t]}"] for t in TASKS}, time.time() - t0

    base = models.resolve_source("builtin:smollm2-135m-instruct", REPO)
    tok = models.load_tokenizer(base.path)
    scores, secs = score(models.load_model(base.path, "bfloat16"), tok)
    size = sum(f.stat().st_size for f in base.path.glob("*.safetensors"))
    record(
        {
            "format": "bf16",
            "scores": scores,
            "eval_seconds": round(secs, 1),
            "hf_checkpoint_bytes": size,
            "trtllm_checkpoint_bytes": None,
        }
    )
    quickstart = "quickstart"  # the shipped recipe, by name
    for fmt in formats:
        recipe = load_recipe(quickstart, overrides_for(fmt), device="gpu" if gpu else "cpu")
        t0 = time.time()
        outcome = run_recipe(recipe, args.work / fmt, force=True)
        run_seconds = time.time() - t0
        stages = outcome.record["stages"]
        model = models.load_model(Path(stages[0]["outputs"]["model"]["path"]), "bfloat16")
        scores, secs = score(model, tok)
        export = stages[1]["metrics"]
        trt = export.get("trtllm_checkpoint") or {}
        record(
            {
                "format": fmt,
                "scores": scores,
                "eval_seconds": round(secs, 1),
                "pipeline_seconds": round(run_seconds, 1),
                "trtllm_checkpoint_bytes": trt.get("bytes"),
                "hf_checkpoint_bytes": export.get("hf_checkpoint_bytes"),
                "quant_algo": trt.get("quant_algo"),
            }
        )
        del model
    print(out.with_suffix(".md").read_text())
    return 0


def markdown(meta: dict, rows: list[dict]) -> str:
    base = sum(rows[0]["scores"].values()) / len(TASKS)
    head = "| format | " + " | ".join(f"{t.removeprefix('local_')} {METRIC[t]}" for t in TASKS)
    lines = [
        f"# PTQ formats on SmolLM2-135M-Instruct ({meta['device']})",
        "",
        f"Command: `{meta['command']}`  ",
        f"Docs per task: {meta['limit_per_task'] or 'all shipped'}; "
        f"calibration: {meta['calibration']}.",
        "",
        head + " | mean | recovery | TRT-LLM ckpt MB | HF ckpt MB |",
        "|---" * (len(TASKS) + 5) + "|",
    ]
    for r in rows:
        mean = sum(r["scores"].values()) / len(TASKS)
        mb = lambda b: f"{b / 1e6:.0f}" if b else "—"  # noqa: E731
        lines.append(
            f"| {r['format']} | "
            + " | ".join(f"{r['scores'][t]:.3f}" for t in TASKS)
            + f" | {mean:.3f} | {100 * mean / base:.1f} % | {mb(r.get('trtllm_checkpoint_bytes'))} | "
            f"{mb(r.get('hf_checkpoint_bytes'))} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
