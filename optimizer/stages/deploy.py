"""``deploy``: serving files for the unified HF checkpoint on TensorRT-LLM >= 1.0 (PyTorch
backend, ``trtllm-serve``; the only backend after 1.3), vLLM and SGLang, with an optional
smoke test that starts each server and sends it one completion.

What each runtime version loads is one table, :mod:`optimizer.serving.facts`. Validation
checks the plan against it before any model loads (a format, KV cache or draft head the
chosen target cannot serve is refused; sparsity is served dense, a warning); at run time the
exported ``hf_quant_config.json`` — the file that ships — is checked against the same table.
Servers are external tools: ``launcher`` runs them locally, in a container (docker) or behind
a site prefix, as for ``build``.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from optimizer.errors import StageError
from optimizer.inputs import Input, file_input, reference_input
from optimizer.launchers import LAUNCHERS
from optimizer.plan import Environment, ModelPlan
from optimizer.serving import facts
from optimizer.stages.base import Stage, StageProblem, StageResult

if TYPE_CHECKING:
    from optimizer.context import StageContext

log = logging.getLogger(__name__)

Runtime = Literal["trtllm", "vllm", "sglang"]
OPTIONS_FILE = "extra_llm_api_options.yaml"


class Target(BaseModel):
    """One serving runtime: a name (``trtllm``) or a mapping with the optional fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    runtime: Runtime
    version: str | None = Field(
        None, description="runtime version the files are for (default: the facts table's)"
    )
    image: str | None = Field(
        None, description="container image for launcher: docker (default: the version's)"
    )
    executable: str | None = Field(
        None, description="program for launcher: local/command (trtllm-serve, vllm, python3)"
    )
    port: int | None = Field(None, gt=0, lt=65536, description="this target's port")
    extra_args: list[str] = Field(
        default_factory=list, description="more server flags, passed as they are"
    )

    @model_validator(mode="before")
    @classmethod
    def _name_only(cls, data: Any) -> Any:
        return {"runtime": data} if isinstance(data, str) else data

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            raise ValueError(
                f"write the version in quotes, e.g. '{value}' (YAML reads {value} as a number, "
                "and 1.10 as 1.1)"
            )
        return value

    @field_validator("version", "image", "executable")
    @classmethod
    def _one_word(cls, value: str | None) -> str | None:
        # These land in generated scripts and comments: a newline there would start a command.
        if value is not None and (not value.strip() or any(c.isspace() for c in value)):
            raise ValueError(f"{value!r} must be one word, without spaces or newlines")
        return value

    @field_validator("image")
    @classmethod
    def _image_reference(cls, value: str | None) -> str | None:
        from optimizer.launchers import image_problem

        problem = image_problem(value) if value is not None else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("extra_args")
    @classmethod
    def _printable(cls, value: list[str]) -> list[str]:
        for arg in value:
            if any(ord(c) < 32 for c in arg):
                raise ValueError(f"{arg!r} contains a control character (a newline?)")
        return value

    @property
    def resolved_version(self) -> str:
        return self.version or facts.DEFAULT_VERSIONS[self.runtime]

    @property
    def name(self) -> str:
        return f"{facts.NAMES[self.runtime]} {self.resolved_version}"

    def default_image(self) -> str:
        rel = facts.release(self.runtime, self.resolved_version)
        return self.image or (rel.image if rel else "")

    def program(self) -> str:
        return self.executable or facts.EXECUTABLES[self.runtime]


