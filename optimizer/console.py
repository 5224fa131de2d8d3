"""What the ``optimize`` process owns: the console, process-wide logging, environment
defaults, and stdout during a run. Only cli.py calls this module; library code (the runner,
stages, evaluation) changes none of it, so a notebook or a platform job embedding the
library keeps its own logging and stdout.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from pathlib import Path

from optimizer.errors import EXIT_TERMINATED

#: Warnings ModelOpt/transformers emit on every run that say nothing actionable to our users
#: (lm_head is excluded on purpose; TensorRT-LLM is an external tool, not a Python import).
#: They still go to logs/run.log.
BENIGN_WARNINGS = (
    "Enable lm_head quantization",
    "No module named 'tensorrt_llm'",
    "differs from target dtype",
    "To copy construct from a tensor",
    "`torch_dtype` is deprecated",
    "Passed an already-initialized model through `pretrained`",
    "`pretrained` model kwarg is not of type `str`",
    "Custom kwargs can be passed to `--metadata`",
)


class _ConsoleFilter(logging.Filter):
    """Our own INFO messages reach the console; other libraries' only from WARNING up."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("optimizer"):
            return True
        if record.levelno < logging.WARNING:
            return False
        message = record.getMessage()
        return not any(noise in message for noise in BENIGN_WARNINGS)


#: The exit code of a run stopped by SIGTERM (128 + 15, what a shell reports); SIGINT: 130.


class Terminated(KeyboardInterrupt):
    """SIGTERM: handled everywhere as Ctrl-C is (a KeyboardInterrupt), exit code 143."""

    exit_code = EXIT_TERMINATED


def _on_sigterm(signum, frame) -> None:
    raise Terminated(
        "terminated (SIGTERM: the job was stopped or preempted, or under torchrun another rank "
        "failed; see logs/run.rankN.log)"
    )


def _terminate_like_ctrl_c() -> None:
    """SIGTERM (a scheduler stopping or preempting the job; torchrun stopping the other ranks
    when one fails) ends the run as Ctrl-C does: run.json says ``interrupted`` and why, the
    exit code is 143 (Ctrl-C: 130), and ``--resume`` continues. Without this the process dies mid-write
    and run.json keeps saying ``running``."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and (
        signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, _on_sigterm)
    ):
        signal.signal(signal.SIGTERM, _on_sigterm)


def setup_process(quiet: bool) -> None:
    """Console logging on stderr and environment defaults for this process."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    for handler in [h for h in root.handlers if getattr(h, "optimizer_console", False)]:
        root.removeHandler(handler)  # main() called again in one process (tests, notebooks)
    console = logging.StreamHandler(sys.stderr)
    console.optimizer_console = True
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    console.addFilter(_ConsoleFilter())
    console.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    root.addHandler(console)
    logging.captureWarnings(True)
    _terminate_like_ctrl_c()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Local lm-eval tasks read local files; never wait on the hub for them.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"
        # transformers and huggingface_hub draw their own bars; they read this switch when
        # imported, and are told directly when already imported (main() called in-process).
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()


class _FileLogFilter(logging.Filter):
    """Everything of ours down to DEBUG; other libraries from INFO up (their DEBUG is noise)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("optimizer") or record.levelno >= logging.INFO


class _StdoutToLog(io.TextIOBase):
    """ModelOpt reports with print(); route it to the log so stdout stays machine-readable."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger
        self.buf = ""

    def write(self, s: str) -> int:
        self.buf += s
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            if line.strip():
                self.logger.info(line.rstrip())
        return len(s)


@contextlib.contextmanager
def capture_run_log(path: Path):
    """For ``Runner(capture=...)``: every library's log records and whatever is printed go
    to ``path`` while the run lasts, so a job's stdout holds only the final JSON line."""
    from optimizer.rundir import open_log

    stream = open_log(path)  # never through a symbolic link
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.DEBUG)
    handler.addFilter(_FileLogFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with contextlib.redirect_stdout(_StdoutToLog(logging.getLogger("optimizer.stdout"))):
            yield
    finally:
        root.removeHandler(handler)
        handler.close()
        stream.close()
