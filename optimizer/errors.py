"""The project's exception types and the exit codes they map to (a contract, see DESIGN.md).

Errors a user can cause derive from :class:`OptimizerError` and carry a message written for
that user; the CLI prints it without a traceback. Anything else is a bug.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_STAGE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_GATE_FAILED = 3
EXIT_INTERRUPTED = 130
#: SIGTERM (128 + 15), what schedulers send; otherwise handled as an interrupt.
EXIT_TERMINATED = 143


class OptimizerError(Exception):
    """Bad input: an invalid recipe, a missing file, a bad flag. Exit code 2."""

    exit_code = EXIT_BAD_INPUT


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe, located as precisely as we can."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class RecipeError(OptimizerError):
    """A recipe failed validation; ``problems`` lists every problem found, not just the first."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class StageFailed(Exception):
    """A stage raised while running. Exit code 1; the message names the stage and the cause."""

    exit_code = EXIT_STAGE_FAILED

    def __init__(self, stage: str, cause: str):
        self.stage = stage
        self.cause = cause
        super().__init__(f"stage '{stage}' failed: {cause}")


class StageError(Exception):
    """Raised inside a stage for a failure whose message says it all (a missing launcher, a
    build that exited non-zero): reported as that stage's failure without an exception type."""


class GateFailed(Exception):
    """The accuracy gate rejected the candidate. Exit code 3; artifacts are still written."""

    exit_code = EXIT_GATE_FAILED
