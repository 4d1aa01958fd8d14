"""What a run folder holds, and how each file is written.

    RUN/config.toml          resolved configuration (reusable as a recipe)
    RUN/metrics.jsonl        one JSON object per logged iteration
    RUN/samples/iter-N.png   sample grids from fixed prompts and seeds
    RUN/student.safetensors  the student (full UNet or LoRA adapter) + metadata for sample/export
    RUN/checkpoints/iter-N/  see checkpoint.py
    RUN/rounds/              progressive distillation's student after each round

and which of a folder's contents a new run refuses to mix with, or clears with --overwrite.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dmdcli.errors import UsageError
from dmdcli.files import atomic_save_file, atomic_write, check_can_make

# The read side lives below the models (they find students in run folders): dmdcli/runfiles.py.
from dmdcli.runfiles import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    STUDENT_FILE,
    STUDENT_FORMAT,
    STUDENT_RAW_FILE,
)

SAMPLES_DIR = "samples"
ROUNDS_DIR = "rounds"  # progressive distillation's student after each halving round


def save_student(path: Path, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
    """Write the student's weights; `info` (teacher, steps, timesteps, ...) goes in the header.

    safetensors metadata is str → str, so every value is JSON-encoded.
    """
    metadata = {"format": STUDENT_FORMAT, **{k: json.dumps(v) for k, v in info.items()}}
    atomic_save_file(tensors, path, metadata)


def run_folder(out: str | None, teacher: str, steps: int) -> Path:
    """--out, or runs/<teacher's name>-<steps>step."""
    if out:
        return Path(out)
    return Path("runs") / f"{Path(teacher.rstrip('/')).name or 'teacher'}-{steps}step"


RUN_FILES = (CONFIG_FILE, STUDENT_FILE, STUDENT_RAW_FILE, METRICS_FILE)
# What the run and the commands run on its student write there; --overwrite clears all of it,
# so no export or evaluation of the old student is left beside the new one.
RUN_FOLDERS = (SAMPLES_DIR, ROUNDS_DIR, CHECKPOINTS_DIR, "export")


def check_run_folder(out: Path, overwrite: bool) -> None:
    """Refuse (before any work) to mix two runs in one folder unless asked to overwrite, and to
    write a run into a file or into a folder of other things (--overwrite never clears those)."""
    check_can_make(out)
    holds_run = any((out / f).exists() for f in RUN_FILES) or (out / CHECKPOINTS_DIR).is_dir()
    if holds_run and not overwrite:
        raise UsageError(
            f"{out} already holds a run; pass --resume to continue it, --overwrite to replace it, or another --out"
        )
    if not holds_run and out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {out} is a folder that holds other files, not a dmd run; choose a new or empty folder")


def create_run_folder(out: Path) -> None:
    """Create the folder, clearing an overwritten run's files (only once everything has loaded)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in RUN_FILES:
        (out / f).unlink(missing_ok=True)
    old = [out / name for name in RUN_FOLDERS]
    for report in out.glob("eval-*.json"):  # `dmd eval`'s report, its grid and its images
        old += [report, report.with_name(f"{report.stem}-grid.png"), report.with_suffix("")]
    for path in old:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


class MetricsLog:
    """Appends one JSON line per call to RUN/metrics.jsonl (flushed, so `tail -f` works)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, iteration: int) -> None:
        """Drop records past `iteration` (a resumed run writes them again), and a line torn by a
        write that failed (a full disk, a killed process)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if _iteration(line) <= iteration]
        atomic_write(self.path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


def _iteration(line: str) -> float:
    """A metrics line's iteration; infinity (never kept) for a torn or foreign line."""
    try:
        return json.loads(line)["iteration"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def save_grid(images: Tensor, path: Path, columns: int | None = None) -> None:
    """Images [N, 3, H, W] in [-1, 1] → one PNG grid (near-square unless `columns` is given)."""
    n, _, h, w = images.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        r, c = divmod(i, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
