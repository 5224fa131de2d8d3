"""Sizing the quickstart's gate: how many documents of which task tell a healthy FP8 model
from a damaged one, and what each costs to evaluate.

Evaluates the builtin SmolLM2-135M-Instruct (baseline), its FP8 PTQ exactly as
the shipped quickstart recipe calibrates it, and a damaged copy (every other layer's MLP output
zeroed, as tests/test_e2e.py does) on the given tasks, with per-document scores. For every
candidate, task and document count it reports the paired drop, its standard error, the flip
rate and the gate's verdict at the quick suite's threshold, plus seconds per document.

  python bench/quick_gate.py                                  # CPU, compute dtype by capability
  python bench/quick_gate.py --compute-dtype bfloat16         # force bf16 math (emulated on
                                                              # CPUs without AVX512-BF16/AMX)

Results: bench/results/quick_gate-<cpu|gpu>-<compute dtype>.{json,md}, with the CPU flags.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_TASKS = ["local_arc_easy:acc:1000", "local_piqa:acc:600", "local_hellaswag:acc_norm:400"]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tasks", nargs="*", default=DEFAULT_TASKS, help="TASK:METRIC:DOCS ...")
    ap.add_argument("--compute-dtype", default="auto")
    ap.add_argument("--max-drop", type=float, default=0.05, help="the threshold judged against")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--calibration-samples", type=int, default=None)
    ap.add_argument("--results", type=Path, help="results path without suffix")
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import modelopt.torch.quantization as mtq
    import torch

    from optimizer import batching, calibration, hardware, models
    from optimizer.evaluation import Suite, SuiteTask, TaskScores, Threshold
    from optimizer.evaluation.harness import score_suite
    from optimizer.evaluation.verdict import judge
    from optimizer.recipe import load_recipe

    gpu = torch.cuda.is_available()
    recipe = load_recipe("quickstart", [])  # the shipped recipe, by name
    storage = recipe.model.dtype
    compute = hardware.compute_dtype(storage, args.compute_dtype, cuda=gpu)
    tasks = []
    for spec in args.tasks:
        task, metric, docs = spec.split(":")
        tasks.append(SuiteTask(task=task, metric=metric, limit=int(docs)))
    suite = Suite(name="sizing", tasks=tasks, batch_size=args.batch_size)
    device = torch.cuda.get_device_name(0) if gpu else cpu_model()
    flags = sorted(hardware.cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    out = (
        args.results
        or REPO / "bench" / "results" / f"quick_gate-{'gpu' if gpu else 'cpu'}-{compute}"
    )
    meta = {
        "device": device,
        "cpu_flags": flags,
        "cpu_threads": torch.get_num_threads(),
        "storage_dtype": storage,
        "compute_dtype": compute,
        "command": " ".join(["python", *sys.argv]),
        "max_drop": args.max_drop,
    }

    base = models.resolve_source(recipe.model.source, recipe.base_dir)
    tok = models.load_tokenizer(base.path)
    results: dict[str, dict] = {}

    def evaluate(name: str, model) -> None:
        t0 = time.time()
        scores = score_suite((model, tok), suite)
        seconds = time.time() - t0
        results[name] = {"seconds": round(seconds, 1), "metrics": scores}
        print(f"{name}: {seconds:.0f} s", {k: round(v, 4) for k, v in scores.means().items()})
        save()

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(summary(), indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(summary()))

    def summary() -> dict:
        rows = []
        baseline = results.get("baseline")
        for name, res in results.items():
            if name == "baseline" or baseline is None:
                continue
            for t in tasks:
                b, c = baseline["metrics"][t.key], res["metrics"][t.key]
                for n in sorted({min(n, t.limit) for n in (100, 200, 300, 400, 600, t.limit)}):

                    def cut(m, n=n):  # the first n documents, as limit=n takes them
                        return TaskScores.from_docs(dict(list(m.docs.items())[:n]), m.doc_hashes)

                    j = judge(t.key, cut(b), cut(c), Threshold(max_drop=args.max_drop))
                    docs_b, docs_c = cut(b).docs, cut(c).docs
                    flips = sum(docs_b[k] != docs_c[k] for k in docs_b) / n
                    rows.append(
                        {
                            "candidate": name,
                            "metric": t.key,
                            "n": n,
                            "baseline": round(j.baseline, 4),
                            "candidate_value": round(j.candidate, 4),
                            "drop": round(-j.delta, 4),
                            "se": round(j.delta_stderr, 4),
                            "flip_rate": round(flips, 4),
                            "verdict": j.verdict,
                        }
                    )
        seconds = {name: {"total": r["seconds"]} for name, r in results.items()}
        return {"meta": meta, "seconds": seconds, "rows": rows, "calibration_seconds": calib_s}

    calib_s = None
    model = models.load_model(base.path, compute)
    evaluate("baseline", model)

    spec = recipe.calibration
    assert spec is not None
    if args.calibration_samples:
        spec = spec.model_copy(update={"num_samples": args.calibration_samples})
    tokens = calibration.tokenize(spec, calibration.load_texts(spec, recipe.base_dir), tok)
    cfg = recipe.stages[0].modelopt_config()
    t0 = time.time()
    mtq.quantize(
        model,
        cfg,
        calibration.forward_loop(
            tokens, batching.fixed(spec.batch_size, calibration.DEFAULT_BATCH_SIZE)
        ),
    )
    calib_s = round(time.time() - t0, 1)
    evaluate("fp8", model)
    del model

    damaged = models.load_model(base.path, compute)
    with torch.no_grad():
        for i in range(0, damaged.config.num_hidden_layers, 2):
            damaged.model.layers[i].mlp.down_proj.weight.zero_()
    evaluate("damaged", damaged)
    print(out.with_suffix(".md").read_text())
    return 0


def cpu_model() -> str:
    for line in (
        Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    ):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def markdown(data: dict) -> str:
    m = data["meta"]
    lines = [
        f"# Sizing the quick gate ({m['device']}, compute {m['compute_dtype']})",
        "",
        f"Command: `{m['command']}`  ",
        f"CPU flags of note: {', '.join(m['cpu_flags']) or 'none'}; threads: {m['cpu_threads']}; "
        f"storage dtype {m['storage_dtype']}; FP8 calibration {data['calibration_seconds']} s.  ",
        "Evaluation seconds (all tasks): "
        + ", ".join(f"{k} {v['total']}" for k, v in data["seconds"].items()),
        "",
        f"Verdict at max_drop {m['max_drop']} (pass if drop + 1.645 SE <= max_drop).",
        "",
        "| candidate | metric | docs | baseline | candidate | drop | SE | flips | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['candidate']} | {r['metric']} | {r['n']} | {r['baseline']:.4f} | "
            f"{r['candidate_value']:.4f} | {r['drop']:+.4f} | {r['se']:.4f} | "
            f"{r['flip_rate']:.3f} | {r['verdict']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
