"""``gate``: lm-eval accuracy of the optimized model against the unoptimized baseline.

Evaluates the baseline (the recipe's source model, cached per model fingerprint and suite
settings) and the candidate on the same documents and judges every metric with paired
statistics (optimizer/gate.py). Writes ``gate.json``, ``report.md`` and ``report.html``;
a failed gate still writes them, and the run exits 3.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from optimizer.errors import OptimizerError
from optimizer.inputs import Input, checkpoint_input, dir_input, file_input, package_input
from optimizer.plan import Environment, ModelPlan
from optimizer.stages.base import Stage, StageProblem, StageResult

if TYPE_CHECKING:
    from optimizer.context import StageContext


class EndpointSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(
        description="full completions URL, e.g. http://localhost:8000/v1/completions"
    )
    model: str = Field(description="model name the server expects")


class Gate(Stage):
    """Accept or reject the optimized model on accuracy."""

    name = "gate"
    feeds_later = False  # a verdict: no later stage reads it
    artifact_keys = ("gate", "report")

    suite: str = Field(
        description="suite YAML (tasks, metrics, limits, thresholds), relative to the recipe"
    )
    evaluate: Literal["model", "checkpoint", "endpoint"] = Field(
        "model",
        description="model: the in-memory optimized model; checkpoint: reloaded from disk; "
        "endpoint: a served model (OpenAI-compatible completions)",
    )
    candidate: str | None = Field(
        None, description="evaluate this checkpoint directory instead of the pipeline's model"
    )
    endpoint: EndpointSpec | None = None
    max_drop: dict[str, float] = Field(
        default_factory=dict,
        description="absolute-drop thresholds overriding the suite's, by 'task/metric' or 'default'",
    )
    limit: int | None = Field(None, gt=0, description="documents per task, overriding the suite")
    on_inconclusive: Literal["fail", "pass"] = "fail"

    @model_validator(mode="after")
    def _endpoint(self):
        if (self.evaluate == "endpoint") != (self.endpoint is not None):
            raise ValueError(
                "evaluate: endpoint goes with an `endpoint:` section (base_url, model), and only with it"
            )
        return self

    def suite_path(self, base_dir: Path) -> Path:
        """The suite file: a path (absolute, or relative to the recipe, then the cwd) or, when
        no such file exists, a shipped suite by name (``quick``: optimizer/resources/suites)."""
        from optimizer import resources

        p = Path(self.suite).expanduser()
        if p.is_absolute():
            return p
        if (base_dir / p).exists():
            return base_dir / p
        if p.exists() or not resources.is_name(self.suite):
            return p.resolve()
        return resources.suite(self.suite)  # an unknown name: OptimizerError, did-you-mean

    def plan(self, prev: ModelPlan, env: Environment) -> tuple[ModelPlan, list[StageProblem]]:
        from optimizer.evaluation import load_suite

        plan, problems = super().plan(prev, env)
        try:
            load_suite(self.suite_path(env.base_dir))
        except OptimizerError as e:
            problems.append(("suite", str(e)))
        return plan, problems

    def inputs(self, base_dir: Path) -> list[Input]:
        from optimizer.evaluation import LOCAL_TASKS

        inputs = [
            file_input("suite", self.suite_path(base_dir)),
            dir_input("tasks", LOCAL_TASKS),
            dir_input("task_data", LOCAL_TASKS.parent / "data"),
            package_input("lm-eval"),
        ]
        if self.candidate is not None:
            inputs.append(checkpoint_input("candidate", Path(self.candidate).expanduser()))
        return inputs

    def artifacts(self, outputs: dict[str, dict[str, str]]) -> dict[str, str]:
        report = outputs.get("report")
        if not report:
            return {}
        return {
            "gate": str(Path(report["path"]) / "gate.json"),
            "report": str(Path(report["path"]) / "report.html"),
        }

    def resolved_suite(self, base_dir: Path):
        from optimizer.evaluation import Threshold, load_suite

        suite = load_suite(self.suite_path(base_dir))
        updates: dict = {}
        if self.limit:
            updates["limit"] = self.limit
            updates["tasks"] = [t.model_copy(update={"limit": None}) for t in suite.tasks]
        if self.max_drop:
            updates["thresholds"] = {
                **suite.thresholds,
                **{k: Threshold(max_drop=v) for k, v in self.max_drop.items()},
            }
        return suite.model_copy(update=updates)

    def run(self, ctx: StageContext) -> StageResult:
        from optimizer import gate, models, report
        from optimizer.evaluation import LOCAL_TASKS, evaluate_suite

        suite = self.resolved_suite(ctx.recipe.base_dir)
        state = ctx.state
        tokenizer = ctx.tokenizer()
        key = gate.baseline_key(
            state.source_fingerprint, suite, state.dtype, LOCAL_TASKS, state.compute_dtype
        )
        cache_file = gate.baseline_path(models.cache_dir(), key)
        t0 = time.time()
        baseline = gate.load_baseline(cache_file, key)
        cached = baseline is not None
        if cached:
            ctx.log.info("baseline: reusing cached scores (%s)", cache_file.name)
        else:
            ctx.log.info("baseline: evaluating %s on suite %s", state.source_path, suite.name)
            base_model = models.load_model(
                state.source_path, state.compute_dtype, state.trust_remote_code
            )
            baseline = evaluate_suite(base_model, tokenizer, suite)
            del base_model
            gate.save_baseline(cache_file, key, baseline)
        baseline_seconds = time.time() - t0

        t0 = time.time()
        candidate = self._evaluate_candidate(ctx, suite, tokenizer)
        candidate_seconds = time.time() - t0
        verdict = gate.decide(suite, baseline, candidate, self.on_inconclusive)
        meta = {
            "suite": suite.name,
            "evaluated": self.candidate or self.evaluate,
            "baseline_model": str(state.source_path),
            "baseline_cached": cached,
            "baseline_seconds": round(baseline_seconds, 1),
            "candidate_seconds": round(candidate_seconds, 1),
            "recipe": ctx.recipe.name,
        }
        out = ctx.new_output("report")
        report.write_reports(out, verdict, meta)
        for m in verdict["metrics"]:
            ctx.log.info(
                "gate %s: %s %.4f -> %.4f (%s)",
                m["metric"],
                m["verdict"],
                m["baseline"],
                m["candidate"],
                m["reason"],
            )
        result = StageResult(
            outputs={"report": out},
            metrics={
                "passed": verdict["passed"],
                "failing": verdict["failing"],
                "baseline_cached": cached,
                **{
                    m["metric"]: {
                        "baseline": m["baseline"],
                        "candidate": m["candidate"],
                        "verdict": m["verdict"],
                    }
                    for m in verdict["metrics"]
                },
            },
        )
        if not verdict["passed"]:
            result.gate_failure = (
                f"accuracy gate failed on {', '.join(verdict['failing'])} "
                "(see {run_dir}/report/report.md)"
            )
        return result

    def _evaluate_candidate(self, ctx: StageContext, suite, tokenizer):
        from optimizer import models
        from optimizer.evaluation import evaluate_suite

        if self.evaluate == "endpoint":
            from optimizer.endpoint import endpoint_lm, probe_prompt_logprobs

            assert self.endpoint is not None
            probe = tokenizer("The capital of France is Paris.")["input_ids"]
            reason = probe_prompt_logprobs(self.endpoint.base_url, self.endpoint.model, probe)
            if reason:
                raise OptimizerError(
                    f"endpoint {self.endpoint.base_url} cannot be gated on loglikelihood tasks: {reason}. "
                    "lm-eval would silently score every choice alike; serve a backend that returns prompt "
                    "logprobs, or evaluate the checkpoint instead (evaluate: checkpoint)"
                )
            lm = endpoint_lm(
                self.endpoint.base_url,
                self.endpoint.model,
                str(ctx.state.checkpoint),
                suite.batch_size,
                suite.max_length,
            )
            return evaluate_suite(None, None, suite, lm=lm)
        if self.candidate is not None:
            path = Path(self.candidate).expanduser()
            if not (path / "config.json").is_file():
                raise OptimizerError(
                    f"gate.candidate {path} is not a checkpoint directory (no config.json)"
                )
            model = models.load_model(path, ctx.state.compute_dtype, ctx.state.trust_remote_code)
        elif self.evaluate == "checkpoint" or ctx.state.model is None:
            # The saved state (after an export invalidated the live model, or when asked for):
            # loaded as the gate's own copy, not handed on to later stages.
            ctx.log.info("candidate: loading %s", ctx.state.checkpoint)
            model = models.load_model(
                ctx.state.checkpoint, ctx.state.compute_dtype, ctx.state.trust_remote_code
            )
        else:
            return evaluate_suite(ctx.model(), tokenizer, suite)  # shared: evaluated as it is
        fold_fake_quant_weights(model)
        return evaluate_suite(model, tokenizer, suite)


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
