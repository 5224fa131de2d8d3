"""``gate``: lm-eval accuracy of the optimized model against the unoptimized baseline.

Evaluates the baseline (the recipe's source model, cached per model fingerprint and suite
settings) and the candidate on the same documents and judges every metric with paired
statistics: a thin adapter from the run's state to ``optimizer.evaluation.evaluate_and_judge``.
Writes ``gate.json``, ``report.md`` and ``report.html``; a failed gate still writes them, and
the run exits 3.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from optimizer.errors import OptimizerError
from optimizer.inputs import Input, checkpoint_input
from optimizer.plan import Environment, ModelPlan
from optimizer.stages._gating import GateCriteria, baseline_of
from optimizer.stages.base import Stage, StageProblem, StageResult

if TYPE_CHECKING:
    from optimizer.context import StageContext


class EndpointSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(
        description="full completions URL, e.g. http://localhost:8000/v1/completions"
    )
    model: str = Field(description="model name the server expects")


class Gate(Stage, GateCriteria):
    """Accept or reject the optimized model on accuracy."""

    name = "gate"
    feeds_later = False  # a verdict: no later stage reads it
    artifact_keys = ("gate", "report")
    imports = ("lm_eval.evaluator",)

    evaluate: Literal["export", "model", "checkpoint", "endpoint"] | None = Field(
        None,
        description="export (the default after an export stage): the model rebuilt from the "
        "exported unified HF checkpoint (or, when it was not exported, the TensorRT-LLM "
        "checkpoint), what ships; model (the default otherwise): the in-memory optimized "
        "model; checkpoint: the pipeline's saved model reloaded with its ModelOpt state; "
        "endpoint: a served model (OpenAI-compatible completions)",
    )
    candidate: str | None = Field(
        None, description="evaluate this checkpoint directory instead of the pipeline's model"
    )
    endpoint: EndpointSpec | None = None

    @model_validator(mode="after")
    def _endpoint(self):
        if (self.evaluate == "endpoint") != (self.endpoint is not None):
            raise ValueError(
                "evaluate: endpoint goes with an `endpoint:` section (base_url, model), and only with it"
            )
        return self

    def candidate_path(self, base_dir: Path) -> Path | None:
        """``candidate``: absolute, or relative to the recipe, then the cwd."""
        from optimizer.resources import local_path

        return None if self.candidate is None else local_path(self.candidate, base_dir)

    def plan(self, prev: ModelPlan, env: Environment) -> tuple[ModelPlan, list[StageProblem]]:
        from optimizer.evaluation.candidates import checkpoint_problem

        plan, problems = super().plan(prev, env)
        exports = prev.exports
        hf = exports is not None and exports.hf_checkpoint
        trtllm = exports.trtllm_checkpoint if exports is not None else None
        exported = hf or trtllm is not None
        evaluates_export = self.candidate is None and (
            self.evaluate == "export" or (self.evaluate is None and exported)
        )
        quant = prev.quantization
        problem = None
        if evaluates_export and not hf and trtllm is not None and (trtllm.tp, trtllm.pp) != (1, 1):
            problem = (
                f"a TensorRT-LLM checkpoint sharded tp {trtllm.tp} x pp {trtllm.pp} cannot be "
                "rebuilt (export hf_checkpoint: true beside it, or tp: 1, pp: 1)"
            )
        elif evaluates_export and exported and quant is not None and quant.formats:
            # The hf_checkpoint is what the gate rebuilds when both were exported.
            if hf:
                from optimizer.unified.rebuild import plan_problem
            else:
                from optimizer.trtllm.rebuild import plan_problem

            problem = plan_problem([f.format for f in quant.formats], quant.kv_cache)
        if problem:
            problems.append(
                (
                    "evaluate",
                    f"the gate evaluates the exported checkpoint, and {problem}; set "
                    "evaluate: model to gate the pipeline's in-memory model instead",
                )
            )
        if self.evaluate == "export" and self.candidate is None and not exported:
            problems.append(
                (
                    "evaluate",
                    "export evaluates the checkpoint an earlier export stage writes "
                    "(hf_checkpoint, or a TensorRT-LLM checkpoint); add an export stage before "
                    "this gate or use evaluate: model",
                )
            )
        problems += self.suite_problems(env.base_dir)
        candidate = self.candidate_path(env.base_dir)
        if candidate is not None:
            problem = checkpoint_problem(candidate)  # a unified HF export: refused now
            if problem:
                problems.append(("candidate", problem))
        return plan, problems

    def inputs(self, base_dir: Path) -> list[Input]:
        inputs = self.suite_inputs(base_dir)
        candidate = self.candidate_path(base_dir)
        if candidate is not None:
            inputs.append(checkpoint_input("candidate", candidate))
        return inputs

    def artifacts(self, outputs: dict[str, dict[str, str]]) -> dict[str, str]:
        report = outputs.get("report")
        if not report:
            return {}
        return {
            "gate": str(Path(report["path"]) / "gate.json"),
            "report": str(Path(report["path"]) / "report.html"),
        }

    def run(self, ctx: StageContext) -> StageResult:
        from optimizer import models
        from optimizer.evaluation import (
            evaluate_and_judge,
            run_meta,
            training_stages,
            write_reports,
        )

        judgement = evaluate_and_judge(
            self.effective_suite(ctx.recipe.base_dir),
            baseline_of(ctx.state),
            self._candidate(ctx),
            cache_dir=models.cache_dir(),
            on_inconclusive=self.on_inconclusive,
            log=ctx.log,
        )
        out = ctx.new_output("report")
        meta = run_meta(
            judgement, evaluated=self.candidate or self._evaluate(ctx), recipe=ctx.recipe.name
        )
        write_reports(out, judgement.verdict, meta, training_stages(ctx.earlier_metrics))
        result = StageResult(outputs={"report": out}, metrics=judgement.summary())
        if not judgement.passed:
            result.gate_failure = (
                f"accuracy gate failed on {', '.join(judgement.verdict.failing)} "
                "(see {run_dir}/report/report.md)"
            )
        return result

    def _evaluate(self, ctx: StageContext) -> str:
        """``evaluate``, defaulted: what ships (the export) when an export wrote one."""
        if self.evaluate is not None:
            return self.evaluate
        exported = "hf_checkpoint" in ctx.artifacts or "trtllm_checkpoint" in ctx.artifacts
        return "export" if exported else "model"

    def _candidate(self, ctx: StageContext):
        """What this gate evaluates, checked (a refused checkpoint raises here)."""
        from optimizer.evaluation import make_candidate

        state = ctx.state
        evaluate = self._evaluate(ctx)
        if evaluate == "export" and self.candidate is None:
            # The unified HF checkpoint when both were exported (what most runtimes load);
            # else the TensorRT-LLM checkpoint, rebuilt from its files the same way.
            exported = ctx.artifacts.get("hf_checkpoint") or ctx.artifacts.get("trtllm_checkpoint")
            if exported is None:  # validation refuses this; a direct API call may not
                raise OptimizerError("evaluate: export, but no export stage wrote a checkpoint")
            return make_candidate(
                "checkpoint",
                Path(exported),
                tokenizer=ctx.tokenizer(),
                trust_remote_code=state.trust_remote_code,
            )
        if evaluate == "endpoint":
            assert self.endpoint is not None
            return make_candidate(
                "endpoint",
                self.endpoint.base_url,
                self.endpoint.model,
                tokenizer=state.checkpoint,
            )
        if self.candidate is not None:
            return make_candidate(
                "checkpoint",
                self.candidate_path(ctx.recipe.base_dir),
                tokenizer=ctx.tokenizer(),
                trust_remote_code=state.trust_remote_code,
            )
        if evaluate == "checkpoint" or state.model is None:
            # The saved state (after an export invalidated the live model, or when asked for):
            # loaded as the gate's own copy, not handed on to later stages.
            return make_candidate(
                "checkpoint",
                state.checkpoint,
                tokenizer=ctx.tokenizer(),
                trust_remote_code=state.trust_remote_code,
            )
        return make_candidate("model", ctx.model(), ctx.tokenizer())  # shared: evaluated as it is
