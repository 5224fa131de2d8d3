"""What the gate can evaluate: a :class:`Candidate` is something lm-eval can score.

Targets, by the name a recipe or a flag uses (:data:`TARGETS`):

- ``model``: a model in memory (the pipeline's fake-quantized model), evaluated as it is;
- ``checkpoint``: a Hugging Face checkpoint directory, loaded with ``optimizer.models.
  load_model`` (ModelOpt state restored where it was saved with it) and its fake-quantized
  weights folded in, or — a ModelOpt unified HF export or a TensorRT-LLM checkpoint, what
  ships — rebuilt from its own files by :mod:`optimizer.unified.rebuild` /
  :mod:`optimizer.trtllm.rebuild`;
- ``endpoint``: a served model behind an OpenAI-compatible ``/v1/completions`` endpoint
  (e.g. ``trtllm-serve``), scored by lm-eval's completions client
  (:mod:`optimizer.evaluation.endpoint`).

A candidate refuses what it cannot evaluate faithfully as early as possible: its
constructor refuses what can be seen on disk (no config.json; a TensorRT engine; an export
whose quantization or architecture cannot be rebuilt, see :func:`checkpoint_problem`), and :meth:`Candidate.check`, which
:func:`optimizer.evaluation.evaluate_and_judge` calls before evaluating the baseline, what
needs a request (an endpoint without prompt logprobs). Loglikelihood tasks need the
log-probability of every prompt token (``echo`` with ``logprobs``); servers that do not
return them make lm-eval score every choice alike with no error (trtllm-serve's completions
endpoint is one), so :func:`probe_prompt_logprobs` asks once.

A new target (a TensorRT-LLM engine run in-process, say) is one more :class:`Candidate`
subclass and one more :data:`TARGETS` entry.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer.errors import OptimizerError
from optimizer.registry import Registry

if TYPE_CHECKING:
    from optimizer.evaluation.baseline import BaselineRef
    from optimizer.evaluation.harness import Scorable
    from optimizer.evaluation.suite import Suite

log = logging.getLogger(__name__)


class Candidate(ABC):
    """Something lm-eval can score, evaluated like ``baseline`` (its compute dtype and
    tokenizer) unless it says otherwise."""

    def check(  # noqa: B027 (optional hook)
        self, baseline: BaselineRef, suite: Suite | None = None, **options: Any
    ) -> None:
        """Raise :class:`OptimizerError` if this candidate cannot be evaluated faithfully on
        ``suite``. Cheap (no model load); called before the baseline is evaluated."""

    @abstractmethod
    def load(self, suite: Suite, baseline: BaselineRef) -> Scorable:
        """An lm-eval ``LM``, or a ``(model, tokenizer)`` pair (see ``harness.score_suite``).
        What it returns is the caller's to drop after scoring."""

    @abstractmethod
    def describe(self) -> str:
        """One line for logs."""


# --------------------------------------------------------------------------- in memory


class ModelCandidate(Candidate):
    """A model in memory, evaluated as it is (shared with its owner: never modified)."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model = model
        self.tokenizer = tokenizer

    def load(self, suite: Suite, baseline: BaselineRef) -> Scorable:
        return self.model, self.tokenizer

    def describe(self) -> str:
        return "the in-memory model"


# --------------------------------------------------------------------------- checkpoints


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint directory ``path`` cannot be evaluated by loading it with
    transformers, or None."""
    config_file = path / "config.json"
    if not config_file.is_file():
        return f"{path} is not a checkpoint directory (no config.json)"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        return f"{config_file} is not readable JSON ({e})"
    if not isinstance(config, dict):
        return f"{config_file} is not a JSON object"
    from optimizer.trtllm import kind_of

    kind = kind_of(path)
    if kind == "trtllm_checkpoint":
        from optimizer.trtllm.rebuild import checkpoint_problem as trtllm_problem

        return trtllm_problem(path)
    if kind == "engine":
        return (
            f"{path} is a TensorRT engine, which cannot be run for evaluation here; gate the "
            "TensorRT-LLM checkpoint it was built from, the unified HF checkpoint exported "
            "beside it (export: {hf_checkpoint: true}), or serve it and gate the endpoint "
            "(--endpoint)"
        )
    if "model_type" not in config:
        return (
            f"{config_file} has no model_type: not a Hugging Face checkpoint transformers can load"
        )
    from optimizer.unified.rebuild import read_scheme, scheme_problem

    try:
        scheme = read_scheme(path)
    except OptimizerError as e:
        return str(e)
    if scheme is not None:
        problem = scheme_problem(scheme)
        if problem:
            return f"{path} is a ModelOpt unified checkpoint that cannot be gated: {problem}"
    return None


