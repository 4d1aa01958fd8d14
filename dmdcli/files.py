"""Reading and writing files so that a failure reads as one clear line and never leaves half a
file behind.

Every file we write goes to a hidden temporary name beside its final path and is renamed over it
once complete (a rename within one folder is atomic): a full disk or a Ctrl-C leaves the old file
or none, never a truncated one a later command would trip over. The one exception is a run's
metrics.jsonl, appended a line at a time; a resumed run drops a torn last line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from dmdcli.errors import DmdError, UsageError, first_line

if TYPE_CHECKING:
    from torch import Tensor

_OS_ERROR = re.compile(r"os error (\d+)")


def cache_dir(name: str) -> Path:
    """Where dmd keeps what it can make again (shapes data, regression pairs, eval statistics):
    $DMD_CACHE/name, else ~/.cache/dmd/name."""
    root = os.environ.get("DMD_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "dmd") / name


def check_can_make(path: Path, option: str = "--out", folder: bool = True) -> None:
    """UsageError when a file stands in the way of `path`, a folder to make (`folder`) or a file to
    write: found before any model loads, not when the first file is written."""
    for above in ((path,) if folder else ()) + tuple(path.parents):
        if above.exists():
            if above.is_dir():
                return
            if above == path:
                raise UsageError(f"{option} {path} is a file; it must be a folder (made if missing)")
            raise UsageError(f"{option} {path} is below {above}, which is a file")


def read_json(path: Path) -> Any:
    """A JSON file's value; DmdError naming the file when it is missing, unreadable or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DmdError(f"cannot read {path}: {first_line(e)}") from None


def save_file(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with its I/O failures raised as the OSError they are.

    safetensors reports a full disk as SafetensorError("... I/O error: No space left on device
    (os error 28)"); as an OSError it carries errno and filename, so the CLI can say what happened.
    """
    try:
        _safetensors_save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata
        )
    except SafetensorError as e:
        match = _OS_ERROR.search(str(e))
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code), str(path)) from e
    share_as_umask(Path(path))


def share_as_umask(path: Path) -> None:
    """Give a file, or a folder and all it holds, the permissions the user's umask gives new files:
    safetensors writes its files, and mkdtemp its folders, readable by their owner alone."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def atomic_write(final: Path, write: Callable[[Path], object]) -> Path:
    """Call write(tmp) on a temporary file beside `final`, then rename it to `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, final)
    except OSError as e:
        if e.filename in (None, str(tmp)):  # name the file the user asked for, not our temporary one
            e.filename = str(final)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return final


def atomic_folder(final: Path, write: Callable[[Path], object], marker: str) -> Path:
    """Call write(tmp) on a new temporary folder beside `final` (complete once it holds `marker`,
    written last), then rename it to `final`. A `final` without its marker is debris and is
    replaced; one that another process completed first is kept, and ours dropped."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        write(tmp)
        if not (final / marker).is_file():
            shutil.rmtree(final, ignore_errors=True)
            try:
                os.replace(tmp, final)
            except OSError:
                if not (final / marker).is_file():  # not a process that finished first: a real failure
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def sync_folder(folder: Path, files: bool = True) -> None:
    """Flush `folder`'s list of entries (and, with `files`, every file in it) to the disk. A rename
    is atomic but not durable: after a power cut a folder renamed into place can hold empty files,
    or none, unless they were synced before and its parent after. No-op on Windows."""
    if os.name == "nt":
        return
    for path in sorted(Path(folder).iterdir()) if files else []:
        if path.is_file():
            _fsync(path)
    _fsync(Path(folder))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save_file(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata))


def _safetensors_save_file(tensors: dict[str, Tensor], filename: str, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file  # here: torch is slow to import, and sample/--help need none

    save_file(tensors, filename, metadata=metadata)
