#!/usr/bin/env python3
"""Offline self-check for the local_* lm-eval tasks in optimizer/resources/evals/tasks.

Run from any directory (it does not depend on the CWD):

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python /path/to/scripts/verify_evals.py [--skip-run]

Checks, in order:
  1. every *.yaml under evals/tasks parses with lm-eval's own loader (including
     `!function` resolution) and is registered by TaskManager -- lm-eval's index
     silently skips YAMLs it cannot parse, so this is checked explicitly;
  2. data files match the sha256 in data/MANIFEST.json; with no limit,
     len(task.eval_docs) equals the manifest row count and the few-shot split
     is present where configured;
  3. prompt parity: for every shipped doc, the local task renders the same
     context / choices / target as lm-eval's built-in task config run over the
     same rows (helpers in tasks/utils.py vs the built-in ones);
  4. a tiny random Llama (byte-level BPE trained on the shipped text) is
     evaluated on all tasks with limit=20 and log_samples=True; acc (and
     acc_norm where configured) must be present and samples logged per doc.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# The shipped tasks and data: package data of optimizer (optimizer/resources/evals).
EVALS = Path(__file__).resolve().parents[1] / "optimizer" / "resources" / "evals"
TASKS_DIR = EVALS / "tasks"
DATA_DIR = EVALS / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "HF_DATASETS_CACHE" not in os.environ:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="evals_hfds_cache_")

# local task -> (built-in task whose prompt it must reproduce, split it evaluates)
PARITY = {
    "local_hellaswag": "hellaswag",
    "local_arc_easy": "arc_easy",
    "local_arc_challenge": "arc_challenge",
    "local_piqa": "piqa",
    "local_winogrande": "winogrande",
    "local_boolq": "boolq",
}
ACC_NORM_TASKS = {"local_hellaswag", "local_arc_easy", "local_arc_challenge", "local_piqa"}


def fail(msg: str) -> None:
    print(f"FAIL: {msg}")
    sys.exit(1)


def check_registration():
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    registered = set(tm.all_tasks)
    names = []
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        try:
            cfg = load_yaml(path, resolve_func=True)  # raises on YAML / !function errors
        except Exception as err:  # noqa: BLE001
            fail(f"{path.name} does not load: {err!r}")
        name = cfg.get("group") or cfg.get("task")
        if name not in registered:
            fail(f"{path.name} ({name}) parsed but is not registered by TaskManager")
        names.append(name)
    print(f"[1] {len(names)} YAML files parse and are registered: {', '.join(names)}")
    return tm, names


def check_counts(tm, names):
    import hashlib

    manifest = json.loads((DATA_DIR / "MANIFEST.json").read_text())["files"]
    for fname, meta in manifest.items():
        if hashlib.sha256((DATA_DIR / fname).read_bytes()).hexdigest() != meta["sha256"]:
            fail(f"data/{fname} does not match the sha256 in MANIFEST.json (rebuild with build_data.py)")
    tasks = {}
    for name in names:  # load each registered name on its own (groups expand to their tasks)
        tasks.update(tm.load(name)["tasks"])
    counts = {}
    for name, task in sorted(tasks.items()):
        files = task.config.dataset_kwargs["local_files"]
        eval_split = task.config.test_split or task.config.validation_split
        expected = manifest[files[eval_split]]["rows"]
        got = len(task.eval_docs)
        if got != expected:
            fail(f"{name}: {got} eval docs, manifest says {expected}")
        fs = task.config.fewshot_split
        if fs is not None:
            n_fs = len(task.dataset[fs])
            if n_fs != manifest[files[fs]]["rows"]:
                fail(f"{name}: few-shot split {fs} has {n_fs} docs")
        counts[name] = got
    print(f"[2] data sha256 + eval doc counts match MANIFEST.json: {counts} (total {sum(counts.values())})")
    return tasks, counts


def check_parity(tasks):
    """Render every doc with the local task and with the built-in task config."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    builtin_tm = TaskManager()
    index = builtin_tm.task_index
    for local_name, builtin_name in PARITY.items():
        local = tasks[local_name]
        cfg = load_yaml(index[builtin_name].yaml_path, resolve_func=True)
        docs = local.dataset[local.config.test_split or local.config.validation_split]
        if builtin_name == "boolq":  # super_glue field name for the shipped google/boolq rows
            docs = docs.map(lambda d: {"label": int(d["answer"])})
        split = cfg.get("test_split") or cfg.get("validation_split")
        cfg.update(
            task=f"parity_{builtin_name}",
            dataset_path=None,
            dataset_name=None,
            dataset_kwargs=None,
            custom_dataset=lambda _docs=docs, _split=split, **_: {_split: _docs},
            training_split=None,
            validation_split=None if cfg.get("test_split") else split,
            fewshot_split=None,
        )
        ref = ConfigurableTask(config=cfg)
        if len(ref.eval_docs) != len(local.eval_docs):
            fail(f"parity {local_name}: doc count differs")
        if ref.config.metric_list != local.config.metric_list:
            fail(f"parity {local_name}: metric_list differs")
        for i, (d_ref, d_loc) in enumerate(zip(ref.eval_docs, local.eval_docs)):
            a = (ref.doc_to_text(d_ref), ref.doc_to_choice(d_ref), ref.doc_to_target(d_ref))
            b = (local.doc_to_text(d_loc), local.doc_to_choice(d_loc), local.doc_to_target(d_loc))
            if a != b:
                fail(f"parity {local_name} doc {i}: built-in {a!r} != local {b!r}")
        print(f"[3] {local_name}: prompts/choices/targets identical to built-in `{builtin_name}` on {len(ref.eval_docs)} docs")

    # MMLU: compare against the built-in per-subject config (prompt + description + few-shot).
    for local_name, local in tasks.items():
        if not local_name.startswith("local_mmlu_"):
            continue
        subject = local_name[len("local_mmlu_"):]
        cfg = load_yaml(index[f"mmlu_{subject}"].yaml_path, resolve_func=True)
        docs = {"test": local.dataset["test"], "dev": local.dataset["dev"]}
        cfg.update(task=f"parity_mmlu_{subject}", dataset_path=None, dataset_name=None,
                   custom_dataset=lambda _d=docs, **_: _d)
        ref = ConfigurableTask(config=cfg)
        ref.set_config("num_fewshot", 5)
        local.set_config("num_fewshot", 5)
        for i, (d_ref, d_loc) in enumerate(zip(ref.eval_docs, local.eval_docs)):
            a = (ref.fewshot_context(d_ref, num_fewshot=5), ref.doc_to_choice(d_ref), ref.doc_to_target(d_ref))
            b = (local.fewshot_context(d_loc, num_fewshot=5), local.doc_to_choice(d_loc), local.doc_to_target(d_loc))
            if a != b:
                fail(f"parity {local_name} doc {i}: 5-shot context differs")
            if b[0].count("\nAnswer:") != 6 or not b[0].startswith("The following are"):
                fail(f"parity {local_name} doc {i}: 5-shot context is malformed: {b[0][:200]!r}")
        local.set_config("num_fewshot", 0)
        print(f"[3] {local_name}: 5-shot contexts identical to built-in `mmlu_{subject}` on {len(ref.eval_docs)} docs")