class CheckpointCandidate(Candidate):
    """A Hugging Face checkpoint directory: plain weights; saved with ModelOpt state
    (``modelopt_state.pth``, restored by ``optimizer.models.load_model``); or a ModelOpt
    unified HF export, rebuilt from its own files (:mod:`optimizer.unified.rebuild`: stored
    quantized weights dequantized, activations and KV cache fake-quantized as its config says)
    — never through plain ``from_pretrained``, which drops the scales; or a TensorRT-LLM
    checkpoint, rebuilt the same way (:mod:`optimizer.trtllm.rebuild`) with the tokenizer
    checked against its vocabulary. What cannot be rebuilt is refused at construction
    (:func:`checkpoint_problem`).

    ``dtype`` defaults to the baseline's compute dtype, ``tokenizer`` (a directory or a
    loaded tokenizer) to the baseline's. ``fold``: bake fake-quantized weights in after
    loading (:func:`fold_fake_quant_weights`; the loaded model is the gate's own)."""

    def __init__(
        self,
        path: Path | str,
        *,
        dtype: str | None = None,
        tokenizer: Any = None,
        trust_remote_code: bool = False,
        fold: bool = True,
    ):
        self.path = Path(path).expanduser()
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.trust_remote_code = trust_remote_code
        self.fold = fold
        problem = checkpoint_problem(self.path)
        if problem:
            raise OptimizerError(problem)

    def check(self, baseline: BaselineRef, suite: Suite | None = None, **options: Any) -> None:
        """A unified export is checked from its safetensors headers before the baseline is
        evaluated (optimizer/unified/check.py): a missing scale, a wrong shape or dtype is
        refused now, not after minutes of baseline evaluation."""
        from optimizer.trtllm import check_checkpoint, kind_of
        from optimizer.unified.check import check_hf_checkpoint
        from optimizer.unified.rebuild import read_scheme

        if kind_of(self.path) == "trtllm_checkpoint":
            # The TensorRT-LLM validator reads the safetensors headers: a missing scale or a
            # wrong shape is refused before the baseline is evaluated.
            problems = check_checkpoint(self.path)
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise OptimizerError(f"{self.path} cannot be gated: {problems[0]}{more}")
            return
        if read_scheme(self.path) is None:
            return
        problems = check_hf_checkpoint(self.path)
        if problems:
            more = (
                f" (and {len(problems) - 1} more; `optimize check {self.path}`)"
                if len(problems) > 1
                else ""
            )
            raise OptimizerError(f"{self.path} cannot be gated: {problems[0].message}{more}")

    def load(self, suite: Suite, baseline: BaselineRef) -> Scorable:
        from optimizer import models
        from optimizer.trtllm import kind_of
        from optimizer.unified.rebuild import read_scheme, rebuild

        dtype = self.dtype or baseline.compute_dtype
        tokenizer = self.tokenizer if self.tokenizer is not None else baseline.path
        if isinstance(tokenizer, str | Path):
            tokenizer = models.load_tokenizer(Path(tokenizer), self.trust_remote_code)
        if kind_of(self.path) == "trtllm_checkpoint":
            from optimizer.trtllm.rebuild import rebuild as rebuild_trtllm

            # No tokenizer in a TensorRT-LLM checkpoint: the source model's (the pipeline's
            # model, or the baseline for `optimize gate`), checked against its vocabulary.
            log.info("rebuilding the TensorRT-LLM checkpoint in %s (%s)", self.path, dtype)
            return rebuild_trtllm(self.path, dtype, tokenizer=tokenizer).model, tokenizer
        if read_scheme(self.path) is not None:
            log.info("rebuilding the exported model in %s (%s)", self.path, dtype)
            return rebuild(self.path, dtype).model, tokenizer
        log.info("loading %s (%s)", self.path, dtype)
        model = models.load_model(self.path, dtype, self.trust_remote_code)
        if self.fold:
            fold_fake_quant_weights(model)
        return model, tokenizer

    def describe(self) -> str:
        return str(self.path)


def fold_fake_quant_weights(model) -> int:
    """Bake fake-quantized weights into the weights of a model the gate owns (ModelOpt's
    ``fold_weight``): the same numbers in float32 (ModelOpt quantizes a weight in float32 and
    casts back, so a bf16 model may differ in the last bit), without re-quantizing every
    weight on every forward (about 15 % of a CPU evaluation). Returns the layers folded."""
    quantized = [
        m
        for m in model.modules()
        if getattr(getattr(m, "weight_quantizer", None), "is_enabled", False)
    ]
    # Folding writes into the weight tensor: a quantized lm_head tied to the embeddings would
    # quantize the embeddings too. Such a model is evaluated unfolded.
    owners: dict[int, int] = {}
    for m in model.modules():
        weight = getattr(m, "weight", None)
        if weight is not None and hasattr(weight, "data_ptr"):
            owners[weight.data_ptr()] = owners.get(weight.data_ptr(), 0) + 1
    if any(owners.get(m.weight.data_ptr(), 0) > 1 for m in quantized):
        return 0
    folded = len(quantized)
    if folded:
        import modelopt.torch.quantization as mtq

        mtq.fold_weight(model)
    return folded


# --------------------------------------------------------------------------- the factory

#: Evaluation targets by name; entries are imported on first use.
TARGETS: Registry[type[Candidate]] = Registry(
    "evaluation target",
    {
        "model": "optimizer.evaluation.candidates:ModelCandidate",
        "checkpoint": "optimizer.evaluation.candidates:CheckpointCandidate",
        "endpoint": "optimizer.evaluation.endpoint:EndpointCandidate",
    },
)


def make_candidate(target: str, /, *args: Any, **options: Any) -> Candidate:
    """The candidate of evaluation target ``target`` (``model``, ``checkpoint``,
    ``endpoint``), built from ``options``; refusals visible on disk raise
    :class:`OptimizerError` here, before anything is evaluated."""
    return TARGETS.get(target)(*args, **options)
