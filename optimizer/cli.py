"""The ``optimize`` command. Thin: parse arguments, call the library, map errors to exit codes.

Exit codes (a contract): 0 success; 1 a stage failed; 2 bad input; 3 the accuracy gate failed.
Nothing heavy (torch, transformers, modelopt) is imported before a verb needs it, so
``--help`` and ``validate`` are fast and need no GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from optimizer import __version__
from optimizer.console import capture_run_log, setup_process
from optimizer.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    GateFailed,
    OptimizerError,
    RecipeError,
    StageFailed,
)

log = logging.getLogger("optimizer")

EPILOG = """exit codes: 0 success, 1 a stage failed, 2 bad input (recipe, file, flag),
3 the accuracy gate failed (artifacts are still written)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optimize",
        description="Turn a Hugging Face checkpoint and a YAML recipe into accuracy-gated, "
        "deployable artifacts: ModelOpt stages (ptq, ...) -> TensorRT-LLM / unified HF "
        "checkpoints -> engines -> lm-eval gate.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"optimizer {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    run = verbs.add_parser(
        "run",
        help="run a recipe's stages into a run directory",
        description="Run RECIPE's stages in order. Writes DIR/run.json (status, resolved "
        "recipe, versions, per-stage records, artifacts), DIR/recipe.yaml and DIR/logs/.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "recipe",
        metavar="RECIPE",
        help="recipe YAML file, or a shipped recipe by name (quickstart)",
    )
    run.add_argument(
        "-o",
        "--output",
        metavar="DIR",
        type=Path,
        help="run directory (default: runs/<recipe name>)",
    )
    _add_set(run)
    _add_switches(
        run,
        resume="continue the run in DIR: stages finished with unchanged inputs are skipped, "
        "the rest redone",
        force="start over in DIR, deleting the previous run there",
        dry_run="validate and print the resolved recipe and stage plan; run nothing",
        quiet="only warnings and errors on the console (for jobs); logs/ is complete",
    )

    _add_sweep(verbs)

    validate = verbs.add_parser(
        "validate",
        help="check recipes without loading any model",
        description="Check every RECIPE (schema, stage order, files) and report every problem "
        "with file, line and key. Exit 2 if any recipe has a problem.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    validate.add_argument(
        "recipes", metavar="RECIPE", nargs="+", help="recipe YAML files or shipped recipe names"
    )
    validate.add_argument(
        "--device",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="the machine to validate for: this one (auto, default), or a CPU-only "
        "or CUDA GPU machine, e.g. to check a GPU job's recipe from a laptop",
    )
    _add_set(validate)

    check = verbs.add_parser(
        "check",
        help="check a TensorRT-LLM checkpoint or a (ModelOpt unified) Hugging Face checkpoint",
        description="""\
Check checkpoint directories without loading them (only safetensors headers are read).
Each is checked as what its config.json says it is:

TensorRT-LLM checkpoint (config.json + rank files): against TensorRT-LLM 1.2's contract:
  required config keys, quantization keys and algorithms, one rank file per rank, every
  required tensor and scale with its shape and dtype.
Hugging Face checkpoint: a ModelOpt unified one (export_hf_checkpoint; what TensorRT-LLM
  >= 1.3's PyTorch backend, vLLM and SGLang load) against ModelOpt 0.47's export:
  hf_quant_config.json and config.json's quantization_config present and agreeing, known
  quant_algo / kv_cache_quant_algo, group_size, exclude_modules naming real modules, each
  quantized linear's packed weight and scales (shape, dtype), KV-cache scales, unquantized
  tensors in the checkpoint dtype, tied embeddings, no missing or stray tensors, consistent
  safetensors headers and shard index. A plain (unquantized) one: the structure checks.

Exit 2 if anything is wrong (one line per problem, then hints).""",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument(
        "paths",
        metavar="PATH",
        nargs="+",
        type=Path,
        help="checkpoint directories (TensorRT-LLM or Hugging Face)",
    )

    gate = verbs.add_parser(
        "gate",
        help="gate an existing checkpoint or endpoint against its baseline on accuracy",
        description="Evaluate BASELINE and a candidate (a checkpoint directory, or a served "
        "OpenAI-compatible endpoint) on SUITE with lm-eval, judge every metric with paired "
        "statistics, write gate.json + report.md + report.html into DIR. Exit 3 if the gate fails.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gate.add_argument(
        "--baseline",
        required=True,
        metavar="MODEL",
        help="the unoptimized model: hub id, local directory or builtin:<name>",
    )
    target = gate.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--candidate",
        metavar="DIR",
        help="checkpoint directory to gate: a plain HF model, or a ModelOpt export, rebuilt "
        "from its own files (stored weights and scales); what cannot be rebuilt is refused",
    )
    target.add_argument("--endpoint", metavar="URL", help="completions URL of a served candidate")
    gate.add_argument("--endpoint-model", metavar="NAME", help="model name the endpoint expects")
    gate.add_argument(
        "--suite",
        required=True,
        metavar="SUITE",
        help="suite YAML file, or a shipped suite by name (quick, general, served)",
    )
    gate.add_argument(
        "-o",
        "--output",
        metavar="DIR",
        type=Path,
        default=Path("runs/gate"),
        help="run directory (default: runs/gate)",
    )
    gate.add_argument(
        "--max-drop",
        metavar="METRIC=VALUE",
        action="append",
        default=[],
        help="absolute-drop threshold, e.g. default=0.01 or local_arc_easy/acc=0.02",
    )
    gate.add_argument("--limit", type=int, help="documents per task (overrides the suite)")
    gate.add_argument(
        "--on-inconclusive",
        choices=("fail", "pass"),
        default="fail",
        help="what a drop within noise of the threshold counts as (default: fail)",
    )
    gate.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float16", "float32"),
        help="the models' dtype (default: bfloat16)",
    )
    gate.add_argument(
        "--compute-dtype",
        default="auto",
        choices=("auto", "bfloat16", "float16", "float32"),
        help="dtype to evaluate in; auto (default): --dtype, except float32 on a CPU without "
        "native bf16/fp16 math, where it is emulated several times slower",
    )
    gate.add_argument("--force", action="store_true", help="replace a previous gate run in DIR")
    gate.add_argument(
        "-q", "--quiet", action="store_true", help="only warnings and errors on the console"
    )

    report = verbs.add_parser(
        "report",
        help="regenerate a run's Markdown/HTML gate report from its gate.json",
        description="Rewrite RUN_DIR's report.md and report.html from gate.json and run.json.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    return parser


def _add_switches(p: argparse.ArgumentParser, **helps: str) -> None:
    """On/off flags with their help: ``dry_run`` is ``--dry-run``, ``quiet`` also ``-q``."""
    for name, text in helps.items():
        flags = ["-q", "--quiet"] if name == "quiet" else [f"--{name.replace('_', '-')}"]
        p.add_argument(*flags, action="store_true", help=text)


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override a recipe value, e.g. --set calibration.num_samples=64 or "
        "--set stages.ptq.kv_cache=fp8 (VALUE is parsed as YAML; repeatable)",
    )


