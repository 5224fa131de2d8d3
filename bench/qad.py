"""PTQ vs PTQ+QAT vs PTQ+QAD on the builtin SmolLM2-135M-Instruct, gated on the `general` suite.

Every cell is a real pipeline run (`optimize run`) of the shipped QAD recipe for the format
(optimizer/resources/recipes/builtin-<format>-qad.yaml, FP8 reuses the INT4 one with the format
swapped): `ptq` drops the qat stage, `qat` sets `teacher: none`, `qad` runs it as shipped, and
`distill` swaps it for a `distill` stage with the same data and schedule (logit KD plus a
cosine hidden-state loss at the middle and last layers: the distill stage's own terms).
--label names a hyperparameter variant (e.g. a longer schedule) so it gets its own row.
The gate stage scores the candidate on the full `general` suite (all shipped docs) against the
bf16 baseline (cached after the first run). Each run's gate.json and training metrics are
collected into --out/<format>-<variant>.json; --table merges them into a Markdown table.

  python bench/qad.py --formats int4_awq nvfp4 --variants ptq qat qad --out DIR    # GPU
  python bench/qad.py --table DIR [DIR ...] > bench/results/qad-gpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "optimizer" / "resources" / "recipes"
SUITES = REPO / "optimizer" / "resources" / "suites"
SHIPPED = {"int4_awq": "builtin-int4-awq-qad", "nvfp4": "builtin-nvfp4-qad", "fp8": None}
VARIANTS = ("ptq", "qat", "qad", "distill")
#: The distill variant's hidden-state terms (SmolLM2-135M has 30 layers; model.norm is the last).
LAYER_LOSSES = [
    {"student": "model.layers.14", "teacher": "model.layers.14", "loss": "cosine"},
    {"student": "model.norm", "teacher": "model.norm", "loss": "cosine"},
]


def recipe_for(fmt: str, variant: str, args: argparse.Namespace, suite: Path) -> dict:
    name = SHIPPED[fmt] or SHIPPED["int4_awq"]
    data = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    stages = data["stages"]
    if fmt == "fp8":
        stages[0] = {"ptq": {"format": "fp8"}}
    qat_index = next(i for i, s in enumerate(stages) if "qat" in s)
    if variant == "ptq":
        del stages[qat_index]
    else:
        qat = stages[qat_index]["qat"]
        qat["teacher"] = "none" if variant == "qat" else "original"
        if variant == "distill":
            qat["layer_losses"] = LAYER_LOSSES
            stages[qat_index] = {"distill": qat}
        for key in ("steps", "learning_rate", "batch_size", "seq_len"):
            if getattr(args, key) is not None:
                qat[key] = getattr(args, key)
    for s in stages:
        if "gate" in s:
            s["gate"]["suite"] = str(suite)
    data["name"] = f"bench-{fmt}-{variant}"
    return data


def cell_name(fmt: str, variant: str, label: str | None) -> str:
    return f"{fmt}-{variant}" + (f"-{label}" if label else "")


def run_cell(fmt: str, variant: str, args: argparse.Namespace, suite: Path) -> dict:
    work = Path(args.work) / cell_name(fmt, variant, args.label)
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_for(fmt, variant, args, suite), sort_keys=False))
    t0 = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "optimizer",
            "run",
            str(recipe),
            "-o",
            str(work / "run"),
            "-q",
            "--force",
        ],
        capture_output=True,
        text=True,
    )
    wall = time.time() - t0
    rec = json.loads((work / "run" / "run.json").read_text())
    if proc.returncode not in (0, 3):  # 3: the gate rejected it; still a measurement
        raise SystemExit(f"{fmt}-{variant} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    gate = json.loads(Path(rec["artifacts"]["gate"]).read_text())
    stages = {s["name"]: s for s in rec["stages"]}
    training = (stages.get("qat") or stages.get("distill") or {}).get("metrics")
    return {
        "format": fmt,
        "variant": variant,
        "label": args.label,
        "exit_code": proc.returncode,
        "wall_seconds": round(wall, 1),
        "stage_seconds": {s["name"]: s["seconds"] for s in rec["stages"]},
        "metrics": {
            m["metric"]: {"baseline": m["baseline"], "candidate": m["candidate"], "docs": m["n"]}
            for m in gate["metrics"]
        },
        "passed": gate["passed"],
        # what the gate scored: the rebuilt export (the default after export) or the model
        "evaluated": gate["meta"]["evaluated"],
        "training": None
        if training is None
        else {
            k: training[k]
            for k in ("trainer", "steps", "tokens", "train_seconds", "before", "after", "data")
        },
        "recipe": recipe.read_text(),
        "device": rec.get("device"),
        "versions": rec.get("versions"),
    }


def mean(cell: dict, which: str) -> float:
    vals = [m[which] for m in cell["metrics"].values()]
    return sum(vals) / len(vals)


def table(dirs: list[Path]) -> str:
    cells = {}
    for d in dirs:
        for f in sorted(d.glob("*.json")):
            c = json.loads(f.read_text())
            cells[(c["format"], c["variant"], c.get("label") or "")] = c
    if not cells:
        raise SystemExit("no results found")
    any_cell = next(iter(cells.values()))
    names = list(any_cell["metrics"])
    head = [
        "format",
        "variant",
        *(n.removeprefix("local_") for n in names),
        "mean",
        "recovered of PTQ drop",
        "gated",
        "steps",
        "tokens",
        "train s",
        "run s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = mean(any_cell, "baseline")
    lines.append(
        "| bf16 | baseline | "
        + " | ".join(f"{any_cell['metrics'][n]['baseline']:.4f}" for n in names)
        + f" | {base:.4f} | | | | | | |"
    )
    order = {**{f: i for i, f in enumerate(SHIPPED)}, **{v: i for i, v in enumerate(VARIANTS)}}
    for fmt, variant, label in sorted(cells, key=lambda k: (order[k[0]], order[k[1]], k[2])):
        c = cells[(fmt, variant, label)]
        ptq = cells.get((fmt, "ptq", ""))
        m = mean(c, "candidate")
        rec = ""
        if ptq is not None and variant != "ptq":
            drop = base - mean(ptq, "candidate")
            rec = f"{(m - mean(ptq, 'candidate')) / drop:+.0%}" if drop > 0 else "(no PTQ drop)"
        t = c["training"] or {}
        tokens = f"{t['tokens']:,}" if t.get("tokens") else ""
        lines.append(
            f"| {fmt} | {variant}{f' ({label})' if label else ''} | "
            + " | ".join(f"{c['metrics'][n]['candidate']:.4f}" for n in names)
            + f" | {m:.4f} | {rec} | {c.get('evaluated', '')} | {t.get('steps', '')} | {tokens} | "
            f"{t.get('train_seconds', '')} | {c['wall_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--formats", nargs="*", default=["int4_awq", "nvfp4"], choices=list(SHIPPED))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--steps", type=int, help="override the recipes' training steps")
    ap.add_argument("--learning-rate", dest="learning_rate", type=float)
    ap.add_argument("--batch-size", dest="batch_size", type=int)
    ap.add_argument("--seq-len", dest="seq_len", type=int)
    ap.add_argument("--eval-batch-size", type=int, default=64, help="lm-eval batch size (GPU)")
    ap.add_argument("--limit", type=int, help="docs per task (default: all; for smoke tests)")
    ap.add_argument("--label", help="suffix naming a hyperparameter variant, e.g. lr2e-4-500")
    ap.add_argument("--out", type=Path, help="directory for <format>-<variant>.json")
    ap.add_argument("--work", default=os.environ.get("BENCH_WORK", "/tmp/bench-qad"))
    ap.add_argument("--table", nargs="*", type=Path, help="print the table of these result dirs")
    args = ap.parse_args()
    if args.table:
        sys.stdout.write(table(args.table))
        return 0
    if args.out is None:
        ap.error("--out is required to run cells")
    args.out.mkdir(parents=True, exist_ok=True)
    suite_data = yaml.safe_load((SUITES / "general.yaml").read_text())
    suite_data["batch_size"] = args.eval_batch_size
    if args.limit:
        for t in suite_data["tasks"]:
            t["limit"] = args.limit
    suite = Path(args.work) / "general.yaml"
    suite.parent.mkdir(parents=True, exist_ok=True)
    suite.write_text(yaml.safe_dump(suite_data, sort_keys=False))
    for fmt in args.formats:
        for variant in args.variants:
            cell = run_cell(fmt, variant, args, suite)
            (args.out / f"{cell_name(fmt, variant, args.label)}.json").write_text(
                json.dumps(cell, indent=1)
            )
            print(
                f"{fmt:9s} {variant}: mean {mean(cell, 'candidate'):.4f} (baseline "
                f"{mean(cell, 'baseline'):.4f}), {cell['wall_seconds']:.0f} s",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
