"""The configuration of a distillation run: code defaults → recipe (TOML) → command line.

Every field is also a recipe key, and all but a few rarely changed ones (the timestep range,
AdamW's decay and betas) a `dmd distill` option of the same name (dashes for underscores), so a
recipe is a saved set of command-line choices.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import tomli_w

from dmdcli.core.dmd2 import DMD2Config, option
from dmdcli.core.losses import REGRESSION_DISTANCES
from dmdcli.core.progressive import LOSS_WEIGHTS, PARAMETERIZATIONS
from dmdcli.errors import DmdError, UsageError, first_line
from dmdcli.files import atomic_write
from dmdcli.train.rundir import CONFIG_FILE

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
# description: what the recipe is; continues: the recipe whose run this one goes on from (its
# stage 1, given with --init-from); resolved: the table a run folder's config.toml adds, so that
# file works as a recipe too.
RECIPE_ONLY_KEYS = {"description", "continues", "resolved"}
# A recipe's `extends = "NAME"`: a built-in recipe, or a file relative to this one, whose values
# this recipe's keys update (a variant states only what differs).
EXTENDS = "extends"
# A recipe's [per_steps.N] table: its values for an N-step student (--steps N) replace the
# recipe's own, as the reference keeps a set of hyperparameters per step count.
PER_STEPS = "per_steps"


@dataclass
class DistillConfig(DMD2Config):
    """Every option of a run, each with its default and its help: the objective's (DMD2Config),
    then those below. The help is what `dmd distill --help` shows (cli/distill.py)."""

    # -- what to distill ---------------------------------------------------------------------
    teacher: str | None = option(None, "Diffusers pipeline folder, hub id or alias.")
    steps: int = option(1, "Student sampling steps; timesteps evenly spaced from 999 (999, 749, 499, 249 for 4).")
    conditioning_timestep: int | None = option(
        None, "Timestep a 1-step student is told (default 399 for SDXL, 999 for SD, as the reference)."
    )
    prompts: str | None = option(None, "Prompts file: one a line, or JSON lines with prompt/text.")
    data: str | None = option(
        None,
        "Folder of captioned real images for the GAN term (.txt beside each, or metadata.jsonl); without it: no GAN.",
    )
    resolution: int | None = option(None, "Training resolution in pixels (default: the teacher's).")
    allow_pickle: bool = option(False, "Allow teacher weights stored as pickle (.bin/.ckpt) files.")
    fake_updates_per_gen: int = option(
        10, "Two time-scale rule: fake score updates per generator update; 10 SD1.5, 5 SDXL, 1 with --method dmd."
    )

    # -- other methods ---------------------------------------------------------------------------
    method: str = option(
        "dmd2",
        "dmd2 | dmd: DMD v1, distribution matching + regression on teacher noise→image pairs (λ 0.25, fake score "
        "updated every iteration, no GAN even with --data) | progressive: Progressive Distillation, rounds that "
        "halve the steps from --teacher-steps to --steps.",
    )
    regression_iterations: int = option(0, "Regression only for the first K iterations, e.g. a warm-up (0: always).")
    regression_distance: str = option(
        "auto",
        "auto (LPIPS if the lpips package and its weights load, else pseudo_huber) | lpips | pseudo_huber | mse. "
        "The one that ran is in config.toml and metrics.jsonl.",
    )
    pairs: int = option(
        64, "Regression pairs: made on first use by the teacher's deterministic DDIM with CFG, cached and reused."
    )
    pair_steps: int = option(25, "DDIM steps of the teacher per regression pair.")
    pairs_dir: str | None = option(None, "Regression pair cache (default $DMD_CACHE/pairs, else ~/.cache/dmd/pairs).")
    teacher_steps: int = option(
        64, "Progressive: DDIM steps of the first round's teacher, --steps × a power of two, halved each round."
    )
    iterations_per_round: int = option(1000, "Progressive: iterations of each halving round.")
    parameterization: str | None = option(
        None, "Progressive: the student predicts x, v or epsilon (default: the teacher's own)."
    )
    loss_weight: str = option(
        "truncated_snr", "Progressive: truncated_snr (max(SNR, 1)) | snr_plus_one (1 + SNR), on the x-space MSE."
    )

    # -- student -----------------------------------------------------------------------------
    lora_rank: int = option(0, "Train the generator as a LoRA of this rank (reference: 64; 0: full fine-tune).")
    lora_alpha: float | None = option(
        None, "LoRA alpha of both adapters (default: the rank; the reference SDXL LoRA uses 8 with rank 64)."
    )
    shared_base: bool = option(
        True,
        "With LoRA: generator and fake score as two adapters on one frozen copy of the teacher (about one UNet in "
        "memory), or the reference layout with a full fp32 fake score.",
    )
    fake_lora_rank: int | None = option(
        None,
        "Rank of the fake score's adapter on the shared base (default: --lora-rank); its alpha is the generator's.",
    )

    # -- optimization ---------------------------------------------------------------------------
    iterations: int = option(1000, "Training iterations.")
    batch_size: int = option(2, "Per-process batch of prompts (and of real images with --data).")
    lr: float = option(1e-5, "Generator learning rate (reference: 5e-7 full, 5e-5 LoRA).")
    fake_lr: float | None = option(None, "Fake score and classifier learning rate (default: --lr).")
    warmup_steps: int = option(500, "Linear LR warm-up iterations.")
    lr_schedule: str = option(
        "constant",
        "After the warm-up: constant (the reference) | cosine | linear, which decay to 0 at the last iteration.",
    )
    weight_decay: float = option(0.01, "AdamW weight decay.")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    max_grad_norm: float = option(10.0, "Gradient clipping norm.")
    mixed_precision: str = option(
        "auto",
        "bf16 | no | auto (bf16 on CUDA, fp32 on CPU). bf16 on a CPU runs the GPU's mixed-precision path (frozen "
        "weights in bf16, autocast); fast only on CPUs with bf16 instructions.",
    )
    gradient_checkpointing: bool = option(False, "Recompute activations in backward to save memory.")
    fsdp: bool = option(
        False,
        "Shard the generator, fake score and teacher across processes with PyTorch FSDP2 (full-weight runs under "
        "torchrun / accelerate launch).",
    )
    cache_prompts: bool = option(
        True,
        "Encode every prompt once at start-up and keep the conditionings on the CPU, so the text encoders leave the "
        "GPU (over 8 GiB of host memory: encode on the fly).",
    )
    seed: int = option(0, "Random seed.")
    skip_nonfinite: bool = option(
        False, "Skip and count updates with a non-finite loss or gradient instead of stopping."
    )
    init_from: str | None = option(
        None,
        "Start the generator, fake score and GAN head from another run (its newest checkpoint) or "
        "RUN/checkpoints/iter-N; optimizers and iterations start anew (second stages: sd15-1step after "
        "sd15-1step-stage1).",
    )

    # -- outputs -----------------------------------------------------------------------------
    out: str | None = option(None, "Run folder (default runs/<teacher>-<steps>step).")
    log_every: int = option(10, "Write metrics every N iterations.")
    sample_every: int = option(250, "Write a sample grid every N iterations (0: at the end only).")
    grid_size: int = option(4, "Images per sample grid: grid-size/2 fixed prompts × 2 fixed seeds.")
    teacher_grid_steps: int = option(
        25, "DDIM steps of the teacher's reference grid (with CFG) for the collapse watch (0: off)."
    )
    checkpoint_every: int = option(
        500, "Checkpoint every N iterations (also at the end and on Ctrl-C/SIGTERM; 0: only then)."
    )
    keep_checkpoints: int = option(2, "Newest complete checkpoints kept.")

    def precision(self) -> str:
        """What mixed_precision resolves to on this machine: "bf16" or "no" (fp32)."""
        import torch

        if self.mixed_precision == "auto":
            return "bf16" if torch.cuda.is_available() else "no"
        return self.mixed_precision

    def frozen_dtype(self):
        """The dtype of the frozen weights (teacher, shared LoRA base; the prompt conditioning): bf16 under
        mixed precision, else fp32; trained weights stay fp32 either way."""
        import torch

        return torch.bfloat16 if self.precision() == "bf16" else torch.float32

    def gan_term(self) -> bool:
        """Whether the run has a GAN term (a classifier head, and --data's images as real latents)."""
        return self.method != "dmd" and (self.gan_generator_weight > 0 or self.gan_discriminator_weight > 0)

    def lora_alpha_value(self) -> float:
        """The alpha of the generator's and the fake score's adapters."""
        return self.lora_alpha or self.lora_rank

    def fake_adapter_rank(self) -> int:
        """The rank of the fake score's adapter on a shared base."""
        return self.fake_lora_rank or self.lora_rank

    def fake_lr_value(self) -> float:
        """The fake score's learning rate (the generator's unless --fake-lr)."""
        return self.fake_lr or self.lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELD_NAMES = [f.name for f in fields(DistillConfig)]
_FIELDS = {f.name: f for f in fields(DistillConfig)}


def option_help(name: str) -> str:
    """The help of the option that sets field `name`: the field's help, and its default where
    that is a value (a default that follows another option is said in the help itself)."""
    f = _FIELDS[name]
    text = f.metadata["help"]
    return text if f.default is None else f"{text} (default {_default_words(f.default)})"


def _default_words(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return re.sub(r"e([+-])0*(\d)", lambda m: f"e{m[1].strip('+')}{m[2]}", f"{value:g}")  # 1e-05 → 1e-5
    return str(value)


# Options only some methods read. Given on the command line to another method they are refused,
# naming what that method reads instead where it has a counterpart; a recipe's keys are not
# checked, so one recipe can serve several methods.
PROGRESSIVE_ONLY = ("teacher_steps", "iterations_per_round", "parameterization", "loss_weight")
NOT_PROGRESSIVE = (
    "iterations", "fake_updates_per_gen", "fake_lr", "conditioning_timestep", "dm_weight", "regression_weight",
    "regression_iterations", "regression_distance", "pairs", "pair_steps", "pairs_dir", "gradient_checkpointing",
    "checkpoint_every", "keep_checkpoints", "sample_every", "teacher_grid_steps", "skip_nonfinite",
)  # fmt: skip
GAN_OPTIONS = ("gan_generator_weight", "gan_discriminator_weight", "diffusion_gan", "diffusion_gan_max_timestep")
METHOD_OPTIONS = {
    "dmd2": set(FIELD_NAMES) - set(PROGRESSIVE_ONLY),
    "dmd": set(FIELD_NAMES) - set(PROGRESSIVE_ONLY) - set(GAN_OPTIONS),
    "progressive": set(FIELD_NAMES) - set(NOT_PROGRESSIVE) - set(GAN_OPTIONS),
}
# The counterpart a method reads where it refuses one of these (each is read by exactly the other methods).
INSTEAD = {"iterations": "--iterations-per-round", "iterations_per_round": "--iterations"}


def check_method_options(method: str, given: dict[str, Any]) -> None:
    """Refuse an option the method does not read: `--method progressive --iterations 4` would
    otherwise run rounds of the default --iterations-per-round, silently."""
    if method not in METHOD_OPTIONS:
        return  # validate() names the valid methods
    for key in given:
        if key not in METHOD_OPTIONS[method]:
            flag = "--" + key.replace("_", "-")
            readers = [m for m, used in METHOD_OPTIONS.items() if key in used]
            hint = f"; it reads {INSTEAD[key]}" if key in INSTEAD else ""
            raise UsageError(f"--method {method} does not read {flag} (read by --method {' and '.join(readers)}){hint}")


def recipe_path(name_or_path: str) -> Path:
    """A recipe by name (recipes/NAME.toml) or by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise UsageError(f"recipe file not found: {path}")
        return path
    candidate = RECIPES_DIR / f"{name_or_path}.toml"
    if not candidate.is_file():
        raise UsageError(f"unknown recipe {name_or_path!r}; built-in recipes: {', '.join(list_recipes())}")
    return candidate


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def _read_recipe(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file's keys over those of the recipe it extends, and so on down the chain
    (`chain`: the files that led here, to catch a cycle)."""
    values = _recipe_file(path)
    base = values.pop(EXTENDS, None)
    if base is None:
        return values
    chain = (*chain, path)
    try:
        base_path = _base_path(base, path)
    except UsageError as e:
        raise UsageError(f"recipe {path}, {EXTENDS} = {base!r}: {e}") from None
    if base_path.resolve() in {p.resolve() for p in chain}:
        raise UsageError(f"recipes extend each other in a cycle: {' → '.join(map(str, (*chain, base_path)))}")
    return _extend(_read_recipe(base_path, chain), values)


def _recipe_file(path: Path) -> dict[str, Any]:
    """One recipe file's own keys, checked: known keys of the right type, [per_steps.N] tables."""
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"recipe {path} is not valid TOML: {e}") from e
    if not isinstance(values.get(EXTENDS, ""), str):
        raise UsageError(f"recipe {path}: {EXTENDS} = {values[EXTENDS]!r} is not a recipe name or path")
    per_steps = values.get(PER_STEPS, {})
    check_keys({k: v for k, v in values.items() if k not in (PER_STEPS, EXTENDS)}, f"recipe {path}")
    if not isinstance(per_steps, dict) or not all(k.isdigit() and isinstance(v, dict) for k, v in per_steps.items()):
        raise UsageError(f"recipe {path}: [{PER_STEPS}] holds tables named by a step count, e.g. [{PER_STEPS}.1]")
    for steps, table in per_steps.items():
        check_keys(table, f"recipe {path}, [{PER_STEPS}.{steps}]")
    return values


def _base_path(name: str, recipe: Path) -> Path:
    """The recipe an `extends` names: a file relative to the recipe's own folder, else a built-in recipe."""
    beside = recipe.parent / name
    return recipe_path(str(beside) if beside.suffix == ".toml" or beside.exists() else name)


def _extend(base: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """`base` updated by `own`, their [per_steps.N] tables too, key by key."""
    values = {**base, **own}
    per_steps = {n: dict(table) for n, table in base.get(PER_STEPS, {}).items()}
    for n, table in own.get(PER_STEPS, {}).items():
        per_steps.setdefault(n, {}).update(table)
    if per_steps:
        values[PER_STEPS] = per_steps
    return values


def recipe_continues(name_or_path: str) -> str | None:
    """The recipe whose run this recipe's run continues (--init-from), if it is a second stage."""
    return _read_recipe(recipe_path(name_or_path)).get("continues")


def second_stage_note(recipe: str | None, config: DistillConfig) -> str | None:
    """What a run of a second-stage recipe is told when it has no --init-from: it starts from the teacher."""
    first = recipe_continues(recipe) if recipe and config.init_from is None else None
    if first is None:
        return None
    return (
        f"note: recipe {recipe} is the second stage of {first}; without --init-from RUN (a {first} run) "
        "it starts from the teacher"
    )


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A recipe's values (those it extends included), its [per_steps.N] tables keyed by N."""
    values = _read_recipe(recipe_path(name_or_path))
    per_steps = values.pop(PER_STEPS, {})
    values = {k: v for k, v in values.items() if k not in RECIPE_ONLY_KEYS}
    return {**values, PER_STEPS: {int(k): v for k, v in per_steps.items()}} if per_steps else values


def check_keys(values: dict[str, Any], where: str) -> None:
    """Unknown keys, and values of the wrong type (`iterations = "five"`), are usage errors."""
    unknown = sorted(set(values) - set(FIELD_NAMES) - RECIPE_ONLY_KEYS)
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(FIELD_NAMES)}")
    for key, value in values.items():
        if key in FIELD_TYPES and value is not None and not _has_type(value, FIELD_TYPES[key]):
            raise UsageError(f"{where}: {key} = {value!r} is not {_TYPE_WORDS[FIELD_TYPES[key]]}")


def _has_type(value: Any, kind: type) -> bool:
    if kind is float:  # TOML writes 1e-4 as a float but 5 as an int; both are numbers
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _field_types() -> dict[str, type]:
    """Each field's value type (str for `str | None`, ...), from the dataclass annotations."""
    import typing

    hints = typing.get_type_hints(DistillConfig)
    return {
        name: next(t for t in typing.get_args(hint) or (hint,) if t is not type(None)) for name, hint in hints.items()
    }


FIELD_TYPES = _field_types()
_TYPE_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}