def tiny_model():
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    def corpus():
        for path in sorted(DATA_DIR.glob("*.jsonl")):
            with path.open(encoding="utf-8") as fh:
                for line in fh:
                    yield line

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus(),
        trainers.BpeTrainer(vocab_size=4096, special_tokens=["<s>", "</s>", "<pad>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    return model, tok


def check_run(tm, names, counts, limit: int):
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny_model()
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=16, max_length=512)
    t0 = time.perf_counter()
    # A group and its own subtasks cannot be requested together (lm-eval raises
    # "Duplicate task"), so run the MMLU subjects through the local_mmlu group.
    run_names = [n for n in names if not n.startswith("local_mmlu_")]
    res = lm_eval.simple_evaluate(model=lm, tasks=run_names, task_manager=tm, limit=limit, log_samples=True)
    elapsed = time.perf_counter() - t0
    for name in counts:
        r = res["results"][name]
        need = ["acc,none"] + (["acc_norm,none"] if name in ACC_NORM_TASKS else [])
        missing = [k for k in need if k not in r]
        if missing:
            fail(f"{name}: missing {missing} in results {r}")
        n_samples = len(res["samples"][name])
        if n_samples != min(limit, counts[name]):
            fail(f"{name}: {n_samples} logged samples")
        shown = {k.split(",")[0]: round(v, 3) for k, v in r.items() if k in need}
        print(f"[4] {name}: {shown} samples={n_samples}")
    if "local_mmlu" in res["results"]:
        print(f"[4] local_mmlu (group): acc={res['results']['local_mmlu']['acc,none']:.3f}")
    print(f"[4] simple_evaluate({run_names}) = {len(counts)} leaf tasks, limit={limit}: {elapsed:.1f}s wall")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-run", action="store_true", help="skip the tiny-model evaluation")
    ap.add_argument("--limit", type=int, default=20)
    args = ap.parse_args()
    tm, names = check_registration()
    tasks, counts = check_counts(tm, names)
    check_parity(tasks)
    if not args.skip_run:
        check_run(tm, names, counts, args.limit)
    print("OK")


if __name__ == "__main__":
    main()
