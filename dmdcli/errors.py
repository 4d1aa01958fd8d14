"""Errors that the CLI turns into one clear line and an exit code, never a traceback."""

from __future__ import annotations

import errno


class DmdError(Exception):
    """A failure the user can act on (bad file, missing weights, ...): exit code 1."""

    exit_code = 1
    label = "error"  # how the CLI's one line starts


class UsageError(DmdError):
    """A mistake on the command line or in a recipe: exit code 2, like Typer's own usage errors."""

    exit_code = 2


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: which file, and why (a full disk, a permission, ...)."""
    path = e.filename or "a file"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device while writing {path}; free some space and run again"
    return f"{path}: {e.strerror or e}"


def first_line(e: BaseException) -> str:
    """An exception's message in one line: its first line (its type's name when it has none), or,
    under a heading such as load_state_dict's "Error(s) in loading state_dict for X:", the first
    line of the details."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
