"""The read side of a run folder's files: what `dmd sample`, `dmd eval` and `dmd export` find there.

    RUN/student.safetensors              the student + its metadata (written by train/rundir.py)
    RUN/config.toml, RUN/metrics.jsonl   a run's configuration and log (a run with no student yet)
    RUN/checkpoints/iter-N/              state.json + tensors.safetensors (written by train/checkpoint.py)

Below both the models and the training runtime, so that loading a student never imports the
code that trains one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmdcli.errors import DmdError

if TYPE_CHECKING:
    from torch import Tensor

STUDENT_FILE = "student.safetensors"
STUDENT_RAW_FILE = "student-raw.safetensors"  # with --ema-decay: the raw weights (STUDENT_FILE is the average)
EMA_PREFIX = "generator_ema."  # a checkpoint's EMA of the generator ("generator." holds the raw weights)
CONFIG_FILE = "config.toml"
STREAM_PROMPTS_FILE = "prompts.jsonl"  # prompts the run read from a pipe, kept for --resume
METRICS_FILE = "metrics.jsonl"
STUDENT_FORMAT = "dmd-student/1"
CHECKPOINTS_DIR = "checkpoints"
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"


def read_student_info(path: Path) -> dict[str, Any]:
    """The metadata of a student file (no tensors loaded)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:
        raise DmdError(f"{path} is not a readable safetensors file: {e}") from e
    if metadata.get("format") != STUDENT_FORMAT:
        raise DmdError(f"{path} is not a dmd student file")
    return {k: json.loads(v) for k, v in metadata.items() if k != "format"}


def is_checkpoint(path: Path) -> bool:
    """Whether `path` is a complete checkpoint folder (its state and its tensors written)."""
    return (path / STATE_FILE).is_file() and (path / TENSORS_FILE).is_file()


def read_checkpoint(path: Path, with_tensors: bool = True) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, JSON state); with_tensors=False reads only the state ({} for the tensors)."""
    from safetensors.torch import load_file

    try:
        state = json.loads((path / STATE_FILE).read_text())
        tensors = load_file(str(path / TENSORS_FILE)) if with_tensors else {}
    except Exception as e:
        raise DmdError(
            f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); remove it to resume from an older one"
        ) from e
    return tensors, state
