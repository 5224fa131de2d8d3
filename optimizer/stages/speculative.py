"""``speculative``: a speculative-decoding draft for the model, trained or chosen, measured
before it ships, and exported where build/deploy find it.

``method``:

- ``eagle3`` (default): an EAGLE-3 draft head trained on the frozen model with ModelOpt
  (``techniques/speculative.py``); exported as the EAGLE-3 draft checkpoint in ``draft/``
  (TensorRT-LLM's PyTorch backend ``speculative_config``, vLLM, SGLang: the deploy stage
  writes their flags).
- ``medusa``: Medusa heads trained the same way; exported as a TensorRT-LLM 1.2 Medusa
  checkpoint (base and heads) in ``trtllm_checkpoint/``, which a later ``build`` stage turns
  into an engine with ``--speculative_decoding_mode medusa --max_draft_len``.
- ``draft_target``: a separate, smaller model with the same tokenizer (``draft_model``: any
  model source, e.g. this pipeline's own prune + distill output), saved to ``draft/``.

Training data (heads only): ``data`` as for the training stages, or, with ``generate``, the
model's own greedy replies to the data's prompts (the usual practice: the draft learns the
distribution it will be asked to predict). The documents are split as the training stages
split them; the held-out documents' prompts are where the acceptance is measured: greedy
speculative decoding in PyTorch (``techniques/speculation.py``) with the output checked equal
to plain greedy decoding. ``min_acceptance_length`` gates on the mean acceptance length
(exit 3 below it, like the accuracy gate).

The stage does not change the model handed on: the heads are added to the live model and
trained, and the stage then marks it invalid (``invalidates_model``: later stages reload the
saved model, without heads), so a ``ptq`` after it quantizes the plain model. EAGLE-3 and Medusa come before any
quantizing stage (ModelOpt exports a draft of a quantized model with the base's quantization
config, which the runtimes would then apply to the draft).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from optimizer.errors import OptimizerError
from optimizer.inputs import Input
from optimizer.plan import Environment, ModelPlan
from optimizer.stages._training import (
    model_source_input,
    other_vocabulary,
    training_problems,
    write_training_report,
)
from optimizer.stages.base import Stage, StageProblem, StageResult
from optimizer.techniques.speculative import EAGLE_FIELDS, MEDUSA_FIELDS
from optimizer.techniques.train import TrainingConfig

if TYPE_CHECKING:
    from optimizer.context import StageContext

HEAD_FIELDS = {"eagle3": EAGLE_FIELDS, "medusa": MEDUSA_FIELDS}
TRAINING_FIELDS = set(TrainingConfig.model_fields) | {"generate"}


class Generate(BaseModel):
    """Train on the model's own greedy replies to the data's prompts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: Annotated[int, Field(gt=0, le=4096)] = 256
    #: Prompts to answer (default: every training document's).
    num_prompts: Annotated[int, Field(gt=0)] | None = None
    batch_size: Annotated[int, Field(gt=0)] = 32


