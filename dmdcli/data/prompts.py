"""Prompt files: plain text (one prompt a line) or JSON lines with a prompt field."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dmdcli.errors import UsageError

# Field names tried in order on a JSON line; `caption` lets image-caption files double as prompts.
PROMPT_FIELDS = ("prompt", "text", "caption")


def read_prompts(path: str | Path) -> list[str]:
    """Read prompts from `path` ("-" means standard input).

    Each non-blank line is a prompt, except a line starting with `{`, which is parsed as a
    JSON object and gives the value of its `prompt`, `text` or `caption` field. Whitespace
    around each prompt is stripped and blank lines are skipped. Raises UsageError when the
    file is missing or unreadable, holds no prompts, or has a bad JSON line.
    """
    name = "<stdin>" if str(path) == "-" else str(path)
    text = _read_text(path, name)
    prompts = [
        prompt for number, line in enumerate(text.splitlines(), start=1) if (prompt := _parse_line(line, number, name))
    ]
    if not prompts:
        raise UsageError(f"prompts file {name} holds no prompts")
    return prompts


def _read_text(path: str | Path, name: str) -> str:
    """The whole file as text; a UTF-8 byte order mark is dropped (Windows editors add one)."""
    if str(path) == "-":
        return sys.stdin.read().lstrip("\ufeff")
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{name} is a folder, not a prompts file (one prompt a line)")
    if not p.exists():  # a pipe, a process substitution (/dev/fd/N) or /dev/null is read as a file is
        raise UsageError(f"prompts file not found: {name}")
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"prompts file {name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UsageError(f"cannot read prompts file {name}: {exc.strerror or exc}") from None


def _parse_line(line: str, number: int, name: str) -> str:
    """The prompt on one line ("" for a blank line)."""
    line = line.strip()
    if not line.startswith("{"):
        return line
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UsageError(f"prompts file {name}, line {number}: invalid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise UsageError(f"prompts file {name}, line {number}: expected a JSON object")
    for field in PROMPT_FIELDS:
        if field in record:
            value = record[field]
            if not isinstance(value, str) or not value.strip():
                raise UsageError(f"prompts file {name}, line {number}: field '{field}' is not a non-empty string")
            return value.strip()
    raise UsageError(f"prompts file {name}, line {number}: no 'prompt', 'text' or 'caption' field")


def is_stream(path: str | Path) -> bool:
    """Whether `path` names something that can be read only once: a named pipe, a process
    substitution (/dev/fd/N), a character device (not "-", which names standard input)."""
    p = Path(path)
    return str(path) != "-" and p.exists() and not p.is_file() and not p.is_dir()


def write_prompts(prompts: list[str], path: Path) -> None:
    """`prompts` as JSON lines ({"prompt": ...}), which read_prompts reads back exactly."""
    from dmdcli.files import atomic_write

    text = "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
