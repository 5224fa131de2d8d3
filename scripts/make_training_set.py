#!/usr/bin/env python3
"""Build the local chat training set ``optimizer/resources/training/chitchat-en.jsonl``.

Source: the PyPI package ``chitchat-dataset`` 0.9.0 (MIT licence, BYU Perception,
Control & Cognition lab). Its wheel bundles ``chitchat_dataset/dataset.json``,
7,168 human-human English chit-chat conversations (see
optimizer/resources/training/README.md for the licence and provenance).

What the script does:

1. Reads ``dataset.json``. Pass the unpacked file (``--json``) or the wheel
   (``--wheel``). With neither, the script runs
   ``pip download --no-deps chitchat-dataset==0.9.0`` into a temporary directory.
2. Keeps conversations with exactly two speakers. The first speaker becomes
   ``user`` and the second ``assistant``. In the source each turn is a list of
   consecutive messages from one speaker, so turns always alternate. The
   messages of a turn are stripped, blank ones are dropped, and the rest are
   joined with ``"\\n"``.
3. Cuts long conversations after ``MAX_TURNS`` turns, or before the turn that
   would take the content past ``MAX_CONV_CHARS`` characters. Then it drops a
   trailing ``user`` turn, so every conversation ends with ``assistant``.
4. Drops conversations with fewer than ``MIN_TURNS`` turns or fewer than
   ``MIN_CHARS`` characters. It also drops any conversation containing what
   looks like an e-mail address, a URL or a phone number (a crude PII filter),
   and any whose letters are less than 95% ASCII.
5. Orders the survivors by the SHA-256 of their conversation id and takes them
   in that order until the output would exceed ``MAX_BYTES``.
6. Writes one ``{"messages": [...], "id": ...}`` object per line (UTF-8,
   ``ensure_ascii=False``, ``\\n`` line ends).

The output is deterministic: there is no randomness and the order is fixed.
Only the standard library is used (plus ``pip`` when the source is downloaded).

Usage::

    python scripts/make_training_set.py
    python scripts/make_training_set.py --json /path/to/chitchat_dataset/dataset.json
    python scripts/make_training_set.py --wheel /path/to/chitchat_dataset-0.9.0-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "chitchat-dataset==0.9.0"
MEMBER = "chitchat_dataset/dataset.json"
OUT = Path(__file__).resolve().parent.parent / "optimizer/resources/training/chitchat-en.jsonl"

MIN_TURNS = 6  # at least three user/assistant exchanges
MAX_TURNS = 40  # longer conversations are cut after this many turns ...
MAX_CONV_CHARS = 6000  # ... or before the turn that would pass this many characters
MIN_CHARS = 400  # total characters of all turn contents
MAX_BYTES = 5_000_000  # size budget of the jsonl file
MIN_ASCII_LETTER_SHARE = 0.95

PII = re.compile(
    r"[\w.+-]+@[\w-]+\.[\w.]+"  # e-mail
    r"|https?://|www\.|\.com\b|\.org\b|\.net\b|\.edu\b"  # URL
    r"|(?:\+?\d[\s().-]*){7,}"  # phone-number-like run of 7+ digits
)


def load(args: argparse.Namespace) -> dict:
    if args.json:
        return json.loads(Path(args.json).read_text(encoding="utf-8"))
    if args.wheel:
        with zipfile.ZipFile(args.wheel) as zf:
            return json.loads(zf.read(MEMBER).decode("utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", tmp],
            check=True,
        )
        (wheel,) = Path(tmp).glob("chitchat_dataset-*.whl")
        with zipfile.ZipFile(wheel) as zf:
            return json.loads(zf.read(MEMBER).decode("utf-8"))


def convert(conv: dict) -> list[dict] | None:
    turns = conv.get("messages") or []
    speakers = []
    for turn in turns:
        if turn and turn[0]["sender"] not in speakers:
            speakers.append(turn[0]["sender"])
    if len(speakers) != 2:
        return None
    role = {speakers[0]: "user", speakers[1]: "assistant"}
    messages: list[dict] = []
    for turn in turns:
        texts = [m["text"].strip() for m in turn if m.get("text", "").strip()]
        if not texts:
            continue
        r = role[turn[0]["sender"]]
        content = "\n".join(texts)
        if messages and messages[-1]["role"] == r:  # a turn emptied out between two
            messages[-1]["content"] += "\n" + content
        else:
            messages.append({"role": r, "content": content})
    if messages and messages[0]["role"] != "user":
        return None
    kept, chars = [], 0
    for m in messages[:MAX_TURNS]:
        if chars + len(m["content"]) > MAX_CONV_CHARS:
            break
        kept.append(m)
        chars += len(m["content"])
    messages = kept
    if messages and messages[-1]["role"] == "user":
        messages.pop()
    if len(messages) < MIN_TURNS:
        return None
    text = "\n".join(m["content"] for m in messages)
    if len(text) < MIN_CHARS or PII.search(text):
        return None
    letters = [c for c in text if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) / len(letters) < MIN_ASCII_LETTER_SHARE:
        return None
    return messages


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="path to an unpacked chitchat_dataset/dataset.json")
    ap.add_argument("--wheel", help="path to chitchat_dataset-0.9.0-py3-none-any.whl")
    ap.add_argument("--out", default=str(OUT), help=f"output file (default {OUT})")
    args = ap.parse_args()

    data = load(args)
    kept = []
    for cid, conv in data.items():
        messages = convert(conv)
        if messages is not None:
            kept.append((hashlib.sha256(cid.encode("utf-8")).hexdigest(), cid, messages))
    kept.sort()

    lines, size = [], 0
    for _, cid, messages in kept:
        line = json.dumps({"messages": messages, "id": cid}, ensure_ascii=False) + "\n"
        n = len(line.encode("utf-8"))
        if size + n > MAX_BYTES:
            break
        lines.append(line)
        size += n

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes("".join(lines).encode("utf-8"))
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(
        f"{len(data)} conversations, {len(kept)} eligible, wrote {len(lines)} records, "
        f"{size} bytes to {out}\nsha256 {digest}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