# Local paths a run reads again on --resume or that its student records: kept absolute, so a run
# folder works from any working directory. (The teacher too when it is an existing folder, as
# resolve_teacher makes it; the teacher families' data set names and `--prompts -` are names, not paths.)
PATH_KEYS = ("prompts", "data", "pairs_dir", "init_from")


def absolute_paths(values: dict[str, Any]) -> dict[str, Any]:
    from dmdcli.models.families import data_names
    from dmdcli.models.teacher import local_teacher_folder

    not_paths = {"data": data_names(), "prompts": ["-"]}
    values = dict(values)
    if isinstance(values.get("teacher"), str):
        values["teacher"] = local_teacher_folder(values["teacher"]) or values["teacher"]
    for key in PATH_KEYS:
        value = values.get(key)
        if isinstance(value, str) and value not in not_paths.get(key, ()):
            values[key] = str(Path(value).expanduser().resolve())
    return values


def resolve_config(recipe: str | None, overrides: dict[str, Any], base: dict[str, Any] | None = None) -> DistillConfig:
    """Defaults, then the recipe's keys (or `base`, a resumed run's values), then the command
    line's explicitly given options."""
    values: dict[str, Any] = dict(base) if base else (load_recipe(recipe) if recipe else {})
    check_keys(overrides, "command line")
    given = {k: v for k, v in overrides.items() if v is not None}
    steps = given.get("steps", values.get("steps", DistillConfig.steps))
    values.update(values.pop(PER_STEPS, {}).get(steps, {}))
    method = given.get("method", values.get("method", "dmd2"))
    check_method_options(method, given)
    preset = METHOD_PRESETS.get(method, {})
    if values.get("method", "dmd2") == method:
        preset = {k: v for k, v in preset.items() if k not in values}  # a recipe written for this method wins
    # Layers: code defaults → recipe → the method's preset (over a recipe written for another method) → command line.
    values.update(preset)
    values.update(given)
    config = DistillConfig(**absolute_paths(values))
    validate(config)
    return config


