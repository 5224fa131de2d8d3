#!/usr/bin/env python3
"""Build a small real-text calibration set from the CPython documentation.

Source: Debian's ``python3.11-doc`` package, which ships the reStructuredText
sources of the CPython 3.11 documentation (as ``*.rst.txt`` files under
``usr/share/doc/python3.11/html/_sources/``).  The documentation is
distributed under the PSF License Version 2 (see optimizer/resources/calibration/README.md,
which ships next to the data).

What the script does:

1. ``apt-get download python3.11-doc`` and ``dpkg-deb -x`` into a temporary
   directory (or use an already downloaded ``.deb`` given with ``--deb``).
2. Walks the selected documentation sections in sorted order.
3. Turns each reST document into plain paragraphs: drops headings, heading
   underlines, comments, link targets, tables and non-prose directives
   (``.. toctree::``, ``.. index::`` ...), keeps the bodies of prose
   directives (``.. note::``, ``.. function::`` ...), rewrites inline markup
   (``:func:`len``` -> ``len()``, ````x```` -> ``x``, ```text <url>`_`` ->
   ``text``) and joins wrapped lines.
4. Keeps prose paragraphs of at least ``MIN_PARAGRAPH_CHARS`` characters and a
   minority of medium-sized code samples, then groups consecutive kept
   paragraphs of one document into records of roughly 1,500-4,000 characters.
5. Writes ``optimizer/resources/calibration/python-docs.jsonl`` (one ``{"text": ..., "source": ...}`` object per
   line, UTF-8, ``ensure_ascii=False``).

The output is deterministic: sorted file walk, fixed selection rules, no
randomness.  Only the Python standard library is used (plus the ``apt-get``
and ``dpkg-deb`` commands).

Usage::

    python scripts/build_calibration_data.py
    python scripts/build_calibration_data.py --deb /path/to/python3.11-doc_*.deb
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap

PACKAGE = "python3.11-doc"
SOURCES_DIR = "usr/share/doc/python3.11/html/_sources"
DOC_VERSION = "3.11"

# Documentation sections, in output order, with the maximum number of records
# taken from each document of the section (the first ones, i.e. the start of
# the document).  The cap spreads the budget over many documents so that the
# large library reference covers many modules instead of a few huge pages.
SECTIONS: list[tuple[str, int]] = [
    ("tutorial", 8),
    ("howto", 6),
    ("faq", 6),
    ("reference", 6),
    ("using", 4),
    ("extending", 4),
    ("library", 3),
]
# Individual documents that are mostly lists, tables or boilerplate.
EXCLUDE_DOCS = {
    "library/index.rst.txt",
    "howto/index.rst.txt",
    "faq/index.rst.txt",
    "reference/index.rst.txt",
    "tutorial/index.rst.txt",
    "using/index.rst.txt",
    "extending/index.rst.txt",
}

MIN_PARAGRAPH_CHARS = 200  # prose paragraphs shorter than this are dropped
MIN_CODE_CHARS = 200  # code samples are kept only within this size range ...
MAX_CODE_CHARS = 1200
MAX_CODE_PER_RECORD = 1  # ... and at most this many per record
RECORD_MIN_CHARS = 1500
RECORD_SOFT_CHARS = 3000  # close a record once it reaches this size
RECORD_MAX_CHARS = 4000
MAX_TOTAL_CHARS = 2_300_000  # hard safety cap on the whole set

# ---------------------------------------------------------------------------
# Directive classification
# ---------------------------------------------------------------------------

# Directives whose whole body is dropped.
SKIP_DIRECTIVES = {
    "toctree",
    "index",
    "include",
    "literalinclude",
    "highlight",
    "productionlist",
    "image",
    "figure",
    "csv-table",
    "list-table",
    "table",
    "tabularcolumns",
    "raw",
    "moduleauthor",
    "sectionauthor",
    "audit-event",
    "availability",
    "rubric",
    "contents",
    "testsetup",
    "testcleanup",
    "testoutput",
    "miscnews",
    "limited-api-list",
    "program",
    "module",
    "currentmodule",
    "c:module",
    "py:module",
    "py:currentmodule",
    "autosummary",
    "only",
    "sidebar",
    "epigraph",
    "program-output",
}
# Directives whose body is a code sample.
CODE_DIRECTIVES = {"code-block", "sourcecode", "code", "doctest", "testcode", "parsed-literal"}
# Admonitions: the body is prose, rendered with a short label in front.
ADMONITIONS = {
    "note": "Note:",
    "warning": "Warning:",
    "important": "Important:",
    "caution": "Caution:",
    "tip": "Tip:",
    "hint": "Hint:",
    "attention": "Attention:",
    "danger": "Danger:",
    "error": "Error:",
    "seealso": "See also:",
    "impl-detail": "CPython implementation detail:",
    "topic": "",
    "admonition": "",
    "glossary": "",
}
VERSION_DIRECTIVES = {
    "versionadded": "New in version {}.",
    "versionchanged": "Changed in version {}:",
    "deprecated": "Deprecated since version {}:",
    "deprecated-removed": "Deprecated since version {}, will be removed in version {}:",
}
# Everything else (function, method, class, attribute, data, c:function,
# cmdoption, opcode, describe ...) is treated as an object description: its
# signature is printed on its own line in front of the first body paragraph.

DIRECTIVE_RE = re.compile(r"^(\s*)\.\.\s+([A-Za-z][\w:-]*)::\s*(.*)$")
EXPLICIT_RE = re.compile(r"^(\s*)\.\.(\s|$)")
FIELD_RE = re.compile(r"^\s*:[\w -]+:(\s|$)")
ADORNMENT_CHARS = set("=-~^\"'`#*+_.:<>!$%&,/;?@\\|")
SIMPLE_TABLE_BORDER_RE = re.compile(r"^\s*=+( +=+)+\s*$")
BULLET_RE = re.compile(r"^([-*+\u2022]|#\.|\d+\.|\(?[a-zA-Z0-9]\)|[a-z]\.)\s+")


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def is_adornment(line: str) -> bool:
    s = line.strip()
    return len(s) >= 3 and len(set(s)) == 1 and s[0] in ADORNMENT_CHARS


# ---------------------------------------------------------------------------
# reST -> blocks
# ---------------------------------------------------------------------------


class Block:
    """A paragraph-level unit: kind is 'prose', 'code' or 'sig'."""

    __slots__ = ("kind", "lines", "prefix")

    def __init__(self, kind: str, lines: list[str], prefix: str = ""):
        self.kind = kind
        self.lines = lines
        self.prefix = prefix  # e.g. "Note:" or "Changed in version 3.3:"


def parse_rst(text: str) -> list[Block]:
    lines = text.expandtabs(8).splitlines()
    n = len(lines)
    blocks: list[Block] = []
    para: list[str] = []
    pending_prefix = ""  # label of an admonition / version note
    literal_after = None  # indent of a paragraph that ended with "::"

    def flush_para():
        nonlocal para, pending_prefix, literal_after
        if para:
            last = para[-1].rstrip()
            if last.endswith("::"):
                # The literal block must be indented relative to the text of
                # the paragraph (for a list item: relative to the item body).
                literal_after = indent_of(para[-1])
                bullet = BULLET_RE.match(para[-1].lstrip())
                if len(para) == 1 and bullet:
                    literal_after += bullet.end()
            blocks.append(Block("prose", para, pending_prefix))
            pending_prefix = ""
        para = []

    def skip_body(start: int, base: int) -> int:
        """Return the index of the first line after the body indented > base."""
        j = start
        while j < n and (not lines[j].strip() or indent_of(lines[j]) > base):
            j += 1
        return j

    def collect_code(start: int, base: int) -> int:
        j = skip_body(start, base)
        body = list(lines[start:j])
        while body and not body[-1].strip():
            body.pop()
        while body and not body[0].strip():
            body.pop(0)
        if body:
            blocks.append(Block("code", textwrap.dedent("\n".join(body)).splitlines()))
        return j

    i = 0
    while i < n:
        line = lines[i]
        stripped = line.strip()
        ind = indent_of(line)

        # Literal block introduced by a paragraph ending with "::".
        if literal_after is not None and stripped:
            base = literal_after
            literal_after = None
            if ind > base:
                i = collect_code(i, base)
                continue

        if not stripped:
            flush_para()
            i += 1
            continue

        # Explicit markup: directives, comments, targets, footnotes.
        m = DIRECTIVE_RE.match(line)
        if m and not para:
            flush_para()
            d_ind, name, arg = len(m.group(1)), m.group(2).lower(), m.group(3).strip()
            j = i + 1
            # Continuation lines of the argument (extra signatures) ...
            extra = []
            while (
                j < n
                and lines[j].strip()
                and indent_of(lines[j]) > d_ind
                and not FIELD_RE.match(lines[j])
            ):
                extra.append(lines[j].strip())
                j += 1
            # ... then directive options (":noindex:", ":synopsis: ...").
            while (
                j < n
                and lines[j].strip()
                and indent_of(lines[j]) > d_ind
                and FIELD_RE.match(lines[j])
            ):
                j += 1
            short = name.split(":")[-1] if name.startswith("py:") else name
            if short in SKIP_DIRECTIVES:
                i = skip_body(j, d_ind)
            elif short in CODE_DIRECTIVES:
                i = collect_code(j, d_ind)
            elif short in ADMONITIONS:
                label = ADMONITIONS[short]
                if short == "topic" or short == "admonition":
                    label = ""  # the argument is a title: drop it
                    extra = []
                elif arg or extra:
                    # Content that starts on the directive line.
                    para = [" " * (d_ind + 3) + " ".join([arg] + extra).strip()]
                pending_prefix = label if (para or _has_body(lines, j, d_ind)) else ""
                i = j
            elif short in VERSION_DIRECTIVES:
                parts = arg.split(None, 2 if short == "deprecated-removed" else 1)
                versions = parts[:2] if short == "deprecated-removed" else parts[:1]
                rest = " ".join(parts[len(versions) :] + extra).strip()
                fmt = VERSION_DIRECTIVES[short]
                versions += ["?"] * (fmt.count("{}") - len(versions))
                pending_prefix = fmt.format(*versions)
                if rest:
                    para = [" " * (d_ind + 3) + rest]
                elif not _has_body(lines, j, d_ind):
                    pending_prefix = ""  # a bare "New in version X." note
                i = j
            else:
                # Object description: keep the signature(s) as a 'sig' block.
                sigs = [s for s in [arg] + extra if s]
                if sigs:
                    blocks.append(Block("sig", sigs))
                i = j
            continue
        if EXPLICIT_RE.match(line) and not para:
            # Comment, hyperlink target, footnote or substitution definition.
            i = skip_body(i + 1, ind)
            continue

        # Section headings (optionally overlined) and transitions.
        if is_adornment(line) and not para:
            if i + 2 < n and lines[i + 1].strip() and lines[i + 2].strip() == stripped:
                i += 3  # overline + title + underline
            else:
                i += 1  # transition or stray underline
            continue
        if (
            not para
            and i + 1 < n
            and is_adornment(lines[i + 1])
            and len(lines[i + 1].strip()) >= len(stripped) - 2
        ):
            i += 2  # title + underline
            continue

        # Simple tables: skip until a border line followed by a blank line.
        if SIMPLE_TABLE_BORDER_RE.match(line) and not para:
            j = i + 1
            while j < n and not (
                SIMPLE_TABLE_BORDER_RE.match(lines[j]) and (j + 1 >= n or not lines[j + 1].strip())
            ):
                j += 1
            i = j + 1
            continue

        para.append(line)
        i += 1
    flush_para()
    return blocks


def _has_body(lines: list[str], j: int, base: int) -> bool:
    while j < len(lines) and not lines[j].strip():
        j += 1
    return j < len(lines) and indent_of(lines[j]) > base


# ---------------------------------------------------------------------------
# Inline markup
# ---------------------------------------------------------------------------

ROLE_RE = re.compile(r":(?:[a-z]+:)?([a-z][\w-]*):`((?:[^`\\]|\\.)+)`")
LITERAL_RE = re.compile(r"``(.+?)``")
LINK_RE = re.compile(r"`([^`<>]+?)\s*<[^`<>]*>`__?")
REF_RE = re.compile(r"`([^`]+?)`__?(?!\w)")
INTERP_RE = re.compile(r"`([^`]+?)`")
STRONG_RE = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
EMPH_RE = re.compile(r"(?<![\w*\\])\*(\S(?:[^*]*?\S)?)\*(?![\w*])")
FOOTNOTE_REF_RE = re.compile(r"\s*\[(?:#[\w-]*|\d+|\*)\]_")
SUBST_RE = re.compile(r"\|(version|release|today)\|")


def _role(m: re.Match) -> str:
    role, content = m.group(1), m.group(2)
    content = content.replace("\\", "")
    # ":ref:`text <label>`" -> "text"
    mm = re.match(r"^(.*?)\s*<([^<>]+)>$", content, re.S)
    explicit = mm is not None and mm.group(1).strip() != ""
    if explicit:
        content = mm.group(1)
    else:
        if content.startswith("!"):
            content = content[1:]
        if content.startswith("~"):
            content = content[1:].split(".")[-1]
    if role == "pep":
        return "PEP " + content
    if role == "rfc":
        return "RFC " + content
    if role == "abbr":
        return re.sub(r"\s*\(.*\)$", "", content)
    if role in ("func", "meth") and not explicit and not content.endswith(")"):
        return content + "()"
    return content


def clean_inline(text: str) -> str:
    # Protect inline literals from further rewriting.
    literals: list[str] = []

    def _protect(m: re.Match) -> str:
        literals.append(m.group(1))
        return f"\x00{len(literals) - 1}\x00"

    text = LITERAL_RE.sub(_protect, text)
    text = ROLE_RE.sub(_role, text)
    text = LINK_RE.sub(r"\1", text)
    text = REF_RE.sub(r"\1", text)
    text = INTERP_RE.sub(r"\1", text)
    text = FOOTNOTE_REF_RE.sub("", text)
    text = STRONG_RE.sub(r"\1", text)
    text = EMPH_RE.sub(r"\1", text)
    text = SUBST_RE.sub(DOC_VERSION, text)
    text = text.replace(" |nbsp| ", "\u00a0").replace("|nbsp|", "\u00a0")
    text = text.replace("\\ ", "")
    text = re.sub(r"\\(.)", r"\1", text)
    text = re.sub(r"\x00(\d+)\x00", lambda m: literals[int(m.group(1))], text)
    return text


def render_prose(lines: list[str]) -> str:
    """Join wrapped lines; list items and definition terms start new lines."""
    base = min(indent_of(line) for line in lines)
    is_list = BULLET_RE.match(lines[0].strip()) is not None
    out: list[str] = []
    cur: list[str] = []
    for k, line in enumerate(lines):
        s = line.strip()
        new_item = is_list and k > 0 and indent_of(line) == base and BULLET_RE.match(s)
        # Definition list: a term line followed by a more-indented definition.
        term_before = (
            not is_list and k == 1 and indent_of(lines[0]) == base and indent_of(line) > base
        )
        if (new_item or term_before) and cur:
            out.append(" ".join(cur))
            cur = []
        cur.append(s)
    if cur:
        out.append(" ".join(cur))
    if is_list:  # auto-numbered items ("#.") -> "1.", "2.", ...
        number = 0
        for k, item in enumerate(out):
            if item.startswith("#."):
                number += 1
                out[k] = f"{number}." + item[2:]
    text = "\n".join(clean_inline(o) for o in out)
    # "Example::" -> "Example:", "text ::" -> "text", a lone "::" -> "".
    text = re.sub(r"\s+::$", "", text)
    text = re.sub(r"::$", ":", text)
    text = re.sub(r"[ \t]+", " ", text)
    return text.strip()


# ---------------------------------------------------------------------------
# Blocks -> paragraphs -> records
# ---------------------------------------------------------------------------


def looks_like_markup(text: str) -> bool:
    """Reject paragraphs that still look like tables or markup."""
    if re.search(r"^\s*[+|][-=+|]", text, re.M):
        return True  # grid table
    if re.search(r"^\s*\.\. ", text, re.M):
        return True
    return bool(ROLE_RE.search(text))


def document_paragraphs(rst: str) -> list[tuple[str, str]]:
    """Return the kept ('prose'|'code', text) paragraphs of one document."""
    blocks = parse_rst(rst)
    paras: list[tuple[str, str]] = []
    sig: list[str] = []
    for b in blocks:
        if b.kind == "sig":
            sig = [clean_inline(s) for s in b.lines]
            continue
        if b.kind == "code":
            code = "\n".join(line.rstrip() for line in b.lines).strip("\n")
            if MIN_CODE_CHARS <= len(code) <= MAX_CODE_CHARS and "\x00" not in code:
                paras.append(("code", code))
            continue
        first = b.lines[0].strip()
        if first.startswith(">>>"):
            code = textwrap.dedent("\n".join(b.lines)).strip("\n")
            if MIN_CODE_CHARS <= len(code) <= MAX_CODE_CHARS:
                paras.append(("code", code))
            continue
        if FIELD_RE.match(b.lines[0]):
            continue  # field list (":Author: ...")
        text = render_prose(b.lines)
        if b.prefix:
            sep = "\n" if BULLET_RE.match(text) else " "
            text = b.prefix + sep + text
        if sig:
            text = "\n".join(sig) + "\n" + text
            sig = []
        if len(text) >= MIN_PARAGRAPH_CHARS and not looks_like_markup(text):
            paras.append(("prose", text))
    return paras


def split_long(text: str, limit: int) -> list[str]:
    """Split an over-long paragraph at sentence boundaries."""
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z(])", text)
    chunks, cur = [], ""
    for s in sentences:
        if cur and len(cur) + 1 + len(s) > limit:
            chunks.append(cur)
            cur = s
        else:
            cur = f"{cur} {s}" if cur else s
    if cur:
        chunks.append(cur)
    return [c for c in chunks if len(c) <= limit]


def group_records(paras: list[tuple[str, str]]) -> list[str]:
    records: list[str] = []
    cur: list[str] = []
    cur_len = 0
    cur_code = 0

    def flush():
        nonlocal cur, cur_len, cur_code
        if cur_len >= RECORD_MIN_CHARS and any(True for _ in cur):
            records.append("\n\n".join(cur))
        cur, cur_len, cur_code = [], 0, 0

    for kind, text in paras:
        pieces = (
            [text]
            if len(text) <= RECORD_MAX_CHARS
            else (split_long(text, RECORD_SOFT_CHARS) if kind == "prose" else [])
        )
        for piece in pieces:
            if kind == "code" and (cur_code >= MAX_CODE_PER_RECORD or not cur):
                continue  # a record never starts with code; few samples each
            add = len(piece) + (2 if cur else 0)
            if cur and cur_len + add > RECORD_MAX_CHARS:
                flush()
                if kind == "code":
                    continue
                add = len(piece)
            cur.append(piece)
            cur_len += add
            cur_code += kind == "code"
            if cur_len >= RECORD_SOFT_CHARS:
                flush()
    # Leftover: append to the previous record when it fits, otherwise keep it
    # only if it is long enough on its own.
    if cur:
        tail = "\n\n".join(cur)
        if (
            cur_len < RECORD_MIN_CHARS
            and records
            and len(records[-1]) + 2 + len(tail) <= RECORD_MAX_CHARS
        ):
            records[-1] += "\n\n" + tail
        else:
            flush()
    return records


# ---------------------------------------------------------------------------
# Package handling and main
# ---------------------------------------------------------------------------


def fetch_package(workdir: str, deb: str | None) -> tuple[str, str]:
    """Download (unless given) and unpack the .deb; return (root, version)."""
    if deb is None:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=workdir, check=True)
        debs = sorted(glob.glob(os.path.join(workdir, f"{PACKAGE}_*.deb")))
        if not debs:
            sys.exit(f"apt-get download produced no {PACKAGE} .deb (try `apt-get update` first)")
        deb = debs[-1]
    version = subprocess.run(
        ["dpkg-deb", "-f", deb, "Version"], check=True, capture_output=True, text=True
    ).stdout.strip()
    root = os.path.join(workdir, "root")
    subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
    return root, version


def select_documents(root: str) -> list[tuple[str, int]]:
    """(path relative to SOURCES_DIR, record cap) of each document, in order."""
    src = os.path.join(root, SOURCES_DIR)
    if not os.path.isdir(src):
        sys.exit(f"{SOURCES_DIR} not found in the package")
    chosen = []
    for section, cap in SECTIONS:
        docs = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(src, section)):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.endswith(".rst.txt") or fn.endswith(".txt"):
                    rel = os.path.relpath(os.path.join(dirpath, fn), src)
                    if rel.replace(os.sep, "/") not in EXCLUDE_DOCS:
                        docs.append(rel.replace(os.sep, "/"))
        chosen.extend((rel, cap) for rel in sorted(docs))
    return chosen


def build(root: str) -> list[dict]:
    out: list[dict] = []
    total = 0
    for rel, cap in select_documents(root):
        path = os.path.join(root, SOURCES_DIR, rel)
        with open(path, encoding="utf-8") as f:
            rst = f.read()
        records = group_records(document_paragraphs(rst))[:cap]
        for text in records:
            if total + len(text) > MAX_TOTAL_CHARS:
                return out
            out.append({"text": text, "source": f"{SOURCES_DIR}/{rel}"})
            total += len(text)
    return out


def main() -> None:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shipped = os.path.join(repo, "optimizer", "resources", "calibration", "python-docs.jsonl")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deb", help="use this python3.11-doc .deb instead of downloading it")
    ap.add_argument("--output", default=shipped)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="python-docs-") as tmp:
        root, version = fetch_package(tmp, os.path.abspath(args.deb) if args.deb else None)
        records = build(root)

    with open(args.output, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    lengths = [len(r["text"]) for r in records]
    print(
        f"{PACKAGE} {version}: wrote {len(records)} records, "
        f"{sum(lengths):,} characters, "
        f"{len({r['source'] for r in records})} documents -> {args.output}"
    )
    if lengths:
        print(
            f"record length min/median/max: {min(lengths)}/"
            f"{int(statistics.median(lengths))}/{max(lengths)}"
        )


if __name__ == "__main__":
    main()
