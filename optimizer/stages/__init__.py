"""Stage registry. Importing this package registers every built-in stage type."""

from optimizer.stages import auto_quantize, build, export, gate, ptq  # noqa: F401  (imported to register)
from optimizer.stages.base import STAGES, Stage, StageResult, register

__all__ = ["STAGES", "Stage", "StageResult", "register"]
