"""``run.json`` as a versioned pydantic model (a contract: platform jobs read it).

Version 2 adds each stage's declared ``inputs`` (label -> digest) to version 1's keys;
version 1 files still load, so a run started by an older release can be resumed.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)

RunStatus = Literal["running", "success", "failed", "gate_failed", "interrupted"]
StageStatus = Literal["pending", "running", "success", "skipped", "failed", "interrupted"]


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class _Record(BaseModel):
    # Unknown keys are kept, not refused: a newer minor release may add some.
    model_config = ConfigDict(extra="allow", validate_assignment=True)


class Output(_Record):
    path: str
    sha256: str


class StageRecord(_Record):
    index: int
    name: str
    status: StageStatus = "pending"
    fingerprint: str | None = None
    #: Declared inputs (files, directories, packages, images) -> digest.
    inputs: dict[str, str] | None = None
    started_at: str | None = None
    finished_at: str | None = None
    seconds: float | None = None
    outputs: dict[str, Output] | None = None
    metrics: dict[str, Any] | None = None
    error: str | None = None
    reason: str | None = None
    gate_failure: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("success", "skipped")

    def output_paths(self) -> dict[str, dict[str, str]]:
        return {k: v.model_dump() for k, v in (self.outputs or {}).items()}


class RunError(_Record):
    message: str
    stage: str | None = None


class RunRecord(_Record):
    schema_version: int = SCHEMA_VERSION
    name: str
    status: RunStatus = "running"
    started_at: str = Field(default_factory=now)
    finished_at: str | None = None
    recipe_file: str | None = None
    overrides: list[str] = Field(default_factory=list)
    recipe: dict[str, Any] = Field(default_factory=dict)
    recipe_sha256: str | None = None
    versions: dict[str, str | None] = Field(default_factory=dict)
    device: dict[str, Any] | None = None
    #: Imports before the first stage: ``{"seconds": total, "imports": {module: seconds}}``.
    startup: dict[str, Any] | None = None
    model: dict[str, Any] = Field(default_factory=dict)
    stages: list[StageRecord] = Field(default_factory=list)
    artifacts: dict[str, str] = Field(default_factory=dict)
    error: RunError | None = None

    def to_json(self) -> str:
        data = self.model_dump(mode="json")
        # Stage records list only what is known about the stage (a pending one: 3 keys).
        data["stages"] = [s.model_dump(mode="json", exclude_none=True) for s in self.stages]
        if self.error is not None:
            data["error"] = self.error.model_dump(mode="json", exclude_none=True)
        return json.dumps(data, indent=2, default=str) + "\n"
