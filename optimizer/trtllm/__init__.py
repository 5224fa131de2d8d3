"""TensorRT-LLM: the facts this project relies on (:mod:`optimizer.trtllm.facts`, THE table,
stdlib-only) and the checkpoint validator and fix-ups built on them
(:mod:`optimizer.trtllm.checkpoint`).

``from optimizer import trtllm; trtllm.check_checkpoint(path)`` keeps working: the public
names of both modules are re-exported here.
"""

from optimizer.trtllm import facts
from optimizer.trtllm.checkpoint import (
    HINTS,
    CheckProblem,
    apply_family_settings,
    apply_rope_settings,
    check_checkpoint,
    kind_of,
    read_safetensors_header,
    rope_settings,
    summarize,
)
from optimizer.trtllm.facts import (
    DEFAULT_IMAGE,
    DTYPES,
    FLOAT_DTYPES,
    KV_CACHE_QUANT_ALGOS,
    LINEAR_CONTRACTS,
    LINEARS,
    NORMS,
    QUANT_ALGOS,
    QUANTIZATION_KEYS,
    REQUIRED_CONFIG_KEYS,
    LinearContract,
    awq_layout_problems,
    engine_build_problems,
    engine_version_problem,
)

__all__ = [
    "DEFAULT_IMAGE",
    "DTYPES",
    "FLOAT_DTYPES",
    "HINTS",
    "KV_CACHE_QUANT_ALGOS",
    "LINEARS",
    "LINEAR_CONTRACTS",
    "NORMS",
    "QUANTIZATION_KEYS",
    "QUANT_ALGOS",
    "REQUIRED_CONFIG_KEYS",
    "CheckProblem",
    "LinearContract",
    "apply_family_settings",
    "apply_rope_settings",
    "awq_layout_problems",
    "check_checkpoint",
    "engine_build_problems",
    "engine_version_problem",
    "facts",
    "kind_of",
    "read_safetensors_header",
    "rope_settings",
    "summarize",
]
