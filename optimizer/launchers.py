"""Running TensorRT-LLM's command-line tools as external programs: locally, in the NGC
container through docker, or behind a site command prefix (srun, a k8s job wrapper, ...).

Each launcher is a small :class:`Launcher` class registered in :data:`LAUNCHERS` (adding one
is a class and a registry entry); :func:`wrap` and :func:`preflight` dispatch by name."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
from collections import deque
from pathlib import Path

from optimizer.errors import OptimizerError, StageError
from optimizer.registry import Registry
from optimizer.trtllm.facts import ENGINE_VERSION_MAX

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]+)?"
#: A container image reference as docker parses it (distribution/reference's grammar):
#: ``[registry[:port]/]name[/name...][:tag][@algorithm:digest]``. Nothing that starts with
#: ``-`` matches, so an image value can never land among ``docker run``'s options.
IMAGE_REFERENCE = re.compile(
    rf"(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[\w][\w.-]{0,127})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?"
)


def image_problem(image: object) -> str | None:
    """Why ``image`` is not a container image reference (registry/name:tag@sha256:digest),
    or None."""
    if not isinstance(image, str) or not image:
        return "the image must be a container image reference, e.g. nvcr.io/nvidia/tensorrt-llm/release:1.2.0"
    if image.startswith("-"):
        return (
            f"image {image!r} starts with '-' and would be read as a docker run option; "
            "give an image reference, e.g. nvcr.io/nvidia/tensorrt-llm/release:1.2.0"
        )
    name = image.split("@", 1)[0]
    if len(name) > 255 or IMAGE_REFERENCE.fullmatch(image) is None:
        return (
            f"image {image!r} is not a container image reference "
            "([registry/]name[:tag][@sha256:digest], lowercase name, e.g. "
            "nvcr.io/nvidia/tensorrt-llm/release:1.2.0)"
        )
    return None


class Launcher:
    """How one launcher runs an external tool: ``wrap`` builds the command line, ``preflight``
    fails at once (before hours of PTQ) when the launcher cannot run at all."""

    name: str = ""

    def wrap(
        self, argv: list[str], *, image: str, mounts: list[Path], prefix: list[str]
    ) -> list[str]:
        raise NotImplementedError

    def preflight(self, tool: str, prefix: list[str]) -> None:
        raise NotImplementedError


class LocalLauncher(Launcher):
    """The tool on this machine's PATH."""

    name = "local"

    def wrap(self, argv, *, image, mounts, prefix):
        return list(argv)

    def preflight(self, tool, prefix):
        if shutil.which(tool) is None:
            version = ".".join(map(str, ENGINE_VERSION_MAX))
            raise StageError(
                f"{tool} is not on PATH. Install TensorRT-LLM (<= {version} for engines), or use "
                "launcher: docker (NGC image) or launcher: command with your site's prefix"
            )


class DockerLauncher(Launcher):
    """The tool inside a container image (the NGC TensorRT-LLM image), with the run directory
    mounted at the same path so every path in argv stays valid."""

    name = "docker"

    def wrap(self, argv, *, image, mounts, prefix):
        cmd = [
            "docker",
            "run",
            "--rm",
            "--gpus",
            "all",
            "--ipc=host",
            "--ulimit",
            "memlock=-1",
            "--ulimit",
            "stack=67108864",
        ]
        problem = image_problem(image)
        if problem:
            raise OptimizerError(problem)
        for m in mounts:  # same path inside and out, so every path in argv stays valid
            cmd += ["-v", f"{m}:{m}"]
        return [*cmd, "-w", str(mounts[0]), image, *argv]

    def preflight(self, tool, prefix):
        if shutil.which("docker") is None:
            raise StageError(
                "docker is not installed (no `docker` on PATH); install Docker with the NVIDIA "
                "Container Toolkit, or use launcher: local / command"
            )
        try:
            info = subprocess.run(
                ["docker", "info", "--format", "{{.ServerVersion}}"],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except subprocess.TimeoutExpired:
            raise StageError("the Docker daemon did not answer `docker info` within 30 s") from None
        if info.returncode != 0:
            detail = (info.stderr or info.stdout).strip().splitlines()
            raise StageError(
                "the Docker daemon is not reachable (`docker info` failed: "
                f"{detail[-1] if detail else 'no output'})"
            )


class CommandLauncher(Launcher):
    """The tool behind a site command prefix (srun, a k8s job wrapper, ...)."""

    name = "command"

    def wrap(self, argv, *, image, mounts, prefix):
        return [*prefix, *argv]

    def preflight(self, tool, prefix):
        if not prefix or shutil.which(prefix[0]) is None:
            raise StageError(f"command prefix {prefix[:1]} is not runnable here")


#: Launcher name -> a Launcher instance (classes imported and instantiated on first use).
LAUNCHERS: Registry[Launcher] = Registry(
    "launcher",
    {
        "local": "optimizer.launchers:LocalLauncher",
        "docker": "optimizer.launchers:DockerLauncher",
        "command": "optimizer.launchers:CommandLauncher",
    },
    loader=lambda name, cls: cls(),  # type: ignore[operator]
)


def wrap(
    launcher: str, argv: list[str], *, image: str, mounts: list[Path], prefix: list[str]
) -> list[str]:
    """The full command line for ``argv`` (a tool and its arguments) under a launcher."""
    return LAUNCHERS[launcher].wrap(argv, image=image, mounts=mounts, prefix=prefix)


def preflight(launcher: str, tool: str, prefix: list[str]) -> None:
    """Fail at once, with a clear message, when the launcher cannot run at all."""
    LAUNCHERS[launcher].preflight(tool, prefix)


def run_logged(cmd: list[str], log_file: Path, timeout_s: float, what: str, tail: int = 25) -> None:
    """Run ``cmd`` with its output streamed to ``log_file``; raise StageError on non-zero exit,
    a signal or a timeout, quoting the last lines of the log."""
    last: deque[str] = deque(maxlen=tail)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        except OSError as e:
            raise StageError(f"cannot start {what}: {e}") from None
        timed_out = threading.Event()

        def kill() -> None:  # a silent hang produces no output to notice it by
            timed_out.set()
            os.killpg(proc.pid, signal.SIGKILL)

        watchdog = threading.Timer(timeout_s, kill)
        watchdog.start()
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                last.append(line.rstrip())
        finally:
            watchdog.cancel()
        code = proc.wait()
    if timed_out.is_set():
        raise StageError(
            f"{what} timed out after {timeout_s:.0f} s (full log: {log_file}); last output:\n  "
            + "\n  ".join(last)
        )
    if code != 0:
        how = (
            f"was killed by signal {signal.Signals(-code).name}"
            if code < 0
            else f"exited with code {code}"
        )
        raise StageError(
            f"{what} {how} (full log: {log_file}); last output:\n  " + "\n  ".join(last)
        )
