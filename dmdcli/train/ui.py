"""How the runtime talks to its user: rich in the CLI (dmdcli.cli.ui), silent in library use."""

from __future__ import annotations

import contextlib
from typing import Protocol


class UI(Protocol):
    def message(self, text: str) -> None: ...

    def task(self, description: str, total: int): ...  # context manager yielding update(done, logs)


class SilentUI:
    def message(self, text: str) -> None:
        pass

    def task(self, description: str, total: int):
        return contextlib.nullcontext(lambda done, logs=None: None)
