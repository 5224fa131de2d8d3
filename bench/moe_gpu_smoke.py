"""The MoE cells of the support matrix on a GPU: tiny random Qwen3-MoE and Mixtral models
(tests/tiny.py's builders) through ``ptq`` -> ``export`` -> gate on the rebuilt export ->
``deploy`` (FP8, INT4 AWQ: no runtime serves the INT8 SmoothQuant export) with the real CLI, then ``optimize check`` on the unified checkpoint, per format.

The CPU tests (tests/test_families.py, tests/test_moe_experts.py) cover the same cells; this
runs them where ModelOpt's CUDA kernels compute (fake quantization, AWQ search, the export's
packing) and records the device each run computed on, its exit code and seconds. The models
are random, so the gate's accuracy says nothing (its threshold admits anything): what counts
is that every step ran and the exports are validator-clean.

  python bench/moe_gpu_smoke.py --out bench/results     # -> moe-gpu.md (+ .json); moe-cpu.* without a GPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

FORMATS = ("fp8", "int4_awq", "int8_sq")
FAMILIES = ("qwen3_moe", "mixtral")


def recipe(model: Path, fmt: str, suite: Path) -> str:
    group = ", group_size: 32" if "awq" in fmt else ""
    # The runtimes that load the format (none serves ModelOpt's INT8 SmoothQuant export).
    targets = {"fp8": "[trtllm, vllm, sglang]", "int4_awq": "[trtllm]"}.get(fmt)
    deploy = f"  - deploy: {{targets: {targets}, smoke_test: false}}\n" if targets else ""
    return (
        f"name: moe-{fmt}\nmodel: {{source: {model}}}\n"
        "calibration: {dataset: "
        f"{REPO / 'optimizer/resources/calibration/python-docs.jsonl'}, "
        "num_samples: 8, seq_len: 64, batch_size: 4}\n"
        "stages:\n"
        f"  - ptq: {{format: {fmt}{group}}}\n"
        "  - export: {trtllm_checkpoint: null, hf_checkpoint: true}\n"
        f"  - gate: {{suite: {suite}}}\n" + deploy
    )


def run(cmd: list[str], log: Path) -> tuple[int, float]:
    t0 = time.time()
    with log.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO).returncode
    return rc, round(time.time() - t0, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--work", type=Path, default=Path("/tmp/moe-gpu"))
    args = ap.parse_args()
    import torch
    from tiny import TINY_SUITE, make_tiny_family

    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    suite = args.work / "suite.yaml"
    suite.write_text(TINY_SUITE)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    rows = []
    for family in FAMILIES:
        model = make_tiny_family(args.work / "models" / family, family)
        for fmt in FORMATS:
            work = args.work / f"{family}-{fmt}"
            work.mkdir(parents=True, exist_ok=True)
            (work / "recipe.yaml").write_text(recipe(model, fmt, suite))
            rc, seconds = run(
                [
                    sys.executable,
                    "-m",
                    "optimizer",
                    "run",
                    str(work / "recipe.yaml"),
                    "-o",
                    str(work / "run"),
                    "--force",
                    "-q",
                ],
                work / "run.log",
            )
            row = {"family": family, "format": fmt, "exit": rc, "seconds": seconds}
            record = work / "run" / "run.json"
            if record.is_file():
                rec = json.loads(record.read_text())
                row["status"] = rec["status"]
                dev = rec["device"]
                row["compute"] = (
                    f"{'cuda' if dev.get('cuda') else 'cpu'}/{dev.get('compute_dtype')}"
                )
                ptq = rec["stages"][0].get("metrics", {})
                row["quantized_layers"] = ptq.get("quantized_layers")
                row["experts_without_tokens"] = ptq.get("moe_calibration", {}).get(
                    "experts_without_tokens"
                )
            hf = work / "run" / "hf_checkpoint"
            row["check"] = (
                run([sys.executable, "-m", "optimizer", "check", str(hf)], work / "check.log")[0]
                if hf.is_dir()
                else None
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    stem = "moe-gpu" if torch.cuda.is_available() else "moe-cpu"
    (args.out / f"{stem}.json").write_text(json.dumps({"device": device, "rows": rows}, indent=2))
    lines = [
        f"# MoE support-matrix cells on {device}",
        "",
        "Command: `python bench/moe_gpu_smoke.py` (tiny random Qwen3-MoE and Mixtral, 2 layers,",
        "4 experts; ptq -> export (unified HF) -> gate on the rebuilt export -> deploy; then",
        "`optimize check` on the export). Random models: the gate's threshold admits any",
        "accuracy; the columns say whether each step ran and the export is validator-clean.",
        "",
        "| family | format | exit | status | computed on | quantized layers | experts without tokens | `optimize check` | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['format']} | {r['exit']} | {r.get('status', '-')} | "
            f"{r.get('compute', '-')} | {r.get('quantized_layers', '-')} | "
            f"{r.get('experts_without_tokens', '-')} | {r['check']} | {r['seconds']} |"
        )
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return 0 if all(r["exit"] == 0 and r["check"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
