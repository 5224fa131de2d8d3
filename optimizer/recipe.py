"""Recipes: the pydantic schema, YAML loading with line numbers, ``--set`` overrides.

A recipe is checked completely before any model is loaded: unknown keys (with a
did-you-mean), wrong types, unknown stage types, impossible stage orders and missing files all
come back together as a :class:`~optimizer.errors.RecipeError`, each problem naming the file,
line and key path.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from optimizer import batching
from optimizer.errors import OptimizerError, Problem, RecipeError
from optimizer.plan import Environment, ModelPlan
from optimizer.registry import did_you_mean
from optimizer.stages import STAGES
from optimizer.stages.base import Stage

KeyPath = tuple[str | int, ...]

# Limits on what a recipe file may be. A recipe is a small hand-written config (the shipped
# ones are ~1 KiB, ~100 values, ~6 levels deep); anything far beyond that is a mistake or a
# hostile file, and is refused with one message before it can exhaust time or memory.
#: Bytes of a recipe file.
MAX_RECIPE_BYTES = 1 << 20
#: Values (mapping keys, values and list items) of the recipe once YAML aliases are expanded.
#: Aliases (``&name`` / ``*name``) stay allowed -- sharing a ``data:`` section between two
#: stages is legitimate -- but a "billion laughs" file (aliases of aliases of lists of
#: aliases) expands exponentially: it is measured on the composed node graph (linear in the
#: file) and refused before anything walks the expansion.
MAX_RECIPE_VALUES = 10_000
#: Nesting depth of mappings and lists (deeper YAML cannot even be composed: RecursionError).
MAX_RECIPE_DEPTH = 32
#: Integers beyond this fit no setting (torch and numpy take int64 at most).
MAX_INT = 2**63 - 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: Units of a memory size: decimal (GB = 10**9 bytes) and binary (GiB = 2**30), the ones
#: accelerate's ``max_memory`` takes. Case matters: accelerate reads "20gb" as gigabits.
MEMORY_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}
_MEMORY_SIZE = re.compile(r"(\d+(?:\.\d+)?) ?([A-Za-z]+)")
#: Far above any machine (a typo such as "20000TiB" is refused, not passed on).
MAX_MEMORY_BYTES = 2**50


def memory_bytes(text: str) -> int:
    """``"20GiB"`` -> 21474836480. ValueError with a readable message for anything else."""
    if not isinstance(text, str):
        number = isinstance(text, int | float) and not isinstance(text, bool)
        raise ValueError(
            f"{repr(text)[:40]} "
            + ("has no unit" if number else "is not a memory size")
            + ": write one such as '20GiB'"
        )
    match = _MEMORY_SIZE.fullmatch(text.strip())
    if match is None or match.group(2) not in MEMORY_UNITS:
        unit = match.group(2) if match else ""
        near = next((u for u in MEMORY_UNITS if u.lower() == unit.lower()), None)
        raise ValueError(
            f"{text[:40]!r} is not a memory size: a number and one of the units "
            f"{', '.join(MEMORY_UNITS)}, e.g. '20GiB'"
            + (f" (case matters: did you mean {near!r}?)" if near else "")
        )
    size = int(float(match.group(1)) * MEMORY_UNITS[match.group(2)])
    if size <= 0:
        raise ValueError(f"{text!r}: must be more than 0 bytes")
    if size > MAX_MEMORY_BYTES:
        raise ValueError(f"{text!r}: more memory than any machine has (at most 1 PiB)")
    return size


class MaxMemory(Strict):
    """Where the model's weights may go: at most ``gpu`` on each GPU, the rest in ``cpu``
    (host memory, offloaded: weights move to the GPU layer by layer as they are used)."""

    gpu: str | None = Field(
        None,
        description="per GPU, e.g. '20GiB': the most of each GPU's memory the run is to use. "
        "The weights are placed in 90 % of it (accelerate's max_memory, which keeps room for "
        "the largest layer an offloaded forward brings in), the rest is left for activations; "
        "a calibration batch whose activations need more goes over. Unset: what is free",
    )
    cpu: str | None = Field(
        None,
        description="host memory for the weights that do not fit on the GPUs, e.g. '200GiB'. "
        "Unset: 90 % of what is available. Weights that fit neither are read from the "
        "checkpoint's files as they are needed (transformers' disk offload: slow)",
    )

    @field_validator("gpu", "cpu", mode="before")
    @classmethod
    def _size(cls, value: Any) -> str | None:
        if value is not None:
            memory_bytes(value)
        return value

    def as_bytes(self) -> dict[str, int]:
        """``{"gpu": bytes, "cpu": bytes}`` for the keys that are set."""
        return {k: memory_bytes(v) for k, v in (("gpu", self.gpu), ("cpu", self.cpu)) if v}


class ModelSpec(Strict):
    source: str = Field(
        description="Hugging Face hub id, a local HF checkpoint directory, or builtin:<name>"
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype of every saved and exported artifact"
    )
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="dtype of calibration, training and evaluation math; auto: `dtype`, except "
        "float32 on a CPU without native bf16/fp16 math (no AVX512-BF16/AMX), where half "
        "precision is emulated and several times slower",
    )
    trust_remote_code: bool = False
    max_memory: MaxMemory | None = Field(
        None,
        description="cap the memory the model's weights take on each GPU (and in host "
        "memory): a model larger than one GPU is sharded over the GPUs of this host and what "
        "does not fit is offloaded to host memory (device_map 'auto'). It changes where the "
        "weights are, not the numbers: fingerprints and baselines do not depend on it. "
        "Applies where the stages load the model (ptq, export, ...), not to the gate's own "
        "copies; a single process only. On a machine without a CUDA GPU it is accepted and "
        "does nothing (the model is in host memory anyway)",
    )


class CalibrationSpec(Strict):
    dataset: str = Field(
        description="local .jsonl/.json/.txt file (relative to the recipe), or a hub dataset name"
    )
    text_field: str = "text"
    subset: str | None = None
    split: str = "train"
    # Bounds far above any real calibration (hundreds to a few thousand samples), low enough
    # that a typo such as `seq_len: 1e30` is refused before tokenizing for hours.
    num_samples: Annotated[int, Field(gt=0, le=65_536)] = 512
    seq_len: Annotated[int, Field(gt=0, le=1_048_576)] = 512  # 2**20 tokens
    batch_size: Annotated[
        int | Literal["auto"], PlainValidator(lambda v: batching.parse(v, 4_096))
    ] = Field(
        "auto",
        description="windows per calibration forward; auto: as many as fit in half the free "
        "GPU memory (one window's forward measured, at most 64), 8 on a CPU, with "
        "model.max_memory, in search (trials calibrate a copy) and for the stages that take "
        "gradients or logits per batch",
    )
    chat_template: bool = False
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0  # numpy's seed range

    @model_validator(mode="after")
    def _total_tokens(self):
        total = self.num_samples * self.seq_len
        if total > MAX_CALIBRATION_TOKENS:
            raise ValueError(
                f"num_samples x seq_len is {total:,} tokens; calibration holds them all in "
                f"memory at once, at most {MAX_CALIBRATION_TOKENS:,} (2**27)"
            )
        return self


#: Tokens of a calibration set (num_samples x seq_len): an int64 tensor of 1 GiB.
MAX_CALIBRATION_TOKENS = 1 << 27


class RecipeHeader(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=128)]
    description: str | None = None
    model: ModelSpec
    calibration: CalibrationSpec | None = None


class Recipe(RecipeHeader):
    stages: list[SerializeAsAny[Stage]]
    #: Directory of the recipe file; relative paths in the recipe resolve against it.
    base_dir: Path = Field(default=Path("."), exclude=True)
    #: What validation planned: ``plans[i]`` is the model before stage ``i``,
    #: ``plans[-1]`` after the last one (see optimizer/plan.py).
    plans: list[ModelPlan] = Field(default_factory=list, exclude=True)

    def resolved(self) -> dict[str, Any]:
        """The recipe as plain data, every default filled in (what ``run.json`` records)."""
        data = self.model_dump(mode="json", exclude={"stages"})
        if data["model"].get("max_memory") is None:
            # Unset, it is left out: recipes (and their sha256) without it read as before.
            data["model"].pop("max_memory", None)
        data["stages"] = [{s.name: s.model_dump(mode="json")} for s in self.stages]
        return data

    def sha256(self) -> str:
        blob = json.dumps(self.resolved(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.resolved(), sort_keys=False)


# --------------------------------------------------------------------------- YAML with lines


class SourceMap:
    """Where each key path of a loaded recipe came from (file and line, or a --set flag)."""

    def __init__(self, file: str):
        self.file = file
        self.lines: dict[KeyPath, int] = {}
        self.overrides: dict[KeyPath, str] = {}

    def locate(self, path: KeyPath) -> tuple[str, int | None]:
        for n in range(len(path), -1, -1):
            prefix = path[:n]
            if prefix in self.overrides:
                return f"--set {self.overrides[prefix]}", None
            if prefix in self.lines:
                return self.file, self.lines[prefix]
        return self.file, None

    def problem(self, path: KeyPath, message: str) -> Problem:
        file, line = self.locate(path)
        return Problem(file, line, format_path(path), message)


def format_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _index_lines(node: yaml.Node, path: KeyPath, smap: SourceMap, problems: list[Problem]):
    smap.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            child = (*path, key)
            if key in seen:
                problems.append(
                    Problem(
                        smap.file,
                        key_node.start_mark.line + 1,
                        format_path(child),
                        "duplicate key (YAML would silently keep only the last one)",
                    )
                )
            seen.add(key)
            smap.lines[child] = key_node.start_mark.line + 1
            _index_lines(value_node, child, smap, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, (*path, i), smap, problems)


def _measure(node: yaml.Node, file: str) -> None:
    """Refuse a composed YAML graph that is cyclic, nested more than MAX_RECIPE_DEPTH levels
    or expands (through aliases) to more than MAX_RECIPE_VALUES values. Each node's expanded
    size and height are memoized, so this is linear in the file however large the expansion,
    and checking the depth before descending bounds the recursion."""
    seen: dict[int, tuple[int, int]] = {}  # id(node): (expanded values, height)
    on_path: set[int] = set()

    def refuse(at: yaml.Node, message: str) -> None:
        raise RecipeError([Problem(file, at.start_mark.line + 1, "", message)])

    def too_deep(at: yaml.Node) -> None:
        refuse(
            at,
            f"nested more than {MAX_RECIPE_DEPTH} levels deep (counting YAML aliases "
            "expanded); a recipe is a small config of a few levels",
        )

    def walk(n: yaml.Node, depth: int) -> tuple[int, int]:
        if id(n) in seen:
            count, height = seen[id(n)]
            if depth + height > MAX_RECIPE_DEPTH:
                too_deep(n)
            return count, height
        if id(n) in on_path:
            refuse(n, "a YAML alias refers to the mapping or list it is inside of (a cycle)")
        if depth > MAX_RECIPE_DEPTH:
            too_deep(n)
        count, height = 1, 0
        if isinstance(n, (yaml.MappingNode, yaml.SequenceNode)):
            on_path.add(id(n))
            children = (
                [c for pair in n.value for c in pair]
                if isinstance(n, yaml.MappingNode)
                else n.value
            )
            for child in children:
                c, h = walk(child, depth + 1)
                count += c
                height = max(height, h + 1)
                if count > MAX_RECIPE_VALUES:
                    refuse(
                        n,
                        f"holds more than {MAX_RECIPE_VALUES:,} values (YAML aliases *name of "
                        "anchors &name expanded); a recipe is a small config, and nested "
                        "aliases (a 'billion laughs' file) are refused",
                    )
            on_path.discard(id(n))
        seen[id(n)] = (count, height)
        return count, height

    walk(node, 0)


_OPEN = (
    yaml.FlowSequenceStartToken,
    yaml.FlowMappingStartToken,
    yaml.BlockSequenceStartToken,
    yaml.BlockMappingStartToken,
)
_CLOSE = (yaml.FlowSequenceEndToken, yaml.FlowMappingEndToken, yaml.BlockEndToken)


def _check_nesting(text: str, file: str) -> None:
    """Refuse deep nesting from the token stream, before the parser recurses into it: PyYAML
    composes recursively (20k brackets: RecursionError) and its scanner does work per token
    in proportion to the flow depth, so a deep file is slow long before it fails. Invalid
    YAML is left to the parser to report."""
    loader = yaml.SafeLoader(text)
    depth = 0
    try:
        while loader.check_token():
            token = loader.get_token()
            if isinstance(token, _OPEN):
                depth += 1
                if depth > MAX_RECIPE_DEPTH + 1:
                    raise RecipeError(
                        [
                            Problem(
                                file,
                                token.start_mark.line + 1,
                                "",
                                f"nested more than {MAX_RECIPE_DEPTH} levels deep; a recipe "
                                "is a small config of a few levels",
                            )
                        ]
                    )
            elif isinstance(token, _CLOSE):
                depth -= 1
    except yaml.YAMLError:
        pass
    finally:
        loader.dispose()


def compose_yaml(text: str, file: str) -> tuple[Any, yaml.Node | None]:
    """Parse one YAML document safely: its data and its node graph (None when empty).
    Anything wrong -- bad YAML, a hostile expansion, nesting that exhausts the parser --
    is one RecipeError naming ``file``, never a traceback."""
    try:
        _check_nesting(text, file)
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = None
            if node is not None:
                _measure(node, file)
                data = loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        reason = getattr(e, "problem", None) or str(e)
        raise RecipeError([Problem(file, line, "", f"not valid YAML: {reason}")]) from None
    except RecursionError:
        raise RecipeError(
            [
                Problem(
                    file,
                    None,
                    "",
                    f"nested too deeply to parse (more than {MAX_RECIPE_DEPTH} levels of "
                    "mappings or lists); a recipe is a small config of a few levels",
                )
            ]
        ) from None
    except MemoryError:
        raise RecipeError(
            [Problem(file, None, "", "too large to load; a recipe is a small config")]
        ) from None
    return data, node


def load_yaml(text: str, file: str) -> tuple[Any, SourceMap, list[Problem]]:
    smap = SourceMap(file)
    data, node = compose_yaml(text, file)
    problems: list[Problem] = []
    if node is not None:
        _index_lines(node, (), smap, problems)
    return data, smap, problems


# --------------------------------------------------------------------------- --set overrides


def apply_override(data: dict, assignment: str, smap: SourceMap) -> None:
    """Apply ``a.b.c=value`` to ``data`` in place. ``value`` is parsed as YAML (1, true, [..]).

    Under ``stages`` a segment may be a list index (``stages.0.ptq.format``) or a stage type
    (``stages.ptq.format`` addresses the first ``ptq`` stage's section).
    """
    if "=" not in assignment:
        raise OptimizerError(
            f"--set {assignment!r}: expected KEY=VALUE, e.g. --set calibration.num_samples=64"
        )
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise OptimizerError(
            f"--set {assignment!r}: the key must be a dotted path such as model.dtype"
        )
    try:
        value = compose_yaml(raw, f"--set {assignment}")[0] if raw.strip() else ""
    except RecipeError as e:
        if not any(p.message.startswith("not valid YAML") for p in e.problems):
            # a hostile value (an alias bomb, a cycle, deep nesting): refused like a file
            raise OptimizerError(
                f"--set {assignment[:80]!r}{'...' if len(assignment) > 80 else ''}: "
                f"{e.problems[0].message}"
            ) from None
        value = raw  # not YAML: the text itself (`--set description=a: b`)
    node: Any = data
    path: list[str | int] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if part.isdigit() and int(part) < len(node):
                idx: str | int = int(part)
            else:
                matches = [
                    j for j, item in enumerate(node) if isinstance(item, dict) and part in item
                ]
                if not matches:
                    raise OptimizerError(
                        f"--set {assignment!r}: no list element {part!r} under {format_path(tuple(path))} "
                        "(use an index, or a stage type present in the recipe)"
                    )
                idx = matches[0]
                if not last:  # `stages.ptq.x` addresses the ptq section of that list item
                    path.append(idx)
                    node = node[idx]
                    idx = part
            if last:
                node[idx] = value
                path.append(idx)
                break
            path.append(idx)
            if node[idx] is None:
                node[idx] = {}
            node = node[idx]
            continue
        if not isinstance(node, dict):
            raise OptimizerError(
                f"--set {assignment!r}: {format_path(tuple(path))} is not a mapping, cannot set {part!r} in it"
            )
        path.append(part)
        if last:
            node[part] = value
            break
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
    smap.overrides[tuple(path)] = assignment


# --------------------------------------------------------------------------- validation


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names allowed at ``loc`` (a pydantic error location without its last element)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = _model_of(field.annotation)
    return list(getattr(current, "model_fields", {}).keys()) if current else []


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found:
            return found
    return None


def _clean_loc(loc: tuple) -> tuple:
    # pydantic puts union member names ("TrtllmCheckpointSpec") and validator tags in
    # locations; they are not recipe keys.
    return tuple(
        p
        for p in loc
        if not (isinstance(p, str) and (p[:1].isupper() or p.startswith("function-")))
    )


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: a hostile value is not echoed whole."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _problems_from(
    error: ValidationError, model: type[BaseModel], prefix: KeyPath, smap: SourceMap
) -> list[Problem]:
    errors = [(e, _clean_loc(e["loc"])) for e in error.errors()]
    # A misspelt required key shows up twice (unknown + missing); the did-you-mean says it all.
    suggested = set()
    for err, loc in errors:
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(
                str(loc[-1]), _fields_at(model, loc[:-1]), n=1, cutoff=0.6
            )
            if close:
                suggested.add((*loc[:-1], close[0]))
    out = []
    for err, loc in errors:
        if err["type"] == "missing" and loc in suggested:
            continue
        if err["type"] == "extra_forbidden":
            allowed = _fields_at(model, loc[:-1])
            msg = f"unknown key '{loc[-1]}'{did_you_mean(loc[-1], allowed)}"
            if allowed and not did_you_mean(loc[-1], allowed):
                msg += f" (allowed: {', '.join(allowed)})"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif err["type"] == "invalid_key":
            msg = f"keys are names (strings), not {_short(loc[-1] if loc else None)}"
            loc = loc[:-1]
        elif err["type"] == "int_parsing_size":
            msg = "this number is far out of range for any setting"
        elif err["type"] in ("model_type", "dict_type"):
            msg = f"must be a mapping of keys to values, not {_short(err.get('input'))}"
        else:
            msg = err["msg"].removeprefix("Value error, ")  # a model validator's own words
            if err["type"] == "literal_error":
                msg = msg.replace("Input should be", "must be one of:").replace("' or '", "', '")
                msg += f", not {_short(err['input'])}" + did_you_mean(
                    err["input"],
                    [
                        s.strip("'")
                        for s in str(err.get("ctx", {}).get("expected", ""))
                        .replace(" or ", ", ")
                        .split(", ")
                    ],
                )
        out.append(smap.problem(prefix + loc, msg))
    return out


def parse_recipe(data: Any, smap: SourceMap, base_dir: Path, device: str = "auto") -> Recipe:
    """Validate loaded recipe data. Collects every problem before raising.

    ``device`` is the machine the recipe is checked for: "auto" (this one), "gpu" or "cpu".
    """
    problems: list[Problem] = []
    if not isinstance(data, dict):
        raise RecipeError(
            [smap.problem((), "a recipe is a YAML mapping with name, model and stages")]
        )

    header = None
    try:
        header = RecipeHeader.model_validate({k: v for k, v in data.items() if k != "stages"})
    except ValidationError as e:
        problems += _problems_from(e, RecipeHeader, (), smap)
    # A misspelt `stages` key shows up above as unknown with a did-you-mean; only report the
    # absence of stages when the user did not try to name them.
    raw_stages = data.get("stages")
    if raw_stages is None and not any(p.message.startswith("unknown key") for p in problems):
        problems.append(
            smap.problem(("stages",), "required key is missing: the ordered list of stages")
        )
    elif raw_stages is not None and not isinstance(raw_stages, list):
        problems.append(
            smap.problem(("stages",), "must be a list, e.g.\n  stages:\n    - ptq: {format: fp8}")
        )
        raw_stages = None

    stages: list[Stage] = []
    stage_paths: list[KeyPath] = []
    for i, item in enumerate(raw_stages or []):
        path: KeyPath = ("stages", i)
        if not isinstance(item, dict) or len(item) != 1:
            problems.append(
                smap.problem(
                    path,
                    "each stage is a mapping with exactly one key, its type, e.g. `- ptq: {format: fp8}`",
                )
            )
            continue
        kind, section = next(iter(item.items()))
        if kind not in STAGES:
            problems.append(smap.problem((*path, kind), STAGES.unknown(str(kind))))
            continue
        cls = STAGES.get(kind)
        if section is not None and not isinstance(section, dict):
            problems.append(smap.problem((*path, kind), "a stage's settings must be a mapping"))
            continue
        try:
            stage = cls.model_validate(section or {})
        except ValidationError as e:
            problems += _problems_from(e, cls, (*path, kind), smap)
            continue
        found = _number_problems(stage, (*path, kind), smap)
        if found:
            problems += found
            continue
        stages.append(stage)
        stage_paths.append((*path, kind))

    if header is not None:
        problems += _number_problems(header, (), smap)
    if header is not None and not problems:
        if not stages:
            problems.append(smap.problem(("stages",), "the recipe has no stages"))
        recipe = Recipe(**dict(header), stages=stages, base_dir=base_dir)
        env, plan = _environment(recipe, device)
        plans = [plan]
        for i, stage in enumerate(stages):
            plan, found = stage.plan(plan, env)
            plans.append(plan)
            for rel, msg in found:
                rel_path = (
                    tuple(int(p) if p.isdigit() else p for p in rel.split(".")) if rel else ()
                )
                problems.append(smap.problem(stage_paths[i] + rel_path, msg))
        recipe = recipe.model_copy(update={"plans": plans})
        if not problems:
            problems += _threshold_problems(recipe, stage_paths, smap)
        problems += _check_files(recipe, smap)
        if not problems:
            return recipe
    raise RecipeError(problems)


def _number_problems(model: BaseModel, prefix: KeyPath, smap: SourceMap) -> list[Problem]:
    """Every float a validated section holds must be finite and every int within int64.

    Fields with bounds refuse NaN themselves (allow_inf_nan=False); this catches the rest --
    any stage's unbounded float, a ``dict[str, float]`` (a gate's ``max_drop``), a string
    such as ``"nan"`` that pydantic turned into a float -- so that no NaN or infinity reaches
    a comparison (NaN compares false with everything) or a sum."""
    problems: list[Problem] = []

    def walk(value: Any, path: KeyPath) -> None:
        if isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name), (*path, name))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, (*path, k))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, (*path, i))
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(smap.problem(path, f"must be a finite number, not {value}"))
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            problems.append(smap.problem(path, "this number is out of range for any setting"))

    walk(model, prefix)
    return problems[:1]  # one per section: the first says it


def _threshold_problems(
    recipe: Recipe, stage_paths: list[KeyPath], smap: SourceMap
) -> list[Problem]:
    """A gate's ``max_drop`` overrides, checked against its suite: each key ``default`` or a
    ``task/metric`` the suite measures (a typo would silently leave the default in force),
    each value a finite drop in [0, 1]. (Belongs in Gate.plan, which loads the suite anyway;
    done here while gate.py is out of reach.)"""
    from optimizer.evaluation.suite import load_suite, override_problems

    problems: list[Problem] = []
    for stage, path in zip(recipe.stages, stage_paths, strict=True):
        max_drop = getattr(stage, "max_drop", None)
        if stage.name != "gate" or not max_drop:
            continue
        try:
            suite = load_suite(stage.suite_path(recipe.base_dir))
        except OptimizerError:
            continue  # Gate.plan reported it
        for key, msg in override_problems(suite, max_drop):
            problems.append(smap.problem((*path, "max_drop", key), msg))
    return problems


def _environment(recipe: Recipe, device: str) -> tuple[Environment, ModelPlan]:
    """The machine the recipe is checked for, and the plan of its source model."""
    from optimizer import hardware, models

    gpu = {"gpu": True, "cpu": False}.get(device)
    if gpu is None:
        gpu = hardware.gpu_present()
    env = Environment(
        gpu=gpu, base_dir=recipe.base_dir, has_calibration=recipe.calibration is not None
    )
    return env, ModelPlan.of_source(models.peek_config(recipe.model.source, recipe.base_dir))


def _check_files(recipe: Recipe, smap: SourceMap) -> list[Problem]:
    """Missing inputs are bad input: find them now, not an hour into a run."""
    from optimizer import calibration, models  # light modules: no torch at import

    problems = []
    msg = models.check_source(recipe.model.source, recipe.base_dir)
    if msg:
        problems.append(smap.problem(("model", "source"), msg))
    if recipe.calibration is not None:
        msg = calibration.check_dataset(recipe.calibration, recipe.base_dir)
        if msg:
            problems.append(smap.problem(("calibration", "dataset"), msg))
    return problems


def load_recipe(
    path: str | Path, overrides: list[str] | None = None, device: str = "auto"
) -> Recipe:
    """Read, override and validate a recipe file, or a shipped recipe by name when no such
    file exists (``quickstart``: optimizer/resources/recipes/quickstart.yaml). Raises
    OptimizerError / RecipeError."""
    from optimizer import resources

    p = Path(path)
    if not p.is_file():
        if resources.is_name(str(path)):
            p = resources.recipe(str(path))  # an unknown name: the shipped ones, did-you-mean
        else:
            stem = p.name.removesuffix(".yaml").removesuffix(".yml")
            hint = (
                f"; the shipped recipe '{stem}' is addressed by its name: optimize run {stem}"
                if resources.find("recipe", stem)
                else ""
            )
            raise OptimizerError(f"recipe file not found: {p}{hint}")
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise OptimizerError(f"cannot read recipe {p}: {e.strerror or e}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(
            [
                Problem(
                    str(p),
                    None,
                    "",
                    f"larger than {MAX_RECIPE_BYTES // 1024} KiB; a recipe is a small config "
                    "(is this the right file?)",
                )
            ]
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise RecipeError(
            [
                Problem(
                    str(p),
                    line,
                    "",
                    f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                    "a recipe is a YAML text file",
                )
            ]
        ) from None
    text = text.removeprefix("\ufeff")  # a BOM some editors write
    data, smap, problems = load_yaml(text, str(p))
    if data is None:
        raise RecipeError(
            [
                Problem(
                    str(p),
                    None,
                    "",
                    "the recipe is empty: a recipe is a YAML mapping with name, model and stages",
                )
            ]
        )
    for assignment in overrides or []:
        if not isinstance(data, dict):
            break
        apply_override(data, assignment, smap)
    try:
        recipe = parse_recipe(data, smap, p.resolve().parent, device)
    except RecipeError as e:
        raise RecipeError(problems + e.problems) from None
    if problems:
        raise RecipeError(problems)
    return recipe