class Deploy(Stage):
    """Serving configs (+ optional smoke test) for the exported unified HF checkpoint."""

    name = "deploy"
    artifact_keys = ("deploy",)
    feeds_later = False  # nothing later reads deploy/

    targets: list[Target] = Field(
        min_length=1, description="runtimes to deploy to: trtllm, vllm, sglang (with version)"
    )
    max_batch_size: int = Field(64, gt=0, description="concurrent sequences")
    max_seq_len: int | None = Field(
        None,
        gt=0,
        description="prompt + output tokens (vLLM --max-model-len, SGLang --context-length); "
        "default: the model's max_position_embeddings",
    )
    max_num_tokens: int = Field(
        8192, gt=0, description="tokens per scheduler step (vLLM --max-num-batched-tokens)"
    )
    kv_cache_fraction: float = Field(
        0.9,
        gt=0,
        le=1,
        description="GPU memory share: TensorRT-LLM kv_cache_config.free_gpu_memory_fraction "
        "(of the memory left after the weights), vLLM --gpu-memory-utilization and SGLang "
        "--mem-fraction-static (of the whole GPU, weights included)",
    )
    cuda_graphs: bool = Field(True, description="capture CUDA graphs for decoding")
    tp: int = Field(1, ge=1, description="tensor-parallel GPUs")
    host: str = "0.0.0.0"
    port: int = Field(8000, gt=0, lt=65536)
    max_draft_len: int | None = Field(
        None,
        ge=1,
        description="draft tokens per step with a draft (default: the speculative stage's "
        "draft_len, else 3)",
    )
    draft_dir: str | None = Field(
        None,
        description="the draft directory: an EAGLE-3 head or a draft model (default: the "
        "run's draft/)",
    )
    smoke_test: bool = Field(
        False, description="start each server, wait for /health, send one completion, stop it"
    )
    smoke_timeout_s: int = Field(900, gt=0, description="how long a server may take to be ready")
    smoke_prompt: str = "The capital of France is"
    launcher: Literal[tuple(LAUNCHERS)] = "local"  # type: ignore[valid-type]
    command_prefix: list[str] = Field(
        default_factory=list, description="for launcher: command, e.g. [srun, --gpus=1]"
    )

    @model_validator(mode="after")
    def _launcher(self):
        if self.launcher == "command" and not self.command_prefix:
            raise ValueError("launcher: command needs command_prefix, e.g. [srun, --gpus=1]")
        return self

    # ------------------------------------------------------------------ validation

    def plan(self, prev: ModelPlan, env: Environment) -> tuple[ModelPlan, list[StageProblem]]:
        plan, problems = super().plan(prev, env)
        if prev.exports is None or not prev.exports.hf_checkpoint:
            problems.append(
                (
                    "",
                    "deploy serves the unified HF checkpoint: put an `export` stage with "
                    "hf_checkpoint: true before it",
                )
            )
        if prev.engine:
            problems.append(
                (
                    "",
                    "an earlier `build` stage already writes deploy/ (TensorRT-LLM <= 1.2 "
                    "engines); use build or deploy in one recipe, not both",
                )
            )
        seen: dict[str, int] = {}
        for i, target in enumerate(self.targets):
            if target.runtime in seen:
                problems.append(
                    (
                        f"targets[{i}]",
                        f"{target.runtime} is listed twice (also targets[{seen[target.runtime]}]); "
                        "each runtime gets one deploy/<runtime> directory",
                    )
                )
            seen.setdefault(target.runtime, i)
        algo, layers = planned_algos(prev)
        kv = prev.quantization.trtllm_kv_algo if prev.quantization else None
        for i, target in enumerate(self.targets):
            version_problem = facts.version_problem(target.runtime, target.resolved_version)
            if version_problem:
                problems.append((f"targets[{i}].version", version_problem))
                continue
            problems += [
                (f"targets[{i}]", m)
                for m in facts.load_problems(
                    target.runtime, target.resolved_version, algo, kv, layers, prev.draft
                )
            ]
        problems += self._size_problems(prev)
        if prev.sparsity:
            log.warning("deploy: %s", facts.SPARSITY_NOTE.format(sparsity=prev.sparsity))
        return plan, problems

    def _size_problems(self, prev: ModelPlan) -> list[StageProblem]:
        problems: list[StageProblem] = []
        dims = prev.dims
        if dims is None:
            return problems
        maxpos = dims.max_position_embeddings
        if self.max_seq_len and maxpos and self.max_seq_len > maxpos and not dims.rope_scaling:
            problems.append(
                (
                    "max_seq_len",
                    f"{self.max_seq_len} exceeds the model's max_position_embeddings {maxpos}",
                )
            )
        heads, kv_heads = (
            dims.num_attention_heads,
            dims.num_key_value_heads or dims.num_attention_heads,
        )
        if heads and heads % self.tp:
            problems.append(
                ("tp", f"tp={self.tp} does not divide the model's {heads} attention heads")
            )
        elif kv_heads and kv_heads % self.tp and self.tp % kv_heads:
            problems.append(("tp", f"tp={self.tp} does not split the model's {kv_heads} KV heads"))
        return problems

    def inputs(self, base_dir: Path) -> list[Input]:
        """The servers a smoke test starts (the files alone depend on nothing outside)."""
        if not self.smoke_test:
            return []
        out: list[Input] = []
        for t in self.targets:
            if self.launcher == "docker":
                out.append(reference_input(f"{t.runtime}_image", t.default_image()))
            elif self.launcher == "command":
                argv = shlex.join([*self.command_prefix, t.program()])
                out.append(reference_input(f"{t.runtime}_command", argv))
            else:
                tool = shutil.which(t.program())
                if tool:
                    out.append(file_input(f"{t.runtime}_server", Path(tool)))
        return out

    def preflight(self) -> None:
        """Before any model loads: a smoke test needs every server to be startable."""
        if not self.smoke_test:
            return
        for t in self.targets:
            if self.launcher == "local":
                if shutil.which(t.program()) is None:
                    raise StageError(
                        f"smoke test: {t.program()} ({t.name}) is not on PATH; install it, set "
                        "the target's `executable`, use launcher: docker / command, or set "
                        "smoke_test: false"
                    )
            else:
                LAUNCHERS[self.launcher].preflight(t.program(), self.command_prefix)

    # ------------------------------------------------------------------ the commands

    def server_argv(
        self,
        target: Target,
        checkpoint: Path,
        options: Path,
        checkpoint_algos: tuple[str | None, str | None],
        draft: Path | None,
        draft_kind: str = "eagle3",
    ) -> list[str]:
        """The server command line for ``target`` (``options``: TensorRT-LLM's YAML)."""
        algo, kv = checkpoint_algos
        version = target.resolved_version
        port = str(target.port or self.port)
        quant = facts.quantization_flag(target.runtime, version, algo)
        kv_dtype = facts.kv_cache_dtype(target.runtime, version, kv)
        if target.runtime == "trtllm":
            argv = [
                target.program(),
                str(checkpoint),
                "--backend",
                "pytorch",
                "--host",
                self.host,
                "--port",
                port,
                "--tp_size",
                str(self.tp),
                "--extra_llm_api_options",
                str(options),
            ]
        elif target.runtime == "vllm":
            argv = [
                target.program(),
                "serve",
                str(checkpoint),
                "--host",
                self.host,
                "--port",
                port,
                "--tensor-parallel-size",
                str(self.tp),
                "--max-model-len",
                str(self.max_seq_len),
                "--max-num-seqs",
                str(self.max_batch_size),
                "--max-num-batched-tokens",
                str(self.max_num_tokens),
                "--gpu-memory-utilization",
                str(self.kv_cache_fraction),
            ]
            if quant:
                argv += ["--quantization", quant]
            if kv_dtype:
                argv += ["--kv-cache-dtype", kv_dtype]
            if not self.cuda_graphs:
                argv.append("--enforce-eager")
            if draft is not None:
                spec = {
                    "method": "eagle3" if draft_kind == "eagle3" else "draft_model",
                    "model": str(draft),
                    "num_speculative_tokens": self.draft_tokens,
                }
                argv += ["--speculative-config", json.dumps(spec, separators=(",", ":"))]
        else:
            argv = [
                target.program(),
                "-m",
                facts.SGLANG_MODULE,
                "--model-path",
                str(checkpoint),
                "--host",
                self.host,
                "--port",
                port,
                "--tp-size",
                str(self.tp),
                "--context-length",
                str(self.max_seq_len),
                "--max-running-requests",
                str(self.max_batch_size),
                "--max-prefill-tokens",
                str(self.max_num_tokens),
                "--mem-fraction-static",
                str(self.kv_cache_fraction),
            ]
            if quant:
                argv += ["--quantization", quant]
            if kv_dtype:
                argv += ["--kv-cache-dtype", kv_dtype]
            if self.cuda_graphs:
                argv += ["--cuda-graph-max-bs", str(self.max_batch_size)]
            else:
                argv.append("--disable-cuda-graph")
            if draft is not None:
                argv += [
                    "--speculative-algorithm",
                    "EAGLE3" if draft_kind == "eagle3" else "STANDALONE",
                    "--speculative-draft-model-path",
                    str(draft),
                    "--speculative-num-steps",
                    str(self.draft_tokens),
                    "--speculative-eagle-topk",
                    "1",
                    "--speculative-num-draft-tokens",
                    str(self.draft_tokens + 1),
                ]
        return argv + list(target.extra_args)

    @property
    def draft_tokens(self) -> int:
        """max_draft_len as set, else 3 (run() and preview() fill it from the plan first)."""
        return self.max_draft_len or 3

    def trtllm_options(
        self, kv: str | None, version: str, draft: Path | None, draft_kind: str = "eagle3"
    ) -> dict:
        """TensorRT-LLM's extra_llm_api_options (LLM API arguments) for the PyTorch backend."""
        kv_config: dict[str, Any] = {
            "enable_block_reuse": True,
            "free_gpu_memory_fraction": self.kv_cache_fraction,
        }
        kv_dtype = facts.kv_cache_dtype("trtllm", version, kv)
        if kv_dtype:
            kv_config["dtype"] = kv_dtype
        options: dict[str, Any] = {
            "max_batch_size": self.max_batch_size,
            "max_num_tokens": self.max_num_tokens,
            "max_seq_len": self.max_seq_len,
            "kv_cache_config": kv_config,
            # null turns CUDA graphs off (they are on by default from 1.0)
            "cuda_graph_config": (
                {"enable_padding": True, "max_batch_size": self.max_batch_size}
                if self.cuda_graphs
                else None
            ),
        }
        if draft is not None:
            options["speculative_config"] = {
                "decoding_type": "Eagle3" if draft_kind == "eagle3" else "DraftTarget",
                "max_draft_len": self.draft_tokens,
                "speculative_model_dir": str(draft),
            }
        return options

    def launch_command(self, target: Target, argv: list[str], run_dir: Path) -> list[str]:
        """``argv`` under the launcher; in docker the port is published and the container
        named, so that stopping it is certain."""
        from optimizer.launchers import wrap

        cmd = wrap(
            self.launcher,
            argv,
            image=target.default_image(),
            mounts=[run_dir],
            prefix=self.command_prefix,
        )
        if self.launcher == "docker":
            port = target.port or self.port
            extra = ["--name", container_name(run_dir, target), "-p", f"{port}:{port}"]
            if target.runtime in facts.RESET_ENTRYPOINT:
                extra += ["--entrypoint", ""]
            cmd[2:2] = extra
        return cmd

    def preview(self, run_dir: Path, plan: ModelPlan) -> str:
        algo, _ = planned_algos(plan)
        kv = plan.quantization.trtllm_kv_algo if plan.quantization else None
        draft = self._draft_path(run_dir) if plan.draft else None
        maxpos = plan.dims.max_position_embeddings if plan.dims else None
        stage = self.model_copy(
            update={
                "max_seq_len": self.max_seq_len or maxpos,
                "max_draft_len": self.max_draft_len or plan.draft_len,
            }
        )
        lines = []
        for t in self.targets:
            argv = stage.server_argv(
                t,
                run_dir / "hf_checkpoint",
                run_dir / "deploy" / t.runtime / OPTIONS_FILE,
                (algo, kv),
                draft,
                plan.draft or "eagle3",
            )
            lines.append(shlex.join(argv))
        return "\n# ".join(lines)

    def _draft_path(self, run_dir: Path) -> Path:
        return Path(self.draft_dir) if self.draft_dir else run_dir / "draft"

    # ------------------------------------------------------------------ run

    def run(self, ctx: StageContext) -> StageResult:
        run_dir = ctx.run_dir
        checkpoint = run_dir / "hf_checkpoint"
        config, quant_config = read_checkpoint(checkpoint)
        algo, kv, layers = (
            facts.checkpoint_algos(quant_config) if quant_config else (None, None, ())
        )
        plan = ctx.plan or ModelPlan()
        draft = self._draft_path(run_dir) if plan.draft else None
        if draft is not None and not (draft / "config.json").is_file():
            raise StageError(f"the plan has a {plan.draft} draft, but {draft} holds no config.json")
        # The file that ships is the truth: check it against the same table as validation.
        problems = {
            t.runtime: facts.load_problems(
                t.runtime, t.resolved_version, algo, kv, layers, plan.draft
            )
            for t in self.targets
        }
        bad = [m for t in self.targets for m in problems[t.runtime]]
        if bad:
            raise StageError(
                f"the exported checkpoint (hf_quant_config.json: quant_algo {algo}, "
                f"kv_cache_quant_algo {kv}) cannot be served as planned:\n  " + "\n  ".join(bad)
            )
        max_seq_len = self.max_seq_len or config.get("max_position_embeddings")
        if not isinstance(max_seq_len, int):
            raise StageError(
                "the checkpoint's config.json has no max_position_embeddings: set max_seq_len"
            )
        stage = self.model_copy(
            update={
                "max_seq_len": max_seq_len,
                "max_draft_len": self.max_draft_len or plan.draft_len,
            }
        )
        kind = plan.draft or "eagle3"
        planned, _ = planned_algos(plan)
        if planned and planned != algo:
            ctx.log.warning(
                "the plan expected quant_algo %s, the exported checkpoint says %s", planned, algo
            )

        out = ctx.new_output("deploy")
        final = run_dir / "deploy"
        summary: dict[str, Any] = {
            "checkpoint": str(checkpoint),
            "quant_algo": algo,
            "kv_cache_quant_algo": kv,
            "layer_quant_algos": list(layers),
            "plan_quant_algo": planned,
            "draft": {"kind": plan.draft, "dir": str(draft)} if draft else None,
            "contract": {
                "checked": "hf_quant_config.json" if quant_config else "config.json",
                "ok": True,
                "problems": [],
            },
            "warnings": (
                [facts.SPARSITY_NOTE.format(sparsity=plan.sparsity)] if plan.sparsity else []
            ),
            "targets": [],
        }
        for t in self.targets:
            summary["targets"].append(
                stage._write_target(
                    t,
                    out / t.runtime,
                    final / t.runtime,
                    checkpoint,
                    (algo, kv),
                    draft,
                    run_dir,
                    kind,
                )
            )
        if self.smoke_test:
            for t, entry in zip(self.targets, summary["targets"], strict=True):
                argv = stage.server_argv(
                    t, checkpoint, out / t.runtime / OPTIONS_FILE, (algo, kv), draft, kind
                )
                entry["smoke_test"] = stage._smoke_test(t, argv, run_dir)
        (out / "deploy.json").write_text(json.dumps(summary, indent=2) + "\n")
        return StageResult(
            outputs={"deploy": out},
            metrics={
                "quant_algo": algo,
                "kv_cache_quant_algo": kv,
                "targets": {
                    e["runtime"]: {
                        "version": e["version"],
                        **(
                            {"smoke_latency_s": e["smoke_test"]["latency_s"]}
                            if e.get("smoke_test")
                            else {}
                        ),
                    }
                    for e in summary["targets"]
                },
            },
        )

    def _write_target(
        self,
        target: Target,
        out: Path,
        final: Path,
        checkpoint: Path,
        algos: tuple[str | None, str | None],
        draft: Path | None,
        run_dir: Path,
        draft_kind: str = "eagle3",
    ) -> dict[str, Any]:
        """serve.sh (+ extra_llm_api_options.yaml for TensorRT-LLM) into ``out``; paths in them
        are where the files will be once committed (``final``)."""
        import yaml

        out.mkdir(parents=True)
        version = target.resolved_version
        files = ["serve.sh"]
        if target.runtime == "trtllm":
            options = self.trtllm_options(algos[1], version, draft, draft_kind)
            (out / OPTIONS_FILE).write_text(yaml.safe_dump(options, sort_keys=False))
            files.append(OPTIONS_FILE)
        argv = self.server_argv(target, checkpoint, final / OPTIONS_FILE, algos, draft, draft_kind)
        rel = facts.release(target.runtime, version)
        assert rel is not None
        lines = [
            "#!/usr/bin/env bash",
            f"# Serve the optimized model with {target.name} (OpenAI-compatible API on port "
            f"{target.port or self.port}); written by optimizer's deploy stage.",
            f"# Checkpoint: ModelOpt unified HF, quant_algo {algos[0]}, KV cache {algos[1]}.",
            f"# In a container: {target.default_image()} (mount {run_dir}).",
            "set -euo pipefail",
            "exec " + " ".join(shlex.quote(a) for a in argv) + ' "$@"',
        ]
        # Comments carry paths (a run directory may be named anything): one line each.
        lines = [" ".join(line.splitlines()) if line.startswith("# ") else line for line in lines]
        serve = out / "serve.sh"
        serve.write_text("\n".join(lines) + "\n")
        serve.chmod(0o755)
        return {
            "runtime": target.runtime,
            "version": version,
            "facts_since": rel.since,
            "facts_source": rel.source,
            "dir": str(final),
            "files": files,
            "command": argv,
            "launch": self.launch_command(target, argv, run_dir),
            "smoke_test": None,
        }

    # ------------------------------------------------------------------ smoke test

    def _smoke_test(self, target: Target, argv: list[str], run_dir: Path) -> dict[str, Any]:
        """Start the server, wait for /health, send one /v1/completions request, stop it."""
        port = target.port or self.port
        if port_in_use(port):
            raise StageError(
                f"smoke test of {target.name}: port {port} is already in use (another server?); "
                "set `port`"
            )
        cmd = self.launch_command(target, argv, run_dir)
        log_file = run_dir / "logs" / f"deploy-{target.runtime}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        base = f"http://127.0.0.1:{port}"
        what = f"smoke test of {target.name}"
        with open(log_file, "w", encoding="utf-8") as fh:
            fh.write("$ " + shlex.join(cmd) + "\n")
            fh.flush()
            t0 = time.monotonic()
            try:
                proc = subprocess.Popen(
                    cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
                )
            except OSError as e:
                raise StageError(f"{what}: cannot start {cmd[0]}: {e}") from None
            try:
                ready_s = self._wait_ready(proc, base, t0, what, log_file)
                t1 = time.monotonic()
                reply = _post_json(
                    f"{base}/v1/completions",
                    {
                        "model": argv_model(target, argv),
                        "prompt": self.smoke_prompt,
                        "max_tokens": 16,
                        "temperature": 0,
                    },
                    timeout=max(60.0, self.smoke_timeout_s / 4),
                )
                latency = time.monotonic() - t1
            except StageError:
                raise
            except (OSError, ValueError) as e:
                raise StageError(f"{what}: /v1/completions failed: {e}{_tail(log_file)}") from None
            finally:
                stop(proc, cmd, run_dir, target, self.launcher)
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not choices or not isinstance(choices[0].get("text"), str):
            raise StageError(f"{what}: /v1/completions answered without choices[0].text: {reply}")
        log.info("%s: ready in %.1f s, completion in %.3f s", what, ready_s, latency)
        return {
            "status": "ok",
            "ready_s": round(ready_s, 3),
            "latency_s": round(latency, 3),
            "prompt": self.smoke_prompt,
            "text": choices[0]["text"],
            "log": str(log_file),
        }

    def _wait_ready(self, proc, base: str, t0: float, what: str, log_file: Path) -> float:
        while True:
            code = proc.poll()
            if code is not None:
                raise StageError(
                    f"{what}: the server exited with code {code} before it was ready "
                    f"(log: {log_file}){_tail(log_file)}"
                )
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() - t0 > self.smoke_timeout_s:
                raise StageError(
                    f"{what}: not ready (GET /health) within {self.smoke_timeout_s} s "
                    f"(log: {log_file}){_tail(log_file)}"
                )
            time.sleep(0.25)


