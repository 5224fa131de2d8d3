"""``build``: TensorRT-LLM <= 1.2 engines (legacy; use deploy for >= 1.3) from the exported
checkpoint with ``trtllm-build``, and the deploy files for TensorRT-LLM's PyTorch backend
(which serves the unified HF checkpoint).

TensorRT-LLM removed the TensorRT engine backend (and ``trtllm-build``) after 1.3.0rc20; for
TensorRT-LLM >= 1.3, vLLM and SGLang use the ``deploy`` stage (optimizer/stages/deploy.py),
which serves the unified HF checkpoint and checks the format against what each runtime loads.

TensorRT-LLM is an external tool here: ``launcher`` runs it locally, in the NGC container
(docker) or behind a site prefix. Engine sizes are required — trtllm-build's defaults
(max_batch_size 2048, max_seq_len from the model) are the most reported cause of build OOMs.
Combinations TensorRT-LLM 1.2 rejects or silently degrades are refused at validation.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator

from optimizer.errors import StageError
from optimizer.inputs import Input, file_input, package_input, reference_input
from optimizer.launchers import LAUNCHERS
from optimizer.plan import Environment, ModelPlan
from optimizer.stages.base import Stage, StageProblem, StageResult
from optimizer.trtllm import facts

if TYPE_CHECKING:
    from optimizer.context import StageContext

# TensorRT-LLM facts live in optimizer/trtllm/facts.py; these names are kept for readers.
DEFAULT_IMAGE = facts.DEFAULT_IMAGE
FP8_ALGOS = facts.FP8_ALGOS
AWQ_ALGOS = facts.AWQ_ALGOS
VERSION_PROBE = "import tensorrt_llm, sys; sys.stdout.write(tensorrt_llm.__version__)"


class Build(Stage):
    """TensorRT-LLM <= 1.2 engines (legacy; use deploy for >= 1.3): build with trtllm-build;
    write PyTorch-backend deploy options."""

    name = "build"
    artifact_keys = ("engine", "deploy")

    launcher: Literal[tuple(LAUNCHERS)] = "local"  # type: ignore[valid-type]
    image: str = Field(DEFAULT_IMAGE, description="NGC TensorRT-LLM image for launcher: docker")
    command_prefix: list[str] = Field(
        default_factory=list, description="for launcher: command, e.g. [srun, --gpus=1]"
    )
    trtllm_build: str = Field(
        "trtllm-build",
        description="the trtllm-build executable (TensorRT-LLM <= 1.2; legacy, use deploy for >= 1.3)",
    )
    python: str = Field("python3", description="the Python that has tensorrt_llm (version check)")
    max_batch_size: int = Field(gt=0)
    max_input_len: int = Field(gt=0)
    max_seq_len: int = Field(gt=0)
    max_num_tokens: int = Field(gt=0)
    max_beam_width: int = Field(1, gt=0)
    kv_cache_type: Literal["paged", "continuous", "disabled"] = "paged"
    gemm_plugin: str | None = Field("auto", description="--gemm_plugin value, null to leave it off")
    use_paged_context_fmha: bool = True
    use_fp8_context_fmha: bool = False
    weight_sparsity: bool | None = Field(
        None,
        description="--weight_sparsity: use 2:4 sparse weights (default: when an earlier "
        "stage made the model 2:4 sparse)",
    )
    workers: int | None = Field(
        None, gt=0, description="parallel rank builds (default: one per rank)"
    )
    gpu_compute_capability: float | None = Field(
        None,
        description="target GPU, e.g. 9.0 for H100 (checked against the format; default: the local GPU)",
    )
    timeout_s: int = Field(4 * 3600, gt=0)
    extra_args: list[str] = Field(
        default_factory=list, description="more trtllm-build flags, passed as they are"
    )

    @field_validator("image")
    @classmethod
    def _image_reference(cls, value: str) -> str:
        from optimizer.launchers import image_problem

        problem = image_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    def model_copies(self, before: ModelPlan | None) -> float:
        # the engine: a quantized one is at least a quarter of the model (4-bit weights)
        return 0.25 if before is not None and before.quantization is not None else 1.0

    @model_validator(mode="after")
    def _sizes(self):
        if self.max_input_len > self.max_seq_len:
            raise ValueError(
                f"max_input_len {self.max_input_len} exceeds max_seq_len {self.max_seq_len}"
            )
        if self.launcher == "command" and not self.command_prefix:
            raise ValueError("launcher: command needs command_prefix, e.g. [srun, --gpus=1]")
        return self

    # ------------------------------------------------------------------ validation

    def plan(self, prev: ModelPlan, env: Environment) -> tuple[ModelPlan, list[StageProblem]]:
        plan, problems = super().plan(prev, env)
        if prev.exports is None or prev.exports.trtllm_checkpoint is None:
            problems.append(
                (
                    "",
                    "build needs a TensorRT-LLM checkpoint: put an `export` stage with "
                    "trtllm_checkpoint before it",
                )
            )
        quant = prev.quantization
        algo = quant.trtllm_algo if quant else None
        kv = quant.trtllm_kv_algo if quant else None
        problems += facts.engine_build_problems(
            algo,
            kv,
            self.gpu_compute_capability,
            use_paged_context_fmha=self.use_paged_context_fmha,
            use_fp8_context_fmha=self.use_fp8_context_fmha,
        )
        if prev.draft in ("eagle3", "draft_target"):
            problems.append(
                (
                    "",
                    f"the {prev.draft} draft is not built into TensorRT-LLM <= 1.2 engines here "
                    "(their eagle mode is EAGLE-1/2; a draft model is an engine of its own): "
                    "serve it with a `deploy` stage (TensorRT-LLM >= 1.3, vLLM, SGLang)",
                )
            )
        if self.weight_sparsity and prev.sparsity != "2:4":
            problems.append(("weight_sparsity", "no earlier stage makes the model 2:4 sparse"))
        maxpos = prev.dims.max_position_embeddings if prev.dims else None
        if maxpos and self.max_seq_len > maxpos and not prev.dims.rope_scaling:
            problems.append(
                (
                    "max_seq_len",
                    f"{self.max_seq_len} exceeds the model's max_position_embeddings {maxpos}",
                )
            )
        return plan.but(engine=True), problems

    def inputs(self, base_dir: Path) -> list[Input]:
        """The TensorRT-LLM that builds: the image (docker), or the program and the
        ``tensorrt_llm`` package of this environment (local), or the command line (command).
        An image is exact only when pinned by digest (``image@sha256:...``)."""
        import shutil

        if self.launcher == "docker":
            return [reference_input("image", self.image)]
        if self.launcher == "command":
            return [
                reference_input("command", shlex.join([*self.command_prefix, self.trtllm_build]))
            ]
        tool = shutil.which(self.trtllm_build)
        inputs = [package_input("tensorrt_llm")]
        return inputs + ([file_input("trtllm_build", Path(tool))] if tool else [])

    # ------------------------------------------------------------------ the command

    def sparse_weights(self, plan: ModelPlan | None) -> bool:
        """Whether to pass --weight_sparsity: as set, else when the plan is 2:4 sparse."""
        if self.weight_sparsity is not None:
            return self.weight_sparsity
        return plan is not None and plan.sparsity == "2:4"

    def build_argv(
        self,
        checkpoint: Path,
        output: Path,
        world_size: int,
        sparse: bool = False,
        medusa_draft_len: int | None = None,
    ) -> list[str]:
        argv = [
            self.trtllm_build,
            "--checkpoint_dir",
            str(checkpoint),
            "--output_dir",
            str(output),
            "--max_batch_size",
            str(self.max_batch_size),
            "--max_input_len",
            str(self.max_input_len),
            "--max_seq_len",
            str(self.max_seq_len),
            "--max_num_tokens",
            str(self.max_num_tokens),
            "--max_beam_width",
            str(self.max_beam_width),
            "--kv_cache_type",
            self.kv_cache_type,
            "--use_paged_context_fmha",
            "enable" if self.use_paged_context_fmha else "disable",
            "--workers",
            str(self.workers or world_size),
        ]
        if self.gemm_plugin:
            argv += ["--gemm_plugin", self.gemm_plugin]
        if self.use_fp8_context_fmha:
            argv += ["--use_fp8_context_fmha", "enable"]
        if sparse:
            argv.append("--weight_sparsity")
        if medusa_draft_len:
            argv += [
                "--speculative_decoding_mode",
                "medusa",
                "--max_draft_len",
                str(medusa_draft_len),
            ]
        return argv + list(self.extra_args)

    @staticmethod
    def medusa_draft_len(plan: ModelPlan | None) -> int | None:
        """With Medusa heads (the speculative stage wrote the checkpoint): their draft_len."""
        if plan is None or plan.draft != "medusa":
            return None
        return plan.draft_len

    def command(self, argv: list[str], run_dir: Path) -> list[str]:
        from optimizer.launchers import wrap

        return wrap(
            self.launcher, argv, image=self.image, mounts=[run_dir], prefix=self.command_prefix
        )

    def preview(self, run_dir: Path, plan: ModelPlan) -> str:
        """The exact command a run would execute (for --dry-run)."""
        ckpt = plan.exports.trtllm_checkpoint if plan.exports else None
        world_size = ckpt.world_size if ckpt else 1
        argv = self.build_argv(
            run_dir / "trtllm_checkpoint",
            run_dir / ".tmp-NN-engine",
            world_size,
            self.sparse_weights(plan),
            self.medusa_draft_len(plan),
        )
        return shlex.join(self.command(argv, run_dir))

    # ------------------------------------------------------------------ run

    def preflight(self) -> None:
        """Before hours of PTQ, make sure the launcher can run at all."""
        from optimizer.launchers import preflight

        preflight(self.launcher, self.trtllm_build, self.command_prefix)

    def run(self, ctx: StageContext) -> StageResult:
        from optimizer import trtllm
        from optimizer.launchers import run_logged

        run_dir = ctx.run_dir
        checkpoint = run_dir / "trtllm_checkpoint"
        problems = trtllm.check_checkpoint(checkpoint)
        if problems:
            raise StageError(
                "the TensorRT-LLM checkpoint is invalid, not building it:\n  "
                + "\n  ".join(p.message for p in problems)
            )
        config = json.loads((checkpoint / "config.json").read_text())
        world = int((config.get("mapping") or {}).get("world_size", 1))
        # The launcher itself was checked by preflight() before the run loaded any model.
        version = self._version(run_dir)
        ctx.log.info("TensorRT-LLM %s via %s", version or "(version unknown)", self.launcher)
        engine = ctx.new_output("engine")
        sparse = self.sparse_weights(ctx.plan)
        medusa = self.medusa_draft_len(ctx.plan)
        cmd = self.command(self.build_argv(checkpoint, engine, world, sparse, medusa), run_dir)
        ctx.log.info("build command: %s", shlex.join(cmd))
        run_logged(cmd, run_dir / "logs" / "trtllm-build.log", self.timeout_s, "trtllm-build")
        self._verify(engine, world)
        deploy = ctx.new_output("deploy")
        # What the plan says was exported (the HF checkpoint on disk may be a stale one).
        exports = ctx.plan.exports if ctx.plan is not None else None
        hf_exported = bool(exports and exports.hf_checkpoint)
        self._write_deploy(deploy, run_dir, config, hf_exported)
        return StageResult(
            outputs={"engine": engine, "deploy": deploy},
            metrics={
                "command": cmd,
                "tensorrt_llm_version": version,
                "world_size": world,
                "weight_sparsity": sparse,
                **({"medusa_max_draft_len": medusa} if medusa else {}),
                "engine_bytes": sum(f.stat().st_size for f in engine.glob("rank*.engine")),
            },
        )

    def _version(self, run_dir: Path) -> str | None:
        """TensorRT-LLM's version where the build runs; engines need 1.0 to 1.2 (removed after),
        per :func:`optimizer.trtllm.facts.engine_version_problem`."""
        cmd = self.command([self.python, "-c", VERSION_PROBE], run_dir)
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired):
            return None
        version = out.stdout.strip() if out.returncode == 0 else None
        problem = facts.engine_version_problem(version) if version else None
        if problem:
            raise StageError(problem)
        return version

    @staticmethod
    def _verify(engine: Path, world: int) -> None:
        """A build that exited 0 but left no complete engine is still a failure."""
        try:
            config = json.loads((engine / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise StageError(
                f"trtllm-build finished but {engine.name}/config.json is missing or invalid ({e})"
            ) from None
        missing = [k for k in ("pretrained_config", "build_config") if k not in config]
        if missing:
            raise StageError(
                f"engine config.json lacks {', '.join(missing)}: not an engine directory"
            )
        absent = [
            f"rank{r}.engine" for r in range(world) if not (engine / f"rank{r}.engine").is_file()
        ]
        if absent:
            raise StageError(
                f"trtllm-build left no {', '.join(absent)} (world_size {world}): the build is incomplete"
            )

    def _write_deploy(self, deploy: Path, run_dir: Path, config: dict, hf_exported: bool) -> None:
        """extra_llm_api_options.yaml + serve commands for TensorRT-LLM >= 1.0 (PyTorch backend)."""
        import yaml

        quant = config.get("quantization") or {}
        options: dict = {
            "max_batch_size": self.max_batch_size,
            "max_num_tokens": self.max_num_tokens,
            "max_seq_len": self.max_seq_len,
            "kv_cache_config": {"enable_block_reuse": True, "free_gpu_memory_fraction": 0.9},
        }
        if quant.get("kv_cache_quant_algo") == "FP8":
            options["kv_cache_config"]["dtype"] = "fp8"
        (deploy / "extra_llm_api_options.yaml").write_text(yaml.safe_dump(options, sort_keys=False))
        tp = (config.get("mapping") or {}).get("tp_size", 1)
        q = shlex.quote
        hf, engine = run_dir / "hf_checkpoint", run_dir / "engine"
        options_file = deploy.parent / "deploy" / "extra_llm_api_options.yaml"
        pytorch = (
            f"trtllm-serve {q(str(hf))} --backend pytorch --tp_size {tp} "
            f"--max_batch_size {self.max_batch_size} --max_seq_len {self.max_seq_len} "
            f'--extra_llm_api_options {q(str(options_file))} --host 0.0.0.0 --port 8000 "$@"'
        )
        lines = [
            "#!/usr/bin/env bash",
            "# Serve the optimized model with TensorRT-LLM (OpenAI-compatible API).",
            "# PyTorch backend (TensorRT-LLM >= 1.0) on the unified HF checkpoint:",
            pytorch
            if hf_exported
            else "# (no unified HF checkpoint was exported: set export.hf_checkpoint: true)\n# "
            + pytorch,
            "# TensorRT engines (TensorRT-LLM <= 1.2):",
            f"# trtllm-serve {q(str(engine))} --backend tensorrt "
            f"--tokenizer {q(str(run_dir / 'trtllm_checkpoint'))} --host 0.0.0.0 --port 8000",
        ]
        serve = deploy / "serve.sh"
        serve.write_text("\n".join(lines) + "\n")
        serve.chmod(0o755)
