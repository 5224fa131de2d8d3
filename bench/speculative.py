"""Speculative-decoding drafts for the builtin SmolLM2-135M-Instruct: acceptance and speed-up.

Every cell is a real `optimize run` of a one-stage recipe (`speculative`), so the numbers are
the stage's own (run.json): mean acceptance length, acceptance rate per draft position, the
PyTorch wall-clock speed-up of greedy speculative decoding against plain greedy (both with a
KV cache, batch 1), and the training time. One run measures every --draft-lens length on the
same held-out prompts (``acceptance.draft_lens``), so a head is trained once per cell.

  eagle3 / medusa  trained heads, for each of --steps; the table reports the measured training
                   seconds (the curve's x axis). EAGLE-3 trains without torch.compile unless
                   --compile: ModelOpt's max-autotune compile takes minutes on the first step,
                   which a run of a few thousand steps does not earn back
  draft_target     --draft-model (e.g. bench/compress.py's pruned + distilled depth model:
                   W/depth/run/stages/01-distill/model), no training
  --parallel       the cells as concurrent processes (a 135M model leaves an H200 mostly idle;
                   training seconds are then measured under that contention)

  python bench/speculative.py --methods eagle3 --steps 1200 3000 6000 --parallel --out DIR
  python bench/speculative.py --methods draft_target --draft-model PATH --out DIR
  python bench/speculative.py --table DIR > bench/results/speculative-gpu.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

MODEL = {"source": "builtin:smollm2-135m-instruct", "dtype": "bfloat16"}
HEAD = {
    "data": {"dataset": "chitchat-en"},
    "generate": {"max_new_tokens": 256, "batch_size": 64},
    "learning_rate": 1.0e-3,
    "batch_size": 16,
    "seq_len": 512,
}


def recipe(method: str, steps: int | None, args) -> dict:
    lens = sorted(set(args.draft_lens), reverse=True)
    stage: dict = {
        "method": method,
        "draft_len": lens[0],
        "acceptance": {
            "num_prompts": args.prompts,
            "max_new_tokens": args.new_tokens,
            "draft_lens": lens[1:],
        },
    }
    if method == "draft_target":
        stage["draft_model"] = str(Path(args.draft_model).resolve())
    else:
        stage |= HEAD | {"steps": steps}
        if method == "medusa":
            stage["medusa_heads"] = lens[0]
        else:
            stage["compile"] = args.compile
        if args.generate_prompts:
            stage["generate"] = {**HEAD["generate"], "num_prompts": args.generate_prompts}
    return {"name": "bench-speculative", "model": MODEL, "stages": [{"speculative": stage}]}


def run_cell(method: str, steps: int | None, args) -> list[dict]:
    """One run; a result per measured draft length."""
    work = Path(args.work) / f"{method}-{steps or 0}"
    work.mkdir(parents=True, exist_ok=True)
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(method, steps, args), sort_keys=False))
    t0 = time.time()
    cmd = [sys.executable, "-m", "optimizer", "run", str(path), "-o", str(work / "run"), "-q"]
    if (work / "run" / "run.json").exists():
        cmd.append("--resume")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"{work.name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return read_cells(method, steps, work, wall_seconds=round(time.time() - t0, 1))


def read_cells(method: str, steps: int | None, work: Path, wall_seconds=None) -> list[dict]:
    """A finished run's results (``work``: its recipe.yaml and run/), one per draft length."""
    rec = json.loads((work / "run" / "run.json").read_text())
    metrics = rec["stages"][0]["metrics"]
    training = metrics.get("training") or {}
    by_len = metrics.get("acceptance_by_draft_len") or {
        str(metrics["draft_len"]): metrics["acceptance"]
    }
    return [
        {
            "method": method,
            "steps": steps,
            "draft_len": int(k),
            "acceptance": acceptance,
            "train_seconds": training.get("train_seconds"),
            "tokens": training.get("tokens"),
            "wall_seconds": wall_seconds,
            "recipe": (work / "recipe.yaml").read_text(),
            "device": rec.get("device"),
            "versions": rec.get("versions"),
        }
        for k, acceptance in by_len.items()
    ]


def save(cells: list[dict], out: Path) -> None:
    for cell in cells:
        name = f"{cell['method']}-{cell['steps'] or 0}-k{cell['draft_len']}.json"
        (out / name).write_text(json.dumps(cell, indent=1) + "\n")
        a = cell["acceptance"]
        print(
            f"{cell['method']:12s} steps {cell['steps'] or '-':>5} k {cell['draft_len']}: "
            f"acceptance length {a['mean_acceptance_length']:.3f}, speed-up {a['speedup']}, "
            f"train {cell['train_seconds']} s",
            flush=True,
        )


def table(dirs: list[Path]) -> str:
    cells = [json.loads(f.read_text()) for d in dirs for f in sorted(d.glob("*.json"))]
    head = (
        "| method | steps | train min | draft len | mean acceptance length | by position "
        "| speed-up | = greedy |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for c in sorted(cells, key=lambda c: (c["method"], c["steps"] or 0, c["draft_len"])):
        a = c["acceptance"]
        lines.append(
            f"| {c['method']} | {c['steps'] or ''} | "
            f"{'' if not c['train_seconds'] else round(c['train_seconds'] / 60, 1)} | "
            f"{c['draft_len']} | {a['mean_acceptance_length']:.3f} | "
            f"{', '.join(f'{r:.2f}' for r in a['acceptance_rate_by_position'])} | "
            f"{a['speedup'] or '':} | {a.get('prompts_matching_greedy', '')}/{a['prompts']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--methods", nargs="*", default=["eagle3", "medusa"])
    ap.add_argument("--steps", nargs="*", type=int, default=[300, 800, 1600])
    ap.add_argument("--compile", action="store_true", help="eagle3: torch.compile the head")
    ap.add_argument("--parallel", action="store_true")
    ap.add_argument("--draft-lens", nargs="*", type=int, default=[3, 5])
    ap.add_argument("--draft-model", help="draft_target: the draft (a model directory)")
    ap.add_argument("--prompts", type=int, default=32, help="held-out prompts measured")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--generate-prompts", type=int, help="prompts answered for training data")
    ap.add_argument("--out", default="bench-speculative")
    ap.add_argument("--work", default="/tmp/bench-speculative")
    ap.add_argument("--table", nargs="*", type=Path)
    args = ap.parse_args()
    if args.table:
        print(table(args.table), end="")
        return 0
    if "draft_target" in args.methods and not args.draft_model:
        ap.error("draft_target needs --draft-model")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, int | None]] = []
    for method in args.methods:
        if method == "draft_target":
            jobs.append((method, None))
        else:
            jobs += [(method, steps) for steps in args.steps]
    failed = 0
    # One failing cell (e.g. out of GPU memory beside the others) leaves the rest standing.
    with concurrent.futures.ThreadPoolExecutor(len(jobs) if args.parallel else 1) as pool:
        futures = [pool.submit(run_cell, *job, args) for job in jobs]
        for future in concurrent.futures.as_completed(futures):
            try:
                save(future.result(), out)
            except RuntimeError as e:
                failed += 1
                print(e, file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
