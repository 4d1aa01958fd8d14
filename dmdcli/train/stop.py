"""How a run stops: SIGINT / SIGTERM between iterations, and the errors a stopped run raises."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from dmdcli.errors import DmdError, describe_os_error
from dmdcli.train.checkpoint import latest_checkpoint


class Interrupted(DmdError):
    """SIGINT / SIGTERM: the run stopped after a checkpoint; exit 130 / 143 as shells expect."""

    label = "stopped"  # as asked, not failed

    def __init__(self, signum: int, iteration: int, checkpoint: Path, out: Path):
        self.exit_code = 128 + signum
        super().__init__(
            f"interrupted at iteration {iteration}; checkpoint saved to {checkpoint}. "
            f"Continue with: dmd distill --out {out} --resume"
        )


class RunFinished(Exception):
    """--resume of a run that has done its --iterations: nothing to do (found before any model loads)."""


class WriteFailed(DmdError):
    """A write failed mid-run (most often a full disk): say which checkpoint the run continues from."""

    def __init__(self, error: OSError, out: Path):
        found = latest_checkpoint(out)
        hint = (
            f". Checkpoint {found} is complete; continue from it with: dmd distill --out {out} --resume"
            if found
            else ""
        )
        super().__init__(describe_os_error(error) + hint)


class StopOnSignal:
    """Turn SIGINT/SIGTERM into a flag checked between iterations; a second Ctrl-C (SIGINT) stops
    at once. A signal that comes again within ESCALATE_AFTER seconds is the same one delivered
    twice, not a second request: torchrun forwards what it receives to processes that a
    terminal's Ctrl-C or a scheduler's `kill` of the process group already reached."""

    ESCALATE_AFTER = 0.5

    def __enter__(self) -> "StopOnSignal":
        self.signal: int | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            self.signal, self.since = signum, time.monotonic()
        elif signum == signal.SIGINT and time.monotonic() - self.since >= self.ESCALATE_AFTER:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
