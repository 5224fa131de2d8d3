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
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError

from optimizer.errors import OptimizerError, Problem, RecipeError
from optimizer.plan import Environment, ModelPlan
from optimizer.registry import did_you_mean
from optimizer.stages import STAGES
from optimizer.stages.base import Stage

KeyPath = tuple[str | int, ...]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class CalibrationSpec(Strict):
    dataset: str = Field(
        description="local .jsonl/.json/.txt file (relative to the recipe), or a hub dataset name"
    )
    text_field: str = "text"
    subset: str | None = None
    split: str = "train"
    num_samples: Annotated[int, Field(gt=0)] = 512
    seq_len: Annotated[int, Field(gt=0)] = 512
    batch_size: Annotated[int, Field(gt=0)] = 8
    chat_template: bool = False
    seed: int = 0


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


def load_yaml(text: str, file: str) -> tuple[Any, SourceMap, list[Problem]]:
    smap = SourceMap(file)
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        reason = getattr(e, "problem", None) or str(e)
        raise RecipeError([Problem(file, line, "", f"not valid YAML: {reason}")]) from None
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
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
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
        else:
            msg = err["msg"].removeprefix("Value error, ")  # a model validator's own words
            if err["type"] == "literal_error":
                msg = msg.replace("Input should be", "must be one of:").replace("' or '", "', '")
                msg += f", not {err['input']!r}" + did_you_mean(
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
            stages.append(cls.model_validate(section or {}))
            stage_paths.append((*path, kind))
        except ValidationError as e:
            problems += _problems_from(e, cls, (*path, kind), smap)

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
        problems += _check_files(recipe, smap)
        if not problems:
            return recipe
    raise RecipeError(problems)


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
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise OptimizerError(f"cannot read recipe {p}: {e}") from None
    data, smap, problems = load_yaml(text, str(p))
    if data is None:
        data = {}
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
