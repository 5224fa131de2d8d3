"""The stage types, found by module name: ``optimizer/stages/<name>.py`` defines the stage
``<name>`` (a :class:`Stage` subclass whose ``name`` is the module's). Names are listed from
the package directory without importing anything; a stage's module is imported when a recipe
uses it. Other packages add stages through the ``optimizer.stages`` entry-point group
(``name = "module:Class"``).
"""

from __future__ import annotations

import pkgutil
from importlib import metadata
from pathlib import Path

from optimizer.registry import Registry
from optimizer.stages.base import Stage, StageResult

NOT_STAGES = {"base"}


def stage_modules(package: str, directory: Path) -> dict[str, str]:
    """``{name: "package.name"}`` for every module of ``directory`` (a package's folder)."""
    return {
        m.name: f"{package}.{m.name}"
        for m in pkgutil.iter_modules([str(directory)])
        if m.name not in NOT_STAGES and not m.name.startswith("_")
    }


def _discover() -> dict[str, str]:
    found = stage_modules(__name__, Path(__file__).parent)
    for ep in metadata.entry_points(group="optimizer.stages"):
        if ep.name in found:
            raise ValueError(f"stage type {ep.name!r} is registered twice ({ep.value})")
        found[ep.name] = ep.value
    return found


def stage_class(name: str, obj: object) -> type[Stage]:
    """A module entry names the module; its stage is the Stage subclass called ``name``."""
    if isinstance(obj, type) and issubclass(obj, Stage):
        return obj
    classes = [
        v
        for v in vars(obj).values()
        if isinstance(v, type) and issubclass(v, Stage) and getattr(v, "name", None) == name
    ]
    if len(classes) != 1:
        raise RuntimeError(
            f"{getattr(obj, '__name__', obj)} must define exactly one Stage named {name!r}, "
            f"found {len(classes)}"
        )
    return classes[0]


STAGES: Registry[type[Stage]] = Registry("stage type", discover=_discover, loader=stage_class)

__all__ = ["STAGES", "Stage", "StageResult", "stage_class", "stage_modules"]
