"""What a run continued with --resume, or started from another run's weights with --init-from,
may change, and the values a resumed run goes on with."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from dmdcli.errors import DmdError, UsageError, first_line
from dmdcli.runfiles import CONFIG_FILE
from dmdcli.train.config import FIELD_NAMES, RECIPE_ONLY_KEYS, DistillConfig
from dmdcli.train.recipes import absolute_paths

# Options that may change when a run is resumed; every other key must match the checkpoint.
RESUMABLE_KEYS = {
    "iterations",
    "out",
    "log_every",
    "sample_every",
    "grid_size",
    "teacher_grid_steps",
    "checkpoint_every",
    "keep_checkpoints",
    "skip_nonfinite",
    "cache_prompts",  # where the conditionings are computed, not what they are (and absent from older checkpoints)
    "fsdp",  # how the weights are laid out across processes, not what they are: checkpoints are the same
}


# Keys added since runs were first written whose value in an older run was not today's default: the
# value such a run used, read wherever its config.toml or a checkpoint's configuration lacks the key.
LEGACY_VALUES = {"fused_optimizer": False}  # before it, torch's default AdamW


# What decides the shapes and meaning of the trained weights: another run's checkpoint can
# initialize this one (--init-from) only where these agree.
WEIGHT_KEYS = ("teacher", "lora_rank", "lora_alpha", "shared_base", "fake_lora_rank")


def _as_used(values: dict[str, Any]) -> dict[str, Any]:
    """Values as a run uses them, so that spelling a default out (or a key added since) is no change: the defaults that
    follow other keys filled in by DistillConfig's own rules (alpha = rank, fake rank = rank, fake
    lr = lr), and the LoRA keys of a full fine-tune dropped."""
    values = {**LEGACY_VALUES, **values}
    c = DistillConfig(**{k: values[k] for k in FIELD_NAMES if k in values})
    lora = bool(c.lora_rank)
    shared = lora and c.shared_base
    return {
        **c.to_dict(),  # a key an older run's config lacks: that run used its default (or LEGACY_VALUES')
        **values,
        "lora_alpha": c.lora_alpha_value() if lora else None,
        "shared_base": shared,
        "fake_lora_rank": c.fake_adapter_rank() if shared else None,
        "fake_lr": c.fake_lr_value(),
    }


def _differences(saved: dict[str, Any], config: DistillConfig, keys) -> list[tuple[str, Any, Any]]:
    """(key, saved value, this run's) for each of `keys` that differs as used; the LoRA keys that
    follow the rank are left out when the rank itself differs."""
    # absolute_paths: runs from before paths were stored absolute
    current, saved = _as_used(config.to_dict()), _as_used(absolute_paths(saved))
    found = [(k, saved.get(k), current[k]) for k in keys if saved.get(k) != current[k]]
    if any(k == "lora_rank" for k, _, _ in found):
        found = [d for d in found if d[0] not in ("lora_alpha", "shared_base", "fake_lora_rank")]
    return found


def init_conflicts(saved: dict[str, Any], config: DistillConfig) -> list[tuple[str, Any, Any]]:
    """Where another run's networks differ from this one's: (key, there, here) for WEIGHT_KEYS."""
    return _differences(saved, config, WEIGHT_KEYS)


def resume_conflicts(saved: dict[str, Any], config: DistillConfig) -> list[tuple[str, Any, Any]]:
    """Where this configuration contradicts the checkpoint's: (key, then, now) for every key but
    RESUMABLE_KEYS."""
    return _differences(saved, config, [k for k in FIELD_NAMES if k not in RESUMABLE_KEYS])


def run_config_values(run: Path) -> dict[str, Any]:
    """The configuration values a run folder was started with (its config.toml)."""
    path = run / CONFIG_FILE
    if not path.is_file():
        raise UsageError(f"nothing to resume: {run} holds no run (no {CONFIG_FILE})")
    try:
        values = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise DmdError(f"cannot read {path}: {first_line(e)}") from None
    return {k: v for k, v in {**LEGACY_VALUES, **values}.items() if k not in RECIPE_ONLY_KEYS}


def resumed_values(out: str | None, overwrite: bool, recipe: str | None, init_from: str | None) -> dict[str, Any]:
    """The values a --resume run goes on with: its run folder's own; nothing may choose others."""
    if overwrite or recipe or init_from:
        raise UsageError(
            "--resume continues the run in --out with its own config.toml; drop --overwrite/--recipe/--init-from"
        )
    if out is None:
        raise UsageError("--resume needs --out RUN, the run folder to continue")
    return run_config_values(Path(out))
