"""``search``: quantize to the candidate format, and while the accuracy gate rejects the
model, move the most sensitive layer groups to a higher precision and try again.

The technique is :func:`optimizer.techniques.search.search`; the judge of every trial is the
gate's own ``evaluate_and_judge`` on what would ship: the trial exported to a unified HF
checkpoint (in a scratch directory of the run) and rebuilt from its files, against the run's
baseline (evaluated once: the baseline cache serves every later trial and the recipe's final
gate). The in-memory fake-quant model is not judged: on an H200 it passed a gate that its own
export then failed (bench/results/search-gpu.md). Each judged trial is saved in the stage's
checkpoint directory, so a killed search resumes without redoing one.

Outputs ``search/``: ``search.json`` (every trial: groups moved, effective bits, size,
metrics, verdict; the sensitivity ranking), ``search.md`` and ``search.html``. When no trial
passes within the budget the stage keeps the best candidate (smallest shortfall), later
stages still run, and the run exits 3.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from optimizer.formats import FORMATS, check_block_size
from optimizer.inputs import Input
from optimizer.plan import Environment, LayerFormat, ModelPlan, Quantization
from optimizer.stages._gating import GateCriteria, baseline_of
from optimizer.stages.base import Stage, StageProblem, StageResult, quantizing_problems
from optimizer.techniques.auto_quantize import MIXABLE
from optimizer.techniques.search import Judged, SearchConfig, SearchState

if TYPE_CHECKING:
    from optimizer.context import StageContext
    from optimizer.evaluation import Judgement

STATE_FILE = "search-state.json"


def shortfall(judgement: Judgement) -> float:
    """How far the failing metrics miss: the drop beyond the allowed drop, or the distance
    below a floor, summed (0 for a pass)."""
    total = 0.0
    for m in judgement.verdict.metrics:
        if m.verdict == "pass":
            continue
        if m.allowed_drop is not None:
            total += max(0.0, -m.delta - m.allowed_drop)
        elif "min_value" in m.threshold:
            total += max(0.0, m.threshold["min_value"] - m.candidate)
        total += m.delta_stderr  # inconclusive ones count by their noise
    return total


def write_report(out: Path, report: dict) -> None:
    """``search.md`` and a self-contained ``search.html``: the trials (the kept one marked),
    the plot of accuracy against effective bits with the front, the most sensitive groups."""
    from statistics import fmean

    from optimizer.tradeoff import Column, write_tradeoff_report

    rows = [
        {
            "trial": f"{t['index']}{' (kept)' if t['index'] == report['chosen'] else ''}",
            "label": str(t["index"]),
            "moved": len(t["moved"]),
            "effective_bits": t["effective_bits"],
            "weight_mb": t["weight_bytes"] / 1e6,
            "accuracy": fmean(t["metrics"].values()) if t["metrics"] else None,
            "passed": t["passed"],
            "verdict": "pass" if t["passed"] else f"fail: {', '.join(t['failing'])}",
        }
        for t in report["trials"]
    ]
    baseline = report.get("baseline") or {}
    notes = [
        f"{'Passed' if report['passed'] else 'No trial passed'}; kept trial {report['chosen']} "
        f"of {len(report['trials'])} ({report['seconds']:.0f} s). Accuracy: the mean of the "
        "suite's metrics" + (f" (baseline {fmean(baseline.values()):.4f})." if baseline else "."),
    ]
    if report["ranking"]:
        notes.append(
            "Most sensitive layer groups (KL when quantized alone): "
            + "; ".join(f"`{r['group']}` {r['kl']:.3g}" for r in report["ranking"][:10])
        )
    write_tradeoff_report(
        out,
        f"Search from {report['candidate']} (fallback {report['fallback']}), suite "
        f"{report['suite']}",
        rows,
        "effective_bits",
        "accuracy",
        columns=[
            Column("trial", "trial"),
            Column("moved", "groups moved"),
            Column("effective_bits", "effective bits", "{:.3f}"),
            Column("weight_mb", "weight MB", "{:.1f}"),
            Column("accuracy", "accuracy", "{:.4f}"),
            Column("verdict", "verdict"),
        ],
        x_label="effective bits per weight",
        y_label="mean accuracy",
        label_key="label",
        pass_key="passed",
        reference_y=fmean(baseline.values()) if baseline else None,
        notes=notes,
        stem="search",
    )


class Search(Stage, SearchConfig, GateCriteria):
    """Find the fewest layers to keep in higher precision for the gate to pass."""

    name = "search"
    transforms_model = True
    needs_calibration = True
    imports = ("modelopt.torch.quantization", "lm_eval.evaluator")

    def plan(self, prev: ModelPlan, env: Environment) -> tuple[ModelPlan, list[StageProblem]]:
        plan, problems = super().plan(prev, env)
        problems += quantizing_problems(prev, per_layer_formats=True)
        for key, fmt in (("format", self.format), ("fallback", self.fallback)):
            if fmt == "none":
                continue
            if FORMATS[fmt].needs_gpu and env.gpu is False:
                problems.append((key, f"{fmt} needs a CUDA GPU and this machine has none"))
            group = self.group_size if key == "format" else None
            where = "group_size" if group else key
            problems += [(where, m) for m in check_block_size(fmt, group, prev.config)]
        if self.fallback != "none":
            unmixable = [f for f in (self.format, self.fallback) if f not in MIXABLE]
            if unmixable:
                problems.append(
                    (
                        "fallback",
                        f"{', '.join(unmixable)} cannot be mixed per layer in one TensorRT-LLM "
                        f"checkpoint; mixable: {', '.join(MIXABLE)} (or fallback: none)",
                    )
                )
        problems += self.suite_problems(env.base_dir)
        kv = None if self.kv_cache == "none" else self.kv_cache
        from optimizer.unified.rebuild import plan_problem

        candidates = [self.format] + ([self.fallback] if self.fallback != "none" else [])
        if problem := plan_problem(candidates, kv):
            problems.append(
                ("format", f"the search judges each trial's unified HF export, and {problem}")
            )
        spec = FORMATS[self.format]
        formats = [LayerFormat(format=self.format, group_size=self.group_size)]
        if self.fallback != "none":
            formats.append(LayerFormat(format=self.fallback))
        quantization = Quantization(
            by=f"search from {self.format} (fallback {self.fallback})",
            formats=tuple(formats),
            trtllm_algo="MIXED_PRECISION" if self.fallback != "none" else spec.trtllm_algo,
            trtllm_note=spec.trtllm_note,
            kv_cache=kv,
            exclude=tuple(self.exclude),
        )
        return plan.but(quantization=quantization), problems

    def inputs(self, base_dir: Path) -> list[Input]:
        return self.suite_inputs(base_dir)

    def run(self, ctx: StageContext) -> StageResult:
        from optimizer import models
        from optimizer.calibration import batches
        from optimizer.evaluation import evaluate_and_judge, make_candidate
        from optimizer.exporters import export_unified_hf_checkpoint
        from optimizer.hardware import release_memory
        from optimizer.rundir import write_atomic
        from optimizer.techniques.search import best_trial, search

        assert ctx.recipe.calibration is not None
        suite = self.effective_suite(ctx.recipe.base_dir)
        baseline = baseline_of(ctx.state)
        tokenizer = ctx.tokenizer()
        evaluations = {"baseline": 0}
        baseline_scores: dict[str, float] = {}

        def judge(model) -> Judged:
            # What ships is judged: the trial exported to a unified HF checkpoint (a copy:
            # the export packs weights in place) and rebuilt from those files, as the final
            # gate does; the in-memory fake-quant model disagrees with it on some documents.
            scratch = ctx.directory.temp_output(ctx.index, "trial")
            try:
                exported = copy.deepcopy(model)
                models.cast_to_storage(exported, ctx.recipe.model.dtype, ctx.state.compute_dtype)
                export_unified_hf_checkpoint(exported, scratch, dtype=ctx.recipe.model.dtype)
                del exported
                release_memory()  # before the judge loads the rebuilt export
                tokenizer.save_pretrained(scratch)
                judgement = evaluate_and_judge(
                    suite,
                    baseline,
                    make_candidate(
                        "checkpoint",
                        scratch,
                        tokenizer=tokenizer,
                        trust_remote_code=ctx.state.trust_remote_code,
                    ),
                    cache_dir=models.cache_dir(),
                    on_inconclusive=self.on_inconclusive,
                    log=ctx.log,
                )
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            evaluations["baseline"] += not judgement.baseline_cached
            baseline_scores.update({m.metric: m.baseline for m in judgement.verdict.metrics})
            return Judged(
                passed=judgement.passed,
                failing=list(judgement.verdict.failing),
                shortfall=round(shortfall(judgement), 6),
                metrics={m.metric: m.candidate for m in judgement.verdict.metrics},
            )

        state_file = ctx.checkpoint_dir() / STATE_FILE
        state = (
            SearchState.model_validate_json(state_file.read_text())
            if state_file.is_file()
            else None
        )
        if state is not None:
            ctx.log.info("search: resuming after %d judged trial(s)", len(state.trials))

        def save(s: SearchState) -> None:
            if ctx.directory.writer:
                write_atomic(state_file, s.model_dump_json(indent=1))

        tokens = ctx.calibration_tokens()
        model, state, chosen = search(
            ctx.model(),
            self,
            # each trial calibrates a copy while the model stays resident: not measured
            forward_loop=ctx.forward_loop(measured=False),
            batches=list(batches(tokens, ctx.calibration_batch_size())),
            judge=judge,
            state=state,
            save_state=save,
            log=ctx.log,
        )
        ctx.state.model = model
        trial = state.trials[chosen]
        out = ctx.new_output("search")
        report = {
            "candidate": self.format,
            "fallback": self.fallback,
            "suite": suite.name,
            "passed": trial.passed,
            "chosen": chosen,
            "baseline": baseline_scores,  # empty when every trial was judged before a resume
            "trials": [t.model_dump(mode="json") for t in state.trials],
            "ranking": [{"group": g, "kl": kl} for g, kl in state.ranking],
            "seconds": round(state.seconds, 3),
        }
        (out / "search.json").write_text(json.dumps(report, indent=1))
        write_report(out, report)
        metrics = {
            "passed": trial.passed,
            "trials": len(state.trials),
            "chosen": chosen,
            "moved": trial.moved,
            "effective_bits": trial.effective_bits,
            "weight_bytes": trial.weight_bytes,
            "baseline_evaluations": evaluations["baseline"],
            "search_seconds": round(state.seconds, 3),
        }
        result = StageResult(outputs={"search": out}, metrics=metrics)
        ctx.log.info(
            "search: trial %d of %d kept, %d group(s) in %s, %.2f effective bits",
            chosen,
            len(state.trials),
            len(trial.moved),
            self.fallback,
            trial.effective_bits,
        )
        if not trial.passed:
            best = state.trials[best_trial(state.trials)]
            result.gate_failure = (
                f"search: no trial passed the gate in {len(state.trials)} trial(s); kept the "
                f"best candidate, trial {best.index} (failing: {', '.join(best.failing)}; see "
                "{run_dir}/"
                + f"{ctx.directory.stage_dir(ctx.index, self.name).relative_to(ctx.run_dir)}"
                + "/search/search.md)"
            )
        return result