# ---------------------------------------------------------------------- helpers


def planned_algos(plan: ModelPlan) -> tuple[str | None, tuple[str, ...]]:
    """(quant_algo, per-layer quant_algos) the export of ``plan``'s model will carry; None
    when unquantized or when only the export will tell (a ModelOpt recipe)."""
    quant = plan.quantization
    if quant is None or not quant.formats:
        return None, ()
    algos = tuple(
        sorted({facts.FORMAT_QUANT_ALGOS.get(f.format, f.format.upper()) for f in quant.formats})
    )
    if len(quant.formats) == 1:
        return algos[0], ()
    return facts.MIXED_PRECISION, algos


def read_checkpoint(checkpoint: Path) -> tuple[dict, dict | None]:
    """(config.json, hf_quant_config.json or None) of the exported unified HF checkpoint."""
    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise StageError(f"no readable unified HF checkpoint at {checkpoint} ({e})") from None
    path = checkpoint / "hf_quant_config.json"
    if not path.is_file():
        if config.get("quantization_config"):
            raise StageError(
                f"{checkpoint} is quantized (config.json has quantization_config) but has no "
                "hf_quant_config.json: not a ModelOpt unified HF export"
            )
        return config, None
    try:
        return config, json.loads(path.read_text())
    except ValueError as e:
        raise StageError(f"{path} is not valid JSON ({e})") from None


def argv_model(target: Target, argv: list[str]) -> str:
    """The model name the server answers to (the checkpoint path it was given)."""
    if target.runtime == "sglang":
        return argv[argv.index("--model-path") + 1]
    return argv[2] if target.runtime == "vllm" else argv[1]


def container_name(run_dir: Path, target: Target) -> str:
    import hashlib

    digest = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:10]
    return f"optimizer-deploy-{target.runtime}-{digest}"


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def stop(proc: subprocess.Popen, cmd: list[str], run_dir: Path, target: Target, launcher: str):
    """SIGTERM the server's process group, SIGKILL after 20 s; remove a named container."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, PermissionError):
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if launcher == "docker":
        subprocess.run(
            ["docker", "rm", "-f", container_name(run_dir, target)],
            capture_output=True,
            timeout=60,
        )


def _post_json(url: str, body: dict, timeout: float) -> Any:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


def _tail(log_file: Path, n: int = 15) -> str:
    try:
        with open(log_file, encoding="utf-8", errors="replace") as fh:
            last = deque((line.rstrip() for line in fh), maxlen=n)
    except OSError:
        return ""
    return "; last output:\n  " + "\n  ".join(last) if last else ""
