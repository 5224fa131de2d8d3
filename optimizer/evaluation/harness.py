"""lm-eval in-process: per-document scores of a model (or a served model's client) on a suite.

Local tasks ship as package data in ``optimizer/resources/evals/tasks`` (offline copies of
real benchmarks, see optimizer/resources/evals/README.md); any built-in lm-eval task name
works too where the hub is reachable. Settings that change
scores (max_length, float32 softmax, batch size) are pinned so that a baseline and a
candidate are evaluated identically. lm-eval's response cache is never used: it is keyed by
request, not by model, so a candidate could be served the baseline's answers.

The library leaves process-wide settings alone: the CLI (and the tests) set
``HF_DATASETS_OFFLINE``; a caller that needs it offline sets it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, RootModel

from optimizer.evaluation.suite import GREEDY_AGREEMENT, Suite, SuiteTask
from optimizer.resources import TASKS as LOCAL_TASKS  # the offline task definitions (package data)

#: How loglikelihoods are computed (part of the baseline cache key): shared contexts, see
#: optimizer/evaluation/prefix_sharing.py.
SCORING = "prefix-sharing-v1"

#: What :func:`score_suite` scores: an lm-eval ``LM`` (e.g. a served model's client), or a
#: ``(model, tokenizer)`` pair of a Hugging Face model, wrapped in the prefix-sharing HFLM.
Scorable = Any


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n))."""
    n = len(values)
    if not n:
        raise ValueError("no values")
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    return mean, math.sqrt(var / n)


class TaskScores(BaseModel):
    """One metric of one task, per document (``{task}:{doc_id}`` -> score) and summarised."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: float
    stderr: float
    n: int
    docs: dict[str, float]
    #: lm-eval's hash of each document's content, to tell that two evaluations scored the
    #: same document (None where lm-eval gives none).
    doc_hashes: dict[str, str | None] = {}
    #: Each document's generated text, as the model returned it (before lm-eval's filters):
    #: kept for ``greedy_agreement`` only, which compares them across models.
    outputs: dict[str, str] = {}

    @classmethod
    def from_docs(
        cls,
        docs: dict[str, float],
        doc_hashes: dict[str, str | None] | None = None,
        outputs: dict[str, str] | None = None,
    ) -> TaskScores:
        value, stderr = mean_stderr(list(docs.values()))
        return cls(
            value=value,
            stderr=stderr,
            n=len(docs),
            docs=docs,
            doc_hashes=doc_hashes or {},
            outputs=outputs or {},
        )


class SuiteScores(RootModel[dict[str, TaskScores]]):
    """Scores per suite metric (``task/metric`` -> :class:`TaskScores`); serialises as that
    mapping (the baseline cache's format)."""

    model_config = ConfigDict(frozen=True)

    def __getitem__(self, key: str) -> TaskScores:
        return self.root[key]

    def __contains__(self, key: object) -> bool:
        return key in self.root

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]
        return iter(self.root)

    def __len__(self) -> int:
        return len(self.root)

    def items(self):
        return self.root.items()

    def means(self) -> dict[str, float]:
        """Each metric's mean score."""
        return {k: v.value for k, v in self.root.items()}


def task_data_dir(include_path: Path = LOCAL_TASKS) -> Path:
    """Where the local tasks' loader reads its data (``OPTIMIZER_EVALS_DATA_DIR`` moves it,
    see optimizer/resources/evals/tasks/loader.py)."""
    override = os.environ.get("OPTIMIZER_EVALS_DATA_DIR")
    if override and include_path == LOCAL_TASKS:
        return Path(override)
    return include_path.parent / "data"