SWEEP_EPILOG = """exit codes: 0 every variant ran and at least one passed its gate; 1 a variant
failed (a stage failed, or it could not run; the others still ran); 2 bad input (a grid, a
variant's recipe, a flag): nothing is written; 3 every variant ran and none passed its gate.
The report is written with 0, 1 and 3."""


def _add_sweep(verbs) -> None:
    sweep = verbs.add_parser(
        "sweep",
        help="run a recipe's variants over a grid of settings; report the accuracy/size front",
        description="""\
Run RECIPE once per point of a grid and report which variants are worth having: the Pareto
front of accuracy (the gate's) against size (the exported checkpoint's bytes, or the
effective bits per weight).

Each --grid KEY=V1,V2,... is an axis: a --set key path and its values (YAML, as --set's; a
comma inside [...] or quotes belongs to its value). The variants are the cartesian product of
the axes, each RECIPE with one value per axis set (after the --set overrides). Every variant
is validated as a full recipe before anything runs; it needs a gate stage (and, for --size
exported_bytes, an export stage).

Writes DIR/sweep.json (the grid; per variant its overrides, status, exit code, gate pass/fail,
per-metric scores, accuracy, effective bits, exported bytes; the front), DIR/sweep.md and
DIR/sweep.html (table with the front marked, plot of accuracy vs size with the front drawn),
and each variant's run directory DIR/variants/<name>/ (run.json, recipe.yaml, logs/, its
artifacts). The baseline is evaluated once: the gates of later variants reuse its cached
scores. --resume keeps the variants that finished (gate passed or failed) with the same
recipe and continues the others where they stopped.""",
        epilog=SWEEP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument("recipe", metavar="RECIPE", help="recipe YAML file or shipped recipe name")
    sweep.add_argument(
        "--grid",
        metavar="KEY=V1,V2",
        action="append",
        default=[],
        required=True,
        help="an axis of the grid, e.g. --grid stages.ptq.format=fp8,int4_awq (repeatable; "
        "the variants are every combination of the axes' values)",
    )
    sweep.add_argument(
        "-o",
        "--output",
        metavar="DIR",
        type=Path,
        help="sweep directory (default: runs/<recipe name>-sweep)",
    )
    _add_set(sweep)
    sweep.add_argument(
        "--accuracy",
        metavar="METRIC",
        default="mean",
        help="the accuracy of the front: mean (default: the mean of the gate's metrics, "
        "candidate scores) or one metric by name, e.g. local_arc_easy/acc",
    )
    sweep.add_argument(
        "--size",
        choices=("exported_bytes", "effective_bits"),
        default="exported_bytes",
        help="the size of the front: exported_bytes (default: the exported checkpoint's "
        "safetensors bytes) or effective_bits (stored bits per weight of the quantized linears)",
    )
    _add_switches(
        sweep,
        resume="continue the sweep in DIR: finished variants with the same recipe are kept, "
        "the others continue (their finished stages with unchanged inputs are kept)",
        force="start over in DIR, deleting the previous sweep there",
        dry_run="validate every variant and print them and their overrides; run nothing",
        quiet="only warnings and errors on the console (for jobs); each variant's logs/ is "
        "complete",
    )


def cmd_sweep(args: argparse.Namespace) -> int:
    from optimizer.rundir import check_output_dir
    from optimizer.sweep import FINISHED, default_sweep_dir, plan_sweep, run_sweep

    if args.resume and args.force:
        raise OptimizerError("--resume and --force contradict each other; pick one")
    if args.output is not None and not args.dry_run:
        check_output_dir(args.output)
    plan = plan_sweep(
        args.recipe, args.grid, args.overrides, accuracy=args.accuracy, size=args.size
    )
    directory = args.output or default_sweep_dir(plan)
    if args.dry_run:
        for variant, recipe in plan.variants:
            stages = " -> ".join(s.name for s in recipe.stages)
            print(f"{variant.slug}: {' '.join(variant.overrides)} ({stages})")
        print(f"# {len(plan.variants)} variant(s) into {directory}/variants/")
        return EXIT_OK
    outcome = run_sweep(
        plan, directory, resume=args.resume, force=args.force, capture=capture_run_log
    )
    record = outcome.record
    print(
        json.dumps(
            {
                "status": record.status,
                "sweep_json": str(outcome.directory / "sweep.json"),
                "report": record.report.get("html"),
                "front": record.front,
                "variants": {v.slug: v.status for v in record.variants},
            }
        )
    )
    failed = [v.slug for v in record.variants if v.status not in FINISHED]
    if failed:
        print(
            f"error: variant(s) {', '.join(failed)} failed (see "
            f"{outcome.directory}/variants/<name>/logs/run.log)",
            file=sys.stderr,
        )
    elif outcome.exit_code:
        print(
            f"error: no variant passed its gate (see {record.report['markdown']})", file=sys.stderr
        )
    return outcome.exit_code


def cmd_validate(args: argparse.Namespace) -> int:
    from optimizer.recipe import load_recipe

    failed = 0
    for path in args.recipes:
        try:
            recipe = load_recipe(path, args.overrides, device=args.device)
        except RecipeError as e:
            failed += 1
            for problem in e.problems:
                print(f"error: {problem}", file=sys.stderr)
        except OptimizerError as e:
            failed += 1
            print(f"error: {path}: {e}", file=sys.stderr)
        else:
            print(f"ok: {path} ({recipe.name}: {' -> '.join(s.name for s in recipe.stages)})")
    if failed:
        print(f"{failed} of {len(args.recipes)} recipe(s) invalid", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from optimizer.recipe import load_recipe
    from optimizer.rundir import check_output_dir

    if args.output is not None and not args.dry_run:
        check_output_dir(args.output)  # a file, under a file, not writable: exit 2 at once
    recipe = load_recipe(args.recipe, args.overrides)
    from optimizer.pipeline import default_run_dir, run_recipe

    run_dir = args.output or default_run_dir(recipe)
    if args.dry_run:
        print(recipe.to_yaml(), end="")
        print(f"# run directory: {run_dir}")
        for i, stage in enumerate(recipe.stages, 1):
            print(f"# [{i}/{len(recipe.stages)}] {stage.describe()}")
            command = stage.preview(Path(run_dir).resolve(), recipe.plans[i - 1])
            if command:
                print(f"# {stage.name} command: {command}")
        return EXIT_OK
    if args.resume and args.force:
        raise OptimizerError("--resume and --force contradict each other; pick one")
    outcome = run_recipe(
        recipe,
        run_dir,
        resume=args.resume,
        force=args.force,
        recipe_file=str(args.recipe),
        overrides=args.overrides,
        capture=capture_run_log,
    )
    print(
        json.dumps(
            {
                "status": outcome.record.status,
                "run_json": str(outcome.run_dir / "run.json"),
                "artifacts": outcome.record.artifacts,
                # where the time went: imports apart from each stage's own work
                "seconds": {
                    "startup": (outcome.record.startup or {}).get("seconds"),
                    **{
                        f"{s.index:02d}-{s.name}": s.seconds
                        for s in outcome.record.stages
                        if s.seconds is not None
                    },
                },
            }
        )
    )
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from optimizer import trtllm
    from optimizer.unified import check as unified

    failed = 0
    for path in args.paths:
        if not path.is_dir():
            print(f"error: {path}: not a directory", file=sys.stderr)
            failed += 1
            continue
        config = path / "config.json"
        if config.is_file():
            # Bad input is one line here, before either checker reads the file.
            try:
                data = json.loads(config.read_text())
            except (OSError, UnicodeDecodeError, ValueError) as e:
                print(f"error: {path}: config.json is not valid JSON: {e}", file=sys.stderr)
                failed += 1
                continue
            if not isinstance(data, dict):
                print(
                    f"error: {path}: config.json holds {type(data).__name__}, not a JSON object",
                    file=sys.stderr,
                )
                failed += 1
                continue
        hf = trtllm.kind_of(path) == "hf"
        problems = unified.check_hf_checkpoint(path) if hf else trtllm.check_checkpoint(path)
        if not problems and hf:
            s = unified.summarize(path)
            what = (
                f"unified HF checkpoint, quant_algo {s['quant_algo']}, kv cache "
                f"{s['kv_cache_quant_algo']}"
                if s["quant_algo"] or s["kv_cache_quant_algo"]
                else "Hugging Face checkpoint, unquantized"
            )
            layout = "" if s["layout_known"] else ", tensor list not known: layers not counted"
            print(
                f"ok: {path} ({what}, {s['architecture']}{layout}, {s['tensors']} tensors in "
                f"{s['files']} file(s), {s['bytes'] / 1e6:.1f} MB)"
            )
            continue
        if not problems:
            s = trtllm.summarize(path)
            print(
                f"ok: {path} (quant_algo {s['quant_algo']}, kv cache {s['kv_cache_quant_algo']}, "
                f"{s['world_size']} rank(s), {s['bytes'] / 1e6:.1f} MB)"
            )
            continue
        failed += 1
        hints: list[str] = []
        for problem in problems:
            print(f"error: {path}: {problem.message}", file=sys.stderr)
            if problem.hint not in hints:
                hints.append(problem.hint)
        for hint in hints:
            print(f"  hint: {hint}", file=sys.stderr)
    return EXIT_BAD_INPUT if failed else EXIT_OK


def cmd_gate(args: argparse.Namespace) -> int:
    from optimizer.release_gate import GateRequest, gate_artifact

    max_drop = {}
    for item in args.max_drop:
        key, _, value = item.partition("=")
        try:
            max_drop[key.strip()] = float(value)
        except ValueError:
            raise OptimizerError(
                f"--max-drop {item!r}: expected METRIC=NUMBER, e.g. default=0.01"
            ) from None
    if args.limit is not None and args.limit <= 0:
        raise OptimizerError(f"--limit {args.limit}: must be a positive number of documents")
    request = GateRequest(
        baseline=args.baseline,
        suite=args.suite,
        output=args.output,
        candidate=Path(args.candidate) if args.candidate else None,
        endpoint=args.endpoint,
        endpoint_model=args.endpoint_model,
        max_drop=max_drop,
        limit=args.limit,
        on_inconclusive=args.on_inconclusive,
        dtype=args.dtype,
        compute_dtype=args.compute_dtype,
        force=args.force,
    )
    record = gate_artifact(request, capture=capture_run_log)
    print(
        json.dumps(
            {
                "status": record.status,
                "run_json": str(Path(args.output).resolve() / "run.json"),
                "artifacts": record.artifacts,
            }
        )
    )
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from optimizer.evaluation import regenerate
    from optimizer.rundir import RunDirectory

    # run.json is validated (RunRecord) before anything in it is trusted.
    run = RunDirectory(args.run_dir, rank=0)
    if not run.path.is_dir():
        raise OptimizerError(f"{args.run_dir} is not a run directory")
    record = run.read(require_version=False)
    if record is None:
        raise OptimizerError(f"{args.run_dir} has no run.json; is it a run directory?")
    outside = run.outside(record, relative_ok=True)
    if outside:
        raise OptimizerError(
            f"{run.run_json} records outputs outside the run directory ({', '.join(outside[:3])}); "
            "refusing to read or write there"
        )
    if record.status == "running" and not run.lock_held():
        print(
            f"{args.run_dir}: status: interrupted (stale: run.json says running, but no process "
            "holds its lock; it was killed); rerun with --resume to continue",
            file=sys.stderr,
        )
    print(f"wrote {regenerate(run.path)}")
    return EXIT_OK


COMMANDS = {
    "run": cmd_run,
    "sweep": cmd_sweep,
    "validate": cmd_validate,
    "check": cmd_check,
    "gate": cmd_gate,
    "report": cmd_report,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_process(getattr(args, "quiet", False))
    try:
        return COMMANDS[args.verb](args)
    except RecipeError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        return e.exit_code
    except OptimizerError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except StageFailed as e:
        where = f" (details in {args.output or 'the run directory'}/logs/run.log)"
        print(f"error: {e}{where}", file=sys.stderr)
        return e.exit_code
    except GateFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        # SIGTERM (console.Terminated) is 143, Ctrl-C 130.
        print(f"{e or 'interrupted'}; rerun with --resume to continue", file=sys.stderr)
        return getattr(e, "exit_code", EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