def validate(c: DistillConfig) -> None:
    """Range checks that need no files (those are checked where the files are opened)."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UsageError(message)

    need(c.teacher is not None, "no teacher: pass --teacher (a diffusers folder, hub id, or sd15/sdxl) or --recipe")
    need(1 <= c.steps <= 1000, f"--steps must lie in 1 … 1000 (got {c.steps})")
    need(c.iterations >= 1, f"--iterations must be at least 1 (got {c.iterations})")
    need(c.batch_size >= 1, f"--batch-size must be at least 1 (got {c.batch_size})")
    need(c.fake_updates_per_gen >= 1, f"--fake-updates-per-gen must be at least 1 (got {c.fake_updates_per_gen})")
    need(c.lora_rank >= 0, f"--lora-rank must be 0 (full fine-tune) or positive (got {c.lora_rank})")
    need(c.lora_alpha is None or c.lora_alpha > 0, f"--lora-alpha must be positive (got {c.lora_alpha})")
    # numpy's seeds (accelerate's set_seed) stop at 2**32 − 1, and each process adds its index
    need(0 <= c.seed < 2**31, f"--seed must lie in 0 … {2**31 - 1} (got {c.seed})")
    need(c.lr > 0 and (c.fake_lr is None or c.fake_lr > 0), "learning rates must be positive")
    need(c.warmup_steps >= 0 and c.max_grad_norm > 0, "--warmup-steps must be ≥ 0 and --max-grad-norm > 0")
    need(
        c.weight_decay >= 0 and 0 <= c.adam_beta1 < 1 and 0 <= c.adam_beta2 < 1,
        "need weight_decay ≥ 0 and 0 ≤ adam_beta1, adam_beta2 < 1",
    )
    need(
        1 <= c.diffusion_gan_max_timestep <= 1000,
        f"--diffusion-gan-max-timestep must lie in 1 … 1000 (got {c.diffusion_gan_max_timestep})",
    )
    need(
        c.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)} (got {c.lr_schedule!r})"
    )
    span, what = (
        (c.iterations_per_round, "--iterations-per-round")
        if c.method == "progressive"
        else (c.iterations, "--iterations")
    )
    need(
        c.lr_schedule == "constant" or c.warmup_steps < span,
        f"--lr-schedule {c.lr_schedule} decays after the warm-up, which --warmup-steps {c.warmup_steps} makes "
        f"as long as {what} {span}: lower --warmup-steps",
    )
    need(c.guidance_scale >= 1.0, f"--guidance-scale must be ≥ 1 (got {c.guidance_scale})")
    need(0.0 <= c.min_timestep_frac < c.max_timestep_frac <= 1.0, "need 0 ≤ min_timestep_frac < max_timestep_frac ≤ 1")
    need(
        c.mixed_precision in ("auto", "bf16", "no"),
        f"--mixed-precision must be bf16, no or auto (got {c.mixed_precision})",
    )
    need(
        c.prompts is not None or c.data is not None,
        "no prompts: pass --prompts FILE, or --data DIR whose captions become the prompts",
    )
    need(
        c.dm_weight > 0 or c.data is not None, "with --dm-weight 0 the generator needs the GAN term, which needs --data"
    )
    need(c.log_every >= 1 and c.sample_every >= 0 and c.grid_size >= 1, "log_every, grid_size ≥ 1 and sample_every ≥ 0")
    need(c.checkpoint_every >= 0 and c.keep_checkpoints >= 1, "checkpoint_every ≥ 0 and keep_checkpoints ≥ 1")
    need(0 <= c.teacher_grid_steps <= 1000, f"teacher_grid_steps must lie in 0 … 1000 (got {c.teacher_grid_steps})")
    if c.conditioning_timestep is not None:
        need(0 <= c.conditioning_timestep < 1000, "--conditioning-timestep must lie in [0, 999]")
    need(c.method in METHODS, f"--method must be one of {', '.join(METHODS)} (got {c.method!r})")
    need(
        c.regression_weight >= 0 and c.regression_iterations >= 0,
        "regression_weight and regression_iterations must be ≥ 0",
    )
    need(
        c.regression_distance in DISTANCE_CHOICES, f"--regression-distance must be one of {', '.join(DISTANCE_CHOICES)}"
    )
    # DDIM ladders of more steps than the 1000 training timesteps repeat timesteps
    need(
        c.pairs >= 1 and 1 <= c.pair_steps <= 1000,
        f"--pairs must be at least 1 and --pair-steps lie in 1 … 1000 (got {c.pairs}, {c.pair_steps})",
    )
    if c.method == "progressive":
        need(2 <= c.teacher_steps <= 1000, f"--teacher-steps must lie in 2 … 1000 (got {c.teacher_steps})")
        need(
            c.teacher_steps > c.steps and c.teacher_steps % c.steps == 0 and _power_of_two(c.teacher_steps // c.steps),
            "--teacher-steps must be --steps × a power of two, larger than --steps "
            f"(got {c.teacher_steps} and {c.steps})",
        )
        need(c.iterations_per_round >= 1, "--iterations-per-round must be at least 1")
        need(
            c.parameterization in (None, *PARAMETERIZATIONS),
            f"--parameterization must be one of {', '.join(PARAMETERIZATIONS)} (got {c.parameterization!r})",
        )
        need(
            c.loss_weight in LOSS_WEIGHTS,
            f"--loss-weight must be one of {', '.join(LOSS_WEIGHTS)} (got {c.loss_weight!r})",
        )
        need(c.lora_rank == 0, "--method progressive trains full students; drop --lora-rank")
        need(not c.fsdp, "--method progressive runs in one process; drop --fsdp")
        need(c.init_from is None, "--method progressive starts from the teacher; drop --init-from")
    need(
        not (c.fsdp and c.lora_rank),
        f"--fsdp shards full-weight runs; a --lora-rank {c.lora_rank} run fits one GPU and "
        "trains data-parallel without it: drop --fsdp or --lora-rank",
    )


def choose_recipe(
    recipe: str | None, teacher: str | None, steps: int | None, lora_rank: int | None, has_data: bool, resume: bool
) -> tuple[str | None, str | None]:
    """The recipe a run starts from, and its name when it was chosen for the teacher's family
    (the run says so): the family's recipe default (dmdcli.models.families); `dmd distill` alone
    gets the default family's, a built-in teacher's recipe (its whole run)."""
    if recipe is not None or resume:
        return recipe, None
    from dmdcli.models.families import default_family, teacher_aliases
    from dmdcli.models.teacher import teacher_family

    family = default_family() if teacher is None else teacher_family(teacher)
    chosen = family.recipe(steps or DistillConfig.steps, lora_rank)
    if teacher is None and has_data:  # most likely a forgotten --teacher
        raise UsageError(
            "--prompts/--data without --teacher: pass --teacher (a diffusers folder, hub id, or "
            f"{', '.join(teacher_aliases())}), or --recipe {chosen} to use them with {family.title}"
        )
    return chosen, None if family.builtin_teacher else chosen


METHODS = ("dmd2", "dmd", "progressive")
LR_SCHEDULES = ("constant", "cosine", "linear")
# DMD v1 (arXiv 2311.18828): the fake score is updated once per generator update, and the
# regression loss (λ = 0.25) replaces DMD2's two time-scale rule and GAN as the stabilizer.
METHOD_PRESETS = {"dmd": {"fake_updates_per_gen": 1, "regression_weight": 0.25}}
DISTANCE_CHOICES = ("auto", "lpips", *REGRESSION_DISTANCES)  # LPIPS needs its package: train/regression.py


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def write_config(config: DistillConfig, path: Path, extra: dict[str, Any] | None = None) -> None:
    """The resolved configuration as TOML (None values omitted: TOML has no null)."""
    values = {k: v for k, v in config.to_dict().items() if v is not None}
    if extra:
        values["resolved"] = {k: v for k, v in extra.items() if v is not None}
    text = tomli_w.dumps(values)
    atomic_write(path, lambda tmp: tmp.write_text(text))


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


# What decides the shapes and meaning of the trained weights: another run's checkpoint can
# initialize this one (--init-from) only where these agree.
WEIGHT_KEYS = ("teacher", "lora_rank", "lora_alpha", "shared_base", "fake_lora_rank")


def _as_used(values: dict[str, Any]) -> dict[str, Any]:
    """Values as a run uses them, so that spelling a default out is no change: the defaults that
    follow other keys filled in by DistillConfig's own rules (alpha = rank, fake rank = rank, fake
    lr = lr), and the LoRA keys of a full fine-tune dropped."""
    c = DistillConfig(**{k: values[k] for k in FIELD_NAMES if k in values})
    lora = bool(c.lora_rank)
    shared = lora and c.shared_base
    return {
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
    return {k: v for k, v in values.items() if k not in RECIPE_ONLY_KEYS}


def resumed_values(out: str | None, overwrite: bool, recipe: str | None, init_from: str | None) -> dict[str, Any]:
    """The values a --resume run goes on with: its run folder's own; nothing may choose others."""
    if overwrite or recipe or init_from:
        raise UsageError(
            "--resume continues the run in --out with its own config.toml; drop --overwrite/--recipe/--init-from"
        )
    if out is None:
        raise UsageError("--resume needs --out RUN, the run folder to continue")
    return run_config_values(Path(out))