def task_fingerprint(
    task: str, include_path: Path | None = LOCAL_TASKS, suite_tasks: str | None = None
) -> str:
    """Identity of a task's prompts and data: its YAML, helpers and data files (local tasks,
    and a suite's own ``tasks_dir``), or its name (built-in lm-eval tasks, versioned by the
    lm-eval version in the cache key)."""
    h = hashlib.sha256(task.encode())
    if suite_tasks is not None:
        from optimizer.rundir import sha256_tree

        h.update(b"suite tasks:" + sha256_tree(Path(suite_tasks)).encode())
    if include_path is not None and include_path.is_dir():
        for f in sorted(include_path.glob("*")):
            if f.is_file():
                h.update(f.name.encode() + f.read_bytes())
        data = task_data_dir(include_path)
        for f in sorted(data.glob("*.jsonl")) if data.is_dir() else []:
            h.update(f.name.encode() + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def hf_lm(model: Any, tokenizer: Any, *, batch_size: int | str, max_length: int) -> Any:
    """lm-eval's HFLM around an in-memory model, scoring shared contexts once. ``auto`` on a
    model wholly on one GPU is measured (prefix_sharing for multiple choice, lm-eval's own
    detection for generation); elsewhere it is :data:`DEFAULT_BATCH_SIZE`."""
    from optimizer import batching
    from optimizer.evaluation.prefix_sharing import PrefixSharingHFLM
    from optimizer.evaluation.suite import DEFAULT_BATCH_SIZE

    if batching.gpu_device(model) is None:
        batch_size = batching.fixed(batch_size, DEFAULT_BATCH_SIZE)
    return PrefixSharingHFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_length=max_length,
        softmax_dtype="float32",
    )


@contextlib.contextmanager
def _rng_restored():
    """Python's, NumPy's and torch's global random states as they were before."""
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _task_manager(tasks: list[str], include_path: Path | list[Path] | None) -> Any:
    from lm_eval.tasks import TaskManager

    paths = [include_path] if isinstance(include_path, (Path, str)) else list(include_path or [])
    return TaskManager(
        include_path=[str(p) for p in paths] or None,
        # lm-eval's own tasks (hub data) only when asked for: indexing them costs seconds.
        include_defaults=not paths or any(not t.startswith("local_") for t in tasks),
    )


#: lm-eval request types that need the log-probability of prompt tokens (``echo`` +
#: ``logprobs`` from a server); ``generate_until`` needs generated text only.
LOGPROB_OUTPUT_TYPES = frozenset({"loglikelihood", "loglikelihood_rolling", "multiple_choice"})


def output_types(
    tasks: list[str], include_path: Path | list[Path] | None = LOCAL_TASKS
) -> dict[str, set[str]]:
    """Each task's lm-eval ``output_type`` (a group's: its members'), read from the task
    configs without loading data; ``{"unknown"}`` where the config does not say (a task
    written in Python). An unregistered name raises :class:`OptimizerError`."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    from optimizer.errors import OptimizerError

    manager = _task_manager(tasks, include_path)
    index = manager.task_index

    def types_of(name: str, seen: frozenset[str]) -> set[str]:
        entry = index.get(name)
        if entry is None:
            raise OptimizerError(f"{name!r} is not an lm-eval task here (not registered)")
        if entry.kind in (Kind.GROUP, Kind.TAG):
            members = [m for m in _members(entry, index) if m not in seen]
            return set().union(*(types_of(m, seen | {name}) for m in members))
        cfg = load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else entry.cfg
        if not cfg or "class" in cfg:
            return {"unknown"}
        # lm-eval's TaskConfig default
        return {cfg.get("output_type", "generate_until")}

    return {t: types_of(t, frozenset()) for t in tasks}


def _members(entry: Any, index: dict[str, Any]) -> list[str]:
    """The task names a group or tag entry stands for."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    if entry.kind == Kind.TAG:
        return sorted(n for n, e in index.items() if entry.name in (e.tags or set()))
    cfg = load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else entry.cfg or {}
    members = cfg.get("task") or []
    names = []
    for m in members if isinstance(members, list) else [members]:
        name = m.get("task") if isinstance(m, dict) else m
        if isinstance(name, str):
            names.append(name)
    return names


def prompt_logprob_tasks(suite: Suite, include_path: Path | None = LOCAL_TASKS) -> list[str]:
    """The suite's tasks that need prompt-token logprobs (loglikelihood or multiple-choice
    tasks, and tasks whose type cannot be read), in suite order."""
    names = list(dict.fromkeys(t.task for t in suite.tasks))
    paths = [p for p in (include_path, suite.tasks_dir) if p is not None]
    types = output_types(names, [Path(p) for p in paths])
    return [t for t in names if types[t] & (LOGPROB_OUTPUT_TYPES | {"unknown"})]


