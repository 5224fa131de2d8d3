"""Evaluation speed against batch size (rows of shared-context scoring) on this machine.

Evaluates the builtin model on the first 120 ARC-Easy documents at each batch size, in the
compute dtype the pipeline would choose here, and prints seconds and accuracy (which must
not change). Results: bench/results/eval_batch_size-<cpu|gpu>.md.

  python bench/eval_batch_size.py --batch-sizes 4 8 16 32 64
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--docs", type=int, default=120)
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import torch

    from optimizer import hardware, models
    from optimizer.evaluation import Suite, SuiteTask
    from optimizer.evaluation.harness import score_suite

    gpu = torch.cuda.is_available()
    compute = hardware.compute_dtype("bfloat16", "auto", cuda=gpu)
    base = models.resolve_source("builtin:smollm2-135m-instruct", REPO)
    model, tok = models.load_model(base.path, compute), models.load_tokenizer(base.path)
    rows = []
    for bs in args.batch_sizes:
        suite = Suite(
            name="bs",
            limit=args.docs,
            batch_size=bs,
            tasks=[SuiteTask(task="local_arc_easy", metric="acc")],
        )
        t0 = time.time()
        acc = score_suite((model, tok), suite)["local_arc_easy/acc"].value
        rows.append((bs, time.time() - t0, acc))
        print(f"batch {bs}: {rows[-1][1]:.1f} s, acc {acc:.4f}", flush=True)
    flags = sorted(hardware.cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    lines = [
        f"# Evaluation speed by batch size ({'gpu' if gpu else 'cpu'}, compute {compute})",
        "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"ARC-Easy, first {args.docs} docs; threads {torch.get_num_threads()}; "
        f"CPU flags of note: {', '.join(flags) or 'none'}",
        "",
        "| batch size | seconds | acc |",
        "|---|---|---|",
        *(f"| {bs} | {s:.1f} | {a:.4f} |" for bs, s, a in rows),
    ]
    out = REPO / "bench" / "results" / f"eval_batch_size-{'gpu' if gpu else 'cpu'}.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
