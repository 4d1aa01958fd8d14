"""Crash-safe checkpoints: tensors in safetensors, everything else in JSON, never pickle.

    RUN/checkpoints/iter-000100/
        rng-rank{R}.*         each process's Python, NumPy, torch CPU and CUDA RNG states
        tensors.safetensors   model weights, optimizer moments
        state.json            iteration, optimizer hyperparameters, LR schedules, the
                              configuration; written last

A checkpoint is built in a hidden temporary folder and renamed into place, so a checkpoint cut
short (SIGKILL, full disk) is never found under an `iter-*` name; `is_checkpoint` also requires
both its state.json and its tensors, and a damaged one fails in `read_checkpoint` with one line.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from dmdcli.errors import DmdError
from dmdcli.files import atomic_save_file, atomic_write, save_file, sync_folder

# The read side lives below the models (they load checkpoints' generators): dmdcli/runfiles.py.
from dmdcli.runfiles import CHECKPOINTS_DIR, STATE_FILE, TENSORS_FILE, is_checkpoint

_NAME = re.compile(r"^iter-(\d{6,})$")


# -- optimizer and RNG state as (tensors, JSON) ----------------------------------------------


def optimizer_state(state_dict: dict[str, Any], prefix: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer's state_dict into named tensors and JSON-able values."""
    tensors, scalars = {}, {}
    for index, state in state_dict.get("state", {}).items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state_dict.get("param_groups", []), "scalars": scalars}


def optimizer_state_dict(prefix: str, tensors: dict[str, Tensor], saved: dict[str, Any]) -> dict[str, Any]:
    """The optimizer state_dict that `optimizer_state` split."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            index, name = key[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    for key, value in saved["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": saved["param_groups"]}


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Every RNG this process draws from: Python, NumPy, torch CPU and its CUDA device (only its
    own: each process draws on one, and may be shown only that one when it resumes)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy": torch.from_numpy(np_keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()  # the current device: accelerate sets it per process
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss], "numpy": [np_name, np_pos, np_has_gauss, np_gauss]}


def load_rng_state(tensors: dict[str, Tensor], saved: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    name, pos, has_gauss, gauss = saved["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    if torch.cuda.is_available():
        # checkpoints before 2026-11-29 kept every visible device's state as rng.cuda.<index>
        cuda = tensors.get("rng.cuda", tensors.get(f"rng.cuda.{torch.cuda.current_device()}"))
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


# -- the checkpoint folder ---------------------------------------------------------------------


def checkpoint_name(iteration: int) -> str:
    return f"iter-{iteration:06d}"


# Beside the checkpoints, folders being written: a checkpoint before its rename, and the RNG
# states every process leaves for the main process to assemble.
TEMPORARY_PREFIX, STAGING_PREFIX = ".tmp-", ".staging-"


def staging_dir(run: Path, iteration: int) -> Path:
    """Where every process leaves its RNG state before the main process assembles a checkpoint."""
    return run / CHECKPOINTS_DIR / f"{STAGING_PREFIX}{checkpoint_name(iteration)}"


def remove_leftovers(run: Path) -> int:
    """Remove the temporary and staging folders of checkpoint writes that a kill (SIGKILL, the OOM
    killer) cut short: each can hold gigabytes, left exactly when the disk is short. Returns how many."""
    root = run / CHECKPOINTS_DIR
    found = (
        [p for prefix in (TEMPORARY_PREFIX, STAGING_PREFIX) for p in root.glob(f"{prefix}*")] if root.is_dir() else []
    )
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return len(found)


def rng_files(rank: int) -> tuple[str, str]:
    return f"rng-rank{rank}.safetensors", f"rng-rank{rank}.json"


def write_rng(folder: Path, rank: int) -> None:
    """This process's RNG states as rng-rank{R}.safetensors + rng-rank{R}.json."""
    tensors, state = rng_state()
    weights, meta = rng_files(rank)
    atomic_save_file(tensors, folder / weights)
    atomic_write(folder / meta, lambda tmp: tmp.write_text(json.dumps(state)))


def restore_rng(checkpoint: Path, rank: int) -> None:
    try:
        weights, meta = rng_files(rank)
        tensors = load_file(str(checkpoint / weights))
        state = json.loads((checkpoint / meta).read_text())
    except Exception as e:
        raise DmdError(f"checkpoint {checkpoint} has no readable RNG state for process {rank}: {e}") from e
    load_rng_state(tensors, state)


def write_checkpoint(
    run: Path,
    iteration: int,
    tensors: dict[str, Tensor],
    state: dict[str, Any],
    keep: int,
    staged: Path | None = None,
    processes: int = 1,
) -> Path:
    """Write a checkpoint atomically (with the files in `staged`: the RNG states of `processes`
    processes), then keep the newest `keep`."""
    if staged is not None:  # a node that does not share the run folder wrote its state elsewhere
        missing = [r for r in range(processes) if not all((staged / name).is_file() for name in rng_files(r))]
        if missing:
            raise DmdError(
                f"checkpoint {iteration}: the RNG state of process(es) {', '.join(map(str, missing))} is not in "
                f"{staged}; on several nodes, --out must be on a filesystem every node shares"
            )
    root = run / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(iteration)
    if final in complete_checkpoints(run):  # same iteration, same state: keep the one on disk
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
        return final
    tmp = root / f"{TEMPORARY_PREFIX}{checkpoint_name(iteration)}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for path in sorted(staged.iterdir()) if staged is not None else []:
            os.replace(path, tmp / path.name)
        save_file(tensors, tmp / TENSORS_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({"iteration": iteration, **state}))
        sync_folder(tmp)  # on disk before it is published: the older checkpoints are deleted below
        if final.exists():  # an incomplete leftover under the final name
            shutil.rmtree(final)
        os.replace(tmp, final)
        sync_folder(root, files=False)
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in complete_checkpoints(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_keys(path: Path) -> list[str]:
    """The names of a checkpoint's tensors, without reading the tensors."""
    from safetensors import safe_open

    with safe_open(str(path / TENSORS_FILE), framework="pt") as f:
        return list(f.keys())


def complete_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary or broken folders are ignored)."""
    root = run / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and is_checkpoint(path):
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run: Path) -> Path | None:
    checkpoints = complete_checkpoints(run)
    return checkpoints[-1] if checkpoints else None
