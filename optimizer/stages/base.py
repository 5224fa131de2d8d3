"""What every stage is: a pydantic config (its recipe section) with one ``run(ctx)`` method.

A stage registers itself by name with :func:`register`; the recipe loader and the runner look
stages up in that registry only, so a new stage type joins by adding one module to this
package and importing it in ``stages/__init__.py`` — the runner does not change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from optimizer.context import StageContext
    from optimizer.recipe import Recipe

STAGES: dict[str, type[Stage]] = {}


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make ``cls`` usable in recipes as ``- <cls.name>: {...}``."""
    if cls.name in STAGES:
        raise RuntimeError(f"stage name {cls.name!r} registered twice")
    STAGES[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Environment:
    """What validation knows about where and on what the recipe will run.

    ``model_config`` is the model's ``config.json`` when it is available without downloading
    (local dir, builtin, hub cache), else None and checks that need it wait for the run.
    ``gpu`` is whether a CUDA GPU is (or will be) there; None means "do not check".
    """

    model_config: dict[str, Any] | None = None
    gpu: bool | None = None


@dataclass
class StageResult:
    """What a stage hands back to the runner.

    ``outputs`` maps an output key to the *temporary* directory the stage wrote (obtained from
    ``ctx.new_output(key)``); the runner hashes it and renames it into place. ``metrics`` is
    any JSON-serialisable summary worth keeping in ``run.json``.
    """

    outputs: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    #: Set by a gate that rejected the model: the run finishes (artifacts are written) and
    #: exits 3 with this message.
    gate_failure: str | None = None


class Stage(BaseModel):
    """Base of all stages. Subclasses declare their recipe fields as pydantic fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ClassVar[str]
    #: The stage changes the model; the runner saves it afterwards so later stages (and a
    #: resumed run) start from exactly this state.
    transforms_model: ClassVar[bool] = False
    #: The stage leaves the in-memory model unusable (ModelOpt's exporters pack weights in
    #: place); later stages reload the last saved state instead.
    invalidates_model: ClassVar[bool] = False
    #: The stage reads the recipe's ``calibration`` section (it is then part of its inputs).
    needs_calibration: ClassVar[bool] = False
    #: Output keys that are user-facing artifacts (listed in ``run.json["artifacts"]``).
    artifact_keys: ClassVar[tuple[str, ...]] = ()

    def check(self, recipe: Recipe, before: list[Stage], env: Environment) -> list[tuple[str, str]]:
        """Problems visible before any model loads, as ``(key path, message)`` pairs.

        ``before`` are the stages that run earlier in the recipe. Key paths are relative to
        this stage's section; an empty path points at the stage itself.
        """
        problems: list[tuple[str, str]] = []
        if self.transforms_model and any(s.name == "export" for s in before):
            problems.append(
                (
                    "",
                    f"'{self.name}' comes after 'export', so its changes would not reach the "
                    "exported artifacts; move it before export",
                )
            )
        if self.needs_calibration and recipe.calibration is None:
            problems.append(
                (
                    "",
                    f"'{self.name}' needs calibration data: add a top-level `calibration:` "
                    "section (dataset, num_samples, seq_len)",
                )
            )
        return problems

    def preflight(self) -> None:
        """Checks of this machine to run before any model loads (raise StageError)."""

    def artifacts(self, outputs: dict[str, dict[str, str]]) -> dict[str, str]:
        """``run.json["artifacts"]`` entries for committed ``outputs`` ({key: {path, sha256}})."""
        return {k: v["path"] for k, v in outputs.items() if k in self.artifact_keys}

    def trtllm_quant_algo(self) -> tuple[str | None, str] | None:
        """For quantizing stages: (the ``quant_algo`` a TensorRT-LLM export will carry, or
        None if TensorRT-LLM cannot take it; a short description). None if not quantizing."""
        return None

    def trtllm_problems(self, tp: int, model_config: dict[str, Any] | None) -> list[str]:
        """For quantizing stages: why a TensorRT-LLM checkpoint at this ``tp`` would not build."""
        return []

    def describe(self) -> str:
        """One line for logs and ``--dry-run``."""
        fields = ", ".join(f"{k}={v}" for k, v in self.model_dump(exclude_defaults=True).items())
        return f"{self.name}({fields})"

    def run(self, ctx: StageContext) -> StageResult:  # pragma: no cover - abstract
        raise NotImplementedError
