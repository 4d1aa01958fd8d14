"""The configuration of a distillation run: code defaults → recipe (TOML) → command line.

Every field is also a recipe key, and all but a few rarely changed ones (the timestep range,
AdamW's decay and betas) a `dmd distill` option of the same name (dashes for underscores), so a
recipe is a saved set of command-line choices.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import tomli_w

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
# A recipe's [per_steps.N] table: its values for an N-step student (--steps N) replace the
# recipe's own, as the reference keeps a set of hyperparameters per step count.
PER_STEPS = "per_steps"


@dataclass
class DistillConfig:
    # -- what to distill ---------------------------------------------------------------------
    teacher: str | None = None
    """Diffusers pipeline folder, hub id or alias (sd15, sd21, sdxl)."""
    steps: int = 1
    """Student sampling steps; timesteps evenly spaced from 999 (999, 749, 499, 249 for 4)."""
    conditioning_timestep: int | None = None
    """Timestep the 1-step student is told (None: 399 for SDXL, 999 for SD, as the reference)."""
    prompts: str | None = None
    """Prompt file (one a line, or JSON lines with prompt/text) for distribution matching."""
    data: str | None = None
    """Folder of real images with captions for the GAN term; without it the GAN is off."""
    resolution: int | None = None
    """Training resolution in pixels (None: the teacher's native size)."""

    # -- the DMD2 objective --------------------------------------------------------------------
    guidance_scale: float = 1.75
    """Real-score CFG, uncond + s·(cond − uncond): 1.75 SD1.5, 8 SDXL."""
    dm_weight: float = 1.0
    gan_generator_weight: float = 1e-3
    """softplus(−D(G(z))) weight: 1e-3 SD1.5, 5e-3 SDXL."""
    gan_discriminator_weight: float = 1e-2
    diffusion_gan: bool = False
    """Noise real and fake latents before the classifier (t < diffusion_gan_max_timestep)."""
    diffusion_gan_max_timestep: int = 1000
    min_timestep_frac: float = 0.02
    max_timestep_frac: float = 0.98
    fake_updates_per_gen: int = 10
    """Two time-scale rule: fake score updates per generator update (10 SD1.5, 5 SDXL)."""

    # -- other methods (README "Other methods") -------------------------------------------------
    method: str = "dmd2"
    """dmd2 | dmd (DMD v1: DM + regression on teacher pairs, fake score every update, no GAN) |
    progressive (Salimans & Ho progressive distillation)."""
    regression_weight: float = 0.0
    """Weight λ of the regression loss on teacher noise→latent pairs (DMD v1: 0.25; 0: off)."""
    regression_iterations: int = 0
    """Apply the regression term only for the first K iterations (0: always), e.g. a warm-up."""
    regression_distance: str = "auto"
    """lpips | pseudo_huber | mse | auto (LPIPS if the lpips package and its weights load, else pseudo_huber)."""
    pairs: int = 64
    """Regression pairs generated with the teacher (cached, reused by later runs)."""
    pair_steps: int = 25
    """DDIM steps (with CFG at --guidance-scale) of the teacher for each regression pair."""
    pairs_dir: str | None = None
    """Pair cache folder (None: $DMD_CACHE/pairs, else ~/.cache/dmd/pairs)."""
    teacher_steps: int = 64
    """Progressive: DDIM steps of the first round's teacher (halved each round down to --steps)."""
    iterations_per_round: int = 1000
    """Progressive: training iterations of each halving round."""
    parameterization: str | None = None
    """Progressive: what the student predicts, x | v | epsilon (None: the teacher's own type)."""
    loss_weight: str = "truncated_snr"
    """Progressive: truncated_snr (max(SNR, 1)) or snr_plus_one (1 + SNR) on the x-space MSE."""

    # -- student -----------------------------------------------------------------------------
    lora_rank: int = 0
    """0: full fine-tune of the generator; R > 0: a LoRA head of rank R (reference: 64)."""
    lora_alpha: float | None = None
    """LoRA alpha of both adapters (None: equal to --lora-rank; the reference SDXL LoRA uses 8 with rank 64)."""
    shared_base: bool = True
    """With LoRA: generator and fake score are two adapters on ONE frozen copy of the teacher's
    weights (about one UNet in memory). False: the reference layout (full fp32 fake score)."""
    fake_lora_rank: int | None = None
    """Rank of the fake score's adapter with a shared base (None: --lora-rank); its alpha is the generator's."""

    # -- optimization ---------------------------------------------------------------------------
    iterations: int = 1000
    batch_size: int = 2
    """Per-process batch of prompts (and of real images when --data is given)."""
    lr: float = 1e-5
    """Generator learning rate (reference: 5e-7 full, 5e-5 LoRA)."""
    fake_lr: float | None = None
    """Fake score + classifier learning rate (None: same as lr)."""
    warmup_steps: int = 500
    lr_schedule: str = "constant"
    """After the warm-up: constant (the reference) | cosine | linear (decay to 0 at the last iteration)."""
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 10.0
    mixed_precision: str = "auto"
    """bf16 | no | auto (bf16 on CUDA, fp32 on CPU). bf16 on a CPU runs the same mixed-precision
    path as on a GPU (frozen weights in bf16, autocast); fast only on CPUs with bf16 instructions."""
    gradient_checkpointing: bool = False
    fsdp: bool = False
    """Shard the generator, fake score and teacher across processes with PyTorch FSDP2 (full-weight
    runs under torchrun / accelerate launch; README "Many GPUs")."""
    cache_prompts: bool = True
    """Encode every prompt once at start-up, keep the conditionings on the CPU and drop the text
    encoders (falls back to encoding on the fly when the cache would exceed 8 GiB of host memory)."""
    seed: int = 0
    init_from: str | None = None
    """Start the generator, the fake score and (when both runs have one) the classifier head from
    another run's checkpoint (RUN/checkpoints/iter-N, or RUN: its newest); optimizers, LR schedule
    and iterations start anew. A two-stage recipe's second stage (sd15-1step after sd15-1step-stage1)."""

    # -- outputs -----------------------------------------------------------------------------
    out: str | None = None
    """Run folder (None: runs/<teacher>-<steps>step)."""
    log_every: int = 10
    sample_every: int = 250
    """Write a sample grid every N iterations (0: only at the end)."""
    grid_size: int = 4
    """Images in each sample grid: grid_size/2 fixed prompts × 2 fixed seeds."""
    teacher_grid_steps: int = 25
    """Steps of the teacher's reference grid (CFG, DDIM) for the collapse watch; 0: no reference."""
    checkpoint_every: int = 500
    """Checkpoint every N iterations (0: only at the end and on SIGINT/SIGTERM)."""
    keep_checkpoints: int = 2
    """Newest complete checkpoints kept."""
    skip_nonfinite: bool = False
    """Skip (and count) an update whose loss or gradient is not finite instead of stopping."""
    allow_pickle: bool = False
    """Load teacher weights stored as pickle (.bin/.ckpt) files; off by default."""

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


def _read_recipe(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"recipe {path} is not valid TOML: {e}") from e


def recipe_continues(name_or_path: str) -> str | None:
    """The recipe whose run this recipe's run continues (--init-from), if it is a second stage."""
    return _read_recipe(recipe_path(name_or_path)).get("continues")


def load_recipe(name_or_path: str) -> dict[str, Any]:
    path = recipe_path(name_or_path)
    values = _read_recipe(path)
    per_steps = values.pop(PER_STEPS, {})
    check_keys(values, f"recipe {path}")
    if not isinstance(per_steps, dict) or not all(k.isdigit() and isinstance(v, dict) for k, v in per_steps.items()):
        raise UsageError(f"recipe {path}: [{PER_STEPS}] holds tables named by a step count, e.g. [{PER_STEPS}.1]")
    for steps, table in per_steps.items():
        check_keys(table, f"recipe {path}, [{PER_STEPS}.{steps}]")
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
# resolve_teacher makes it; `--data shapes` and `--prompts -` are names, not paths.)
PATH_KEYS = ("prompts", "data", "pairs_dir", "init_from")
NOT_PATHS = {"data": {"shapes"}, "prompts": {"-"}}


def absolute_paths(values: dict[str, Any]) -> dict[str, Any]:
    from dmdcli.models.teacher import local_teacher_folder

    values = dict(values)
    if isinstance(values.get("teacher"), str):
        values["teacher"] = local_teacher_folder(values["teacher"]) or values["teacher"]
    for key in PATH_KEYS:
        value = values.get(key)
        if isinstance(value, str) and value not in NOT_PATHS.get(key, ()):
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
        f"--lr-schedule {c.lr_schedule} decays after the warm-up, which --warmup-steps {c.warmup_steps} makes as long as "
        f"{what} {span}: lower --warmup-steps",
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
            f"--teacher-steps must be --steps × a power of two, larger than --steps (got {c.teacher_steps} and {c.steps})",
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


def layout_recipe(layout: str, steps: int | None, lora_rank: int | None) -> str | None:
    """The recipe a teacher of this layout gets without --recipe: an SDXL teacher the reference's
    SDXL values (CFG 8, TTUR 5, GAN 5e-3, 1024², the LR of full or LoRA training); None for SD
    layouts, whose values the code defaults already are (SD1.5's)."""
    if layout != "sdxl":
        return None
    if (steps or DistillConfig.steps) == 1:
        return "sdxl-1step"
    return "sdxl-4step-lora" if lora_rank else "sdxl-4step"


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
