"""Talking to the user: messages and progress on stderr (stdout stays for data), rich-rendered."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def stderr_console() -> Console:
    console = Console(stderr=True, highlight=False)
    if not console.is_terminal:  # a log file or pipe: one message a line, never wrapped at 80 columns,
        console.soft_wrap = True  # and room for the progress line's counts, times and losses
        console.width = 160
    return console


def format_logs(logs: dict | None) -> str:
    """Loss terms, short: `dm 0.512 denoise 0.093`."""
    if not logs:
        return ""
    return " ".join(f"{k.removeprefix('loss_')} {v:.3g}" for k, v in logs.items() if k.startswith("loss_"))


class RichUI:
    """Messages as plain lines and long work as a progress bar with ETA and the latest losses."""

    def __init__(self, quiet: bool = False):
        self.console = stderr_console()
        self.quiet = quiet

    def message(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, markup=False)

    @contextlib.contextmanager
    def working(self, description: str) -> Iterator[None]:
        """Work with no count to show: a spinner and the time elapsed."""
        progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=self.quiet,
            transient=False,
        )
        with progress:
            progress.add_task(description, total=None)
            yield

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator:
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[logs]}"),
            console=self.console,
            disable=self.quiet,
            transient=False,
        )
        with progress:
            task = progress.add_task(description, total=total or None, logs="")

            def update(done: int, logs: dict | None = None) -> None:
                fields = {"logs": format_logs(logs)}
                if logs and "total" in logs:
                    fields["total"] = logs["total"]
                progress.update(task, completed=done, **fields)

            yield update