class Acceptance(BaseModel):
    """Where and how the acceptance is measured."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Held-out prompts (from the documents the draft did not train on).
    num_prompts: Annotated[int, Field(gt=0)] = 32
    max_new_tokens: Annotated[int, Field(gt=0, le=4096)] = 128
    #: Also decode plainly: the outputs must agree token for token; gives the speed-up.
    compare_greedy: bool = True
    #: Further draft lengths measured on the same prompts (one training, the table to choose
    #: a serving ``max_draft_len`` from); the gate and deploy use the stage's ``draft_len``.
    draft_lens: list[Annotated[int, Field(ge=1, le=16)]] = Field(
        default_factory=list, max_length=16
    )


class Speculative(Stage, TrainingConfig):
    """Train or choose a draft, measure its acceptance, export it."""

    name = "speculative"
    invalidates_model = True
    artifact_keys = ("draft", "trtllm_checkpoint")
    imports = ("modelopt.torch.speculative",)

    method: Literal["eagle3", "medusa", "draft_target"] = "eagle3"
    draft_len: Annotated[int, Field(ge=1, le=16)] = Field(
        5, description="draft tokens per step (deploy's max_draft_len defaults to it)"
    )
    draft_model: str | None = Field(
        None, description="draft_target: the draft, a model source with the model's tokenizer"
    )
    # eagle3 head
    num_layers: Annotated[int, Field(gt=0)] = 1
    intermediate_size: Annotated[int, Field(gt=0)] | None = None
    aux_layer_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ttt_steps: Annotated[int, Field(gt=0)] = 3
    compile: bool | None = Field(
        None,
        description="eagle3: torch.compile the head's forward and loss (default: on CUDA; the "
        "compile takes minutes, worth it for long runs only)",
    )
    # medusa heads
    medusa_heads: Annotated[int, Field(gt=0)] | None = None
    medusa_layers: Annotated[int, Field(gt=0)] = 1
    generate: Generate | None = None
    acceptance: Acceptance = Field(default_factory=Acceptance)
    min_acceptance_length: Annotated[float, Field(ge=1)] | None = Field(
        None, description="fail the run (exit 3) when the mean acceptance length is below"
    )
    # A draft head trains in a few hundred steps at a high rate (the base is frozen).
    learning_rate: Annotated[float, Field(gt=0)] = 1e-3
    steps: Annotated[int, Field(gt=0)] | None = 500

    # ------------------------------------------------------------------ validation

    def model_copies(self, before: ModelPlan | None) -> float:
        # Medusa: base + heads as one checkpoint; draft_target: the draft (at most the
        # model's size); EAGLE-3: a small head, but its training checkpoints hold the model.
        return 1.0

    def plan(self, prev: ModelPlan, env: Environment) -> tuple[ModelPlan, list[StageProblem]]:
        from optimizer import models

        plan, problems = super().plan(prev, env)
        set_fields = self.model_fields_set
        for method, fields in HEAD_FIELDS.items():
            wrong = sorted(f for f in fields if f in set_fields and method != self.method)
            if wrong:
                problems.append((wrong[0], f"{', '.join(wrong)}: only for method {method}"))
        if prev.draft:
            problems.append(("", f"an earlier stage already gives the model a {prev.draft} draft"))
        if self.method == "draft_target":
            if self.draft_model is None:
                problems.append(("draft_model", "method draft_target needs a draft_model"))
            training = sorted(TRAINING_FIELDS & set_fields)
            if training:
                problems.append(
                    (training[0], f"{', '.join(training)}: draft_target trains nothing")
                )
            if self.draft_model is not None:
                msg = models.check_source(self.draft_model, env.base_dir)
                if msg:
                    problems.append(("draft_model", msg))
                elif theirs := other_vocabulary(self.draft_model, env.base_dir, prev):
                    problems.append(
                        (
                            "draft_model",
                            f"the draft's vocabulary ({theirs} tokens) differs from the "
                            f"model's ({prev.dims.vocab_size}); a draft must share the tokenizer",
                        )
                    )
        else:
            if self.draft_model is not None:
                problems.append(("draft_model", "draft_model: only for method draft_target"))
            problems += training_problems(self, prev, env)
            if prev.quantization is not None:
                problems.append(
                    (
                        "method",
                        f"a {self.method} head must be trained before the model is quantized "
                        "(ModelOpt exports it with the base's quantization config): move this "
                        "stage before ptq / auto_quantize / qat",
                    )
                )
            if prev.sparsity:
                problems.append(
                    ("method", f"the model is {prev.sparsity} sparse: train the head before")
                )
        heads = self.resolved_medusa_heads
        longest = max([self.draft_len, *self.acceptance.draft_lens])
        if self.method == "medusa" and heads < longest:
            which = "draft_len" if longest == self.draft_len else "acceptance.draft_lens"
            problems.append(
                (
                    "medusa_heads",
                    f"{heads} Medusa heads draft at most {heads} tokens, not {which} {longest}",
                )
            )
        layers = prev.dims.num_hidden_layers if prev.dims is not None else None
        for i in self.aux_layer_ids or []:
            if layers is not None and i >= layers:
                problems.append(
                    ("aux_layer_ids", f"layer {i}: the model has {layers} (0-{layers - 1})")
                )
        exports = prev.exports
        if self.method == "medusa":
            if exports is not None and exports.trtllm_checkpoint is not None:
                problems.append(
                    (
                        "method",
                        "medusa writes the TensorRT-LLM checkpoint itself (base + heads): "
                        "drop trtllm_checkpoint from the export before it",
                    )
                )
            from optimizer.plan import Exports, TrtllmCheckpoint

            exports = Exports(
                trtllm_checkpoint=TrtllmCheckpoint(),
                hf_checkpoint=bool(exports and exports.hf_checkpoint),
            )
        return plan.but(draft=self.method, draft_len=self.draft_len, exports=exports), problems

    def inputs(self, base_dir: Path) -> list[Input]:
        if self.method == "draft_target":
            assert self.draft_model is not None
            return [model_source_input("draft_model", self.draft_model, base_dir)]
        return [self.data.as_input(base_dir)]

    def head_config(self):
        from optimizer.techniques.speculative import DraftHeadConfig

        fields = {
            f: getattr(self, f) for f in HEAD_FIELDS[self.method] if f in self.model_fields_set
        }
        if self.method == "medusa":
            fields["medusa_heads"] = self.resolved_medusa_heads
        return DraftHeadConfig(method=self.method, **fields)

    @property
    def resolved_medusa_heads(self) -> int:
        """Medusa heads as set, else one per drafted token."""
        return self.medusa_heads or self.draft_len

    # ------------------------------------------------------------------ run

    def run(self, ctx: StageContext) -> StageResult:
        from optimizer import hardware, models
        from optimizer.techniques import speculation, speculative
        from optimizer.training_data import load_documents, pack_splits, split_documents

        tokenizer = ctx.tokenizer()
        model = ctx.model()
        metrics: dict[str, Any] = {"method": self.method, "draft_len": self.draft_len}
        outputs: dict[str, Path] = {}
        docs = load_documents(self.data, ctx.recipe.base_dir)
        train_docs, heldout_docs = split_documents(self.data, docs, self.seed)
        prompts = _prompts(heldout_docs, tokenizer, self.acceptance.num_prompts, model.device)
        if self.method == "draft_target":
            source = models.resolve_source(self.draft_model, ctx.recipe.base_dir)
            draft_model = models.load_model(
                source.path, ctx.state.compute_dtype, ctx.state.trust_remote_code
            ).to(model.device)
            drafter = speculation.ModelDrafter(draft_model.eval())
            forward = speculation.plain_forward(model)
        else:
            if self.generate is not None:
                train_docs = _generated(model, tokenizer, train_docs, self.generate, ctx.log)
            splits = pack_splits(self.data, train_docs, heldout_docs, tokenizer, self.seq_len)
            import torch

            torch.manual_seed(self.seed)  # the head's initialisation: a rerun trains the same
            speculative.convert_draft_head(model, self.head_config())
            from optimizer.techniques.train import train

            training = train(
                model,
                self,
                splits,
                output_dir=ctx.checkpoint_dir(),
                bf16_autocast=hardware.gpu_present() and ctx.state.compute_dtype == "bfloat16",
            )
            report = ctx.new_output("training")
            write_training_report(report, self.name, training)
            outputs["training"] = report
            metrics["training"] = training
            model.eval()
            drafter = (
                speculative.EagleDrafter(model)
                if self.method == "eagle3"
                else speculative.MedusaDrafter(model)
            )
            forward = speculative.base_forward(model)
        ctx.log.info(
            "acceptance: %d held-out prompts, %d new tokens each, draft_len %s",
            len(prompts),
            self.acceptance.max_new_tokens,
            ", ".join(map(str, [self.draft_len, *self.acceptance.draft_lens])),
        )
        reports = speculation.measure_acceptance(
            forward,
            drafter,
            prompts,
            draft_lens=[self.draft_len, *self.acceptance.draft_lens],
            max_new_tokens=self.acceptance.max_new_tokens,
            eos_token_ids=_eos_ids(model, tokenizer),
            compare_greedy=self.acceptance.compare_greedy,
            cache_config=getattr(model, "config", None),
        )
        report = reports[self.draft_len]
        metrics["acceptance"] = report.as_dict()
        if self.acceptance.draft_lens:
            metrics["acceptance_by_draft_len"] = {str(k): r.as_dict() for k, r in reports.items()}
        for k, r in reports.items():
            ctx.log.info(
                "draft_len %d: mean acceptance length %.3f (of at most %d); by position %s; "
                "speed-up %s",
                k,
                r.mean_acceptance_length,
                k + 1,
                [round(x, 3) for x in r.acceptance_rate_by_position],
                f"{r.speedup:.2f}x" if r.speedup else "not measured",
            )
        for warning in greedy_mismatches(reports, ctx.state.compute_dtype):
            ctx.log.warning("%s", warning)
        if self.method == "draft_target":
            out = ctx.new_output("draft")
            models.save_in_dtype(draft_model, out, ctx.state.dtype, ctx.state.compute_dtype)
            tokenizer.save_pretrained(out)
            outputs["draft"] = out
            metrics["draft_model"] = {"source": self.draft_model, "path": str(source.path)}
        else:
            key = "trtllm_checkpoint" if self.method == "medusa" else "draft"
            out = ctx.new_output(key)
            exported = speculative.export_draft_head(
                model, self.head_config(), out, dtype=ctx.state.dtype
            )
            if self.method == "medusa":
                _set_max_draft_len(out, self.draft_len)
                exported["summary"]["max_draft_len"] = self.draft_len
            outputs[key] = out
            metrics["export"] = exported
        result = StageResult(outputs=outputs, metrics=metrics)
        floor = self.min_acceptance_length
        if floor is not None and report.mean_acceptance_length < floor:
            result.gate_failure = (
                f"draft acceptance gate failed: mean acceptance length "
                f"{report.mean_acceptance_length:.3f} < min_acceptance_length {floor}"
            )
        return result


def greedy_mismatches(reports: dict, compute_dtype: str) -> list[str]:
    """Warnings for the draft lengths whose outputs left plain greedy decoding; in float32,
    where verification is exact (the CPU tests), an OptimizerError instead. In bf16/fp16 a
    (k+1)-token verification forward rounds differently from a one-token forward, so a
    near-tie flips a token: serving engines verify the same way."""
    mismatched = {k: r for k, r in reports.items() if r.matches_greedy is False}
    if mismatched and compute_dtype == "float32":
        raise OptimizerError(
            "speculative decoding changed the output against plain greedy decoding in float32 "
            f"(draft_len {', '.join(str(k) for k in mismatched)}): the verification is not "
            "exact on this model; report it"
        )
    return [
        f"draft_len {k}: {r.prompts_matching_greedy} of {r.prompts} generations equal plain "
        f"greedy decoding in {compute_dtype} (a batched verification forward rounds "
        "differently from a one-token forward; exactness holds in float32)"
        for k, r in mismatched.items()
    ]


def _set_max_draft_len(checkpoint: Path, draft_len: int) -> None:
    """ModelOpt writes max_draft_len 63 into the Medusa config; trtllm-build takes the
    engine's from --max_draft_len, but the checkpoint should not claim more than was
    measured."""
    cfg_file = checkpoint / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["max_draft_len"] = draft_len
    cfg_file.write_text(json.dumps(cfg, indent=4))


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def _prompt_text(doc, tokenizer) -> str:
    """A conversation's first user turn, as the chat template asks the model to answer it;
    prose: its first 400 characters."""
    if isinstance(doc, list):
        turn = next((t for t in doc if t.get("role") == "user"), doc[0])
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template([turn], tokenize=False, add_generation_prompt=True)
        return turn["content"]
    return doc[:400]


def _prompts(docs, tokenizer, n: int, device) -> list:
    import torch

    out = []
    for doc in docs[:n]:
        ids = tokenizer(_prompt_text(doc, tokenizer), add_special_tokens=False)["input_ids"]
        out.append(torch.tensor([ids[-1024:]], device=device))
    if not out:
        raise OptimizerError("no held-out documents to measure the acceptance on")
    return out


def _generated(model, tokenizer, docs, spec: Generate, log) -> list:
    """The model's greedy replies to the documents' prompts, as conversations (or prose
    continuations), batched with left padding."""
    import torch

    docs = docs[: spec.num_prompts] if spec.num_prompts else docs
    texts = [_prompt_text(d, tokenizer) for d in docs]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    try:
        for start in range(0, len(texts), spec.batch_size):
            batch = texts[start : start + spec.batch_size]
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(model.device)
            with torch.inference_mode():
                gen = model.generate(
                    **enc,
                    do_sample=False,
                    max_new_tokens=spec.max_new_tokens,
                    pad_token_id=pad,
                )
            replies = tokenizer.batch_decode(
                gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for doc, reply in zip(docs[start : start + spec.batch_size], replies, strict=True):
                if isinstance(doc, list):
                    turn = next((t for t in doc if t.get("role") == "user"), doc[0])
                    out.append([turn, {"role": "assistant", "content": reply}])
                else:
                    out.append(doc[:400] + reply)
            log.info("generated replies: %d / %d", len(out), len(texts))
    finally:
        tokenizer.padding_side = side
    return out
