"""What every subcommand shares: error reporting and the JSON line on stdout."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import warnings
from typing import Any, Callable

import typer
from rich.markup import escape

from dmdcli.cli.ui import stderr_console
from dmdcli.errors import DmdError, describe_os_error, first_line

DEBUG = {"on": False}  # set by the app's --debug option


def handle_errors(command: Callable) -> Callable:
    """Turn DmdError into one line on stderr and its exit code; Ctrl-C into exit 130.

    An OSError (full disk, permissions) is the user's to fix too: one line, exit 1; so is
    running out of memory (torch.OutOfMemoryError, or a MemoryError / RuntimeError saying so).
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except DmdError as e:
            if DEBUG["on"]:
                raise
            stderr_console().print(f"[bold red]{e.label}:[/] {escape(str(e))}", soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except BrokenPipeError:  # `dmd ... --json | head -0`: the reader left; stop quietly, as `cat` does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
            raise typer.Exit(141) from None
        except OSError as e:
            if DEBUG["on"]:
                raise
            stderr_console().print(f"[bold red]error:[/] {escape(describe_os_error(e))}", soft_wrap=True)
            raise typer.Exit(1) from None
        except (MemoryError, RuntimeError) as e:
            if DEBUG["on"] or not is_out_of_memory(e):
                raise
            stderr_console().print(
                f"[bold red]error:[/] out of memory ({escape(first_line(e))}); "
                "try a smaller --batch-size or --resolution",
                soft_wrap=True,
            )
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            if DEBUG["on"]:
                raise
            stderr_console().print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


# How torch says it could not allocate: CUDA/MPS "out of memory", the CPU allocator "can't allocate memory".
_OOM_MESSAGE = re.compile(r"out of memory|(can't|cannot|could not|failed to) allocate|not enough memory", re.IGNORECASE)


def is_out_of_memory(e: BaseException) -> bool:
    """Whether `e` is torch (or Python) running out of memory."""
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or bool(_OOM_MESSAGE.search(str(e)))


def print_json(record: dict[str, Any]) -> None:
    """One JSON object on one line of stdout (the only thing commands print there)."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def quiet_library_bars() -> None:
    """diffusers' and transformers' own bars (loading, "Writing model shards" when an export saves
    the text encoders) would interleave with ours on stderr; so would a warning diffusers gives itself."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    # diffusers' own Chroma transformer (0.42) imports a name diffusers itself deprecates: not the user's to act on
    warnings.filterwarnings("ignore", r"`FluxPosEmbed` is deprecated", FutureWarning)