def evaluate_tasks(
    lm: Any,
    tasks: list[str],
    *,
    limit: int | None = None,
    num_fewshot: int | None = None,
    include_path: Path | list[Path] | None = LOCAL_TASKS,
    log_samples: bool = False,
    gen_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One ``lm_eval.simple_evaluate`` with the pinned settings; returns ``{"results": {task:
    {metric: value, metric_stderr: value}}, "samples": {task: [...]}}`` (samples only with
    ``log_samples``). ``gen_kwargs`` update the generation settings of the generative
    tasks (lm-eval leaves the others alone)."""
    import lm_eval

    manager = _task_manager(tasks, include_path)
    with _rng_restored():  # simple_evaluate seeds the global RNGs; the caller keeps its own
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=log_samples,
            gen_kwargs=gen_kwargs or None,
            use_cache=None,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
    results: dict[str, dict[str, float | None]] = {}
    for task, metrics in out["results"].items():
        clean: dict[str, float | None] = {}
        for key, value in metrics.items():
            if "," not in key:
                continue
            name = key.split(",")[0]
            try:
                number = float(value)
            except (TypeError, ValueError):  # lm-eval writes "N/A" for unavailable stderr
                number = None
            clean[name] = None if number is None or math.isnan(number) else number
        results[task] = clean
    return {"results": results, "samples": out.get("samples", {}) if log_samples else {}}


def score_suite(
    target: Scorable, suite: Suite, *, include_path: Path | None = LOCAL_TASKS
) -> SuiteScores:
    """Per-document scores of every suite metric. ``target`` is an lm-eval ``LM`` or a
    ``(model, tokenizer)`` pair; tasks with the same limit and shots share one lm-eval run."""
    if isinstance(target, tuple):
        model, tokenizer = target
        lm = hf_lm(model, tokenizer, batch_size=suite.batch_size, max_length=suite.max_length)
    else:
        lm = target
    groups: dict[tuple, list[SuiteTask]] = {}
    for t in suite.tasks:
        groups.setdefault((*suite.settings(t), t.max_gen_toks), []).append(t)
    out: dict[str, TaskScores] = {}
    for (limit, shots, max_gen_toks), tasks in groups.items():
        res = evaluate_tasks(
            lm,
            sorted({t.task for t in tasks}),
            limit=limit,
            num_fewshot=shots,
            include_path=[p for p in (include_path, suite.tasks_dir) if p is not None],
            log_samples=True,
            gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
        )
        for t in tasks:
            out[t.key] = _task_scores(t, res["samples"])
    return SuiteScores(out)


def _task_scores(t: SuiteTask, samples_by_task: dict[str, list[dict]]) -> TaskScores:
    """One suite metric's per-document scores from lm-eval's logged samples. A task with
    several filters logs each document once per filter: the metric is then read from the
    first filter's (a suite metric is one number per document)."""
    docs: dict[str, float] = {}
    hashes: dict[str, str | None] = {}
    outputs: dict[str, str] = {}
    for task_name, samples in samples_by_task.items():
        if task_name != t.task and not task_name.startswith(f"{t.task}_"):
            continue  # a group (local_mmlu) reports its subtasks' samples
        for s in samples:
            key = f"{task_name}:{s['doc_id']}"
            if key in docs:
                continue  # the same document under another filter
            if t.metric == GREEDY_AGREEMENT:
                text = _generation(s)
                if text is None:
                    raise RuntimeError(
                        f"{t.key}: {task_name} is not a generative task (greedy_agreement "
                        "compares generated text; use an output_type: generate_until task)"
                    )
                outputs[key] = text
                docs[key] = 1.0  # a model agrees with itself; verdict.py compares the outputs
            else:
                if t.metric not in s:
                    raise RuntimeError(
                        f"lm-eval reports no per-document {t.metric!r} for {task_name} "
                        f"(it has {sorted(k for k in s if isinstance(s[k], int | float))})"
                    )
                docs[key] = float(s[t.metric])
            hashes[key] = s.get("doc_hash")
    if not docs:
        raise RuntimeError(f"lm-eval returned no per-document {t.metric} for {t.task}")
    return TaskScores.from_docs(docs, hashes, outputs)


def _generation(sample: dict) -> str | None:
    """The raw generated text of a generate_until sample (None for other request types)."""
    responses = sample.get("resps") or []
    first = responses[0] if responses else None
    if isinstance(first, list):
        first = first[0] if first else None
    return first if isinstance(first, str) else None
