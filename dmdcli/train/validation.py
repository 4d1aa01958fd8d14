"""What a run's values must be: recipe and command-line keys and their types, the options each
method reads, and the range checks that need no files (those are checked where the files are
opened). The options themselves, with their defaults and help, are train/config.py."""

from __future__ import annotations

from typing import Any

from dmdcli.core.dmd2 import DM_TIMESTEPS, FAKE_SCORE_TARGETS, FAKE_SCORE_TIMESTEPS
from dmdcli.core.losses import REGRESSION_DISTANCES
from dmdcli.core.progressive import LOSS_WEIGHTS, PARAMETERIZATIONS
from dmdcli.errors import UsageError
from dmdcli.train.config import (
    FIELD_NAMES,
    FIELD_TYPES,
    RECIPE_ONLY_KEYS,
    DistillConfig,
    Progressive,
    Regression,
    section_names,
)

# Options only some methods read. Given on the command line to another method they are refused,
# naming what that method reads instead where it has a counterpart; a recipe's keys are not
# checked, so one recipe can serve several methods.
PROGRESSIVE_ONLY = section_names(Progressive)
NOT_PROGRESSIVE = (
    *section_names(Regression), "iterations", "fake_updates_per_gen", "fake_lr", "conditioning_timestep", "dm_weight",
    "student_timesteps", "regression_weight", "dm_timesteps", "fake_score_target", "fake_score_timesteps",
    "gradient_checkpointing",
    "checkpoint_every", "keep_checkpoints", "sample_every", "teacher_grid_steps", "skip_nonfinite", "ema_decay",
)  # fmt: skip
GAN_OPTIONS = (
    "gan_generator_weight", "gan_discriminator_weight", "diffusion_gan", "diffusion_gan_max_timestep", "gan_same_noise",
)  # fmt: skip
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


_TYPE_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}


def validate(c: DistillConfig) -> None:
    """Range checks that need no files (those are checked where the files are opened)."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UsageError(message)

    need(c.teacher is not None, "no teacher: pass --teacher (a diffusers folder, hub id, or sd15/sdxl) or --recipe")
    need(1 <= c.steps <= 1000, f"--steps must lie in 1 … 1000 (got {c.steps})")
    need(c.iterations >= 1, f"--iterations must be at least 1 (got {c.iterations})")
    need(c.batch_size >= 1, f"--batch-size must be at least 1 (got {c.batch_size})")
    need(
        c.gradient_accumulation_steps >= 1,
        f"--gradient-accumulation-steps must be at least 1 (got {c.gradient_accumulation_steps})",
    )
    need(c.global_batch is None or c.global_batch >= 1, f"--global-batch must be at least 1 (got {c.global_batch})")
    need(
        c.global_batch is None or c.gradient_accumulation_steps == 1,
        "give --global-batch or --gradient-accumulation-steps, not both (the global batch sets the accumulation)",
    )
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
    need(c.dm_timesteps in DM_TIMESTEPS, f"--dm-timesteps must be one of {', '.join(DM_TIMESTEPS)}")
    need(
        c.fake_score_target in FAKE_SCORE_TARGETS,
        f"--fake-score-target must be one of {', '.join(FAKE_SCORE_TARGETS)}",
    )
    need(
        c.diffusion_gan or not c.gan_same_noise,
        "--gan-same-noise draws the diffusion GAN's noise once for real and fake latents: it needs --diffusion-gan",
    )
    need(
        c.fake_score_timesteps in FAKE_SCORE_TIMESTEPS,
        f"--fake-score-timesteps must be one of {', '.join(FAKE_SCORE_TIMESTEPS)}",
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
        c.dm_weight > 0 or c.gan_term() and c.data is not None or c.regression_only(),
        "with --dm-weight 0 the generator needs the GAN term (--data) or the regression term alone "
        "(--regression-weight > 0, --regression-iterations 0)",
    )
    need(c.log_every >= 1 and c.sample_every >= 0 and c.grid_size >= 1, "log_every, grid_size ≥ 1 and sample_every ≥ 0")
    need(c.checkpoint_every >= 0 and c.keep_checkpoints >= 1, "checkpoint_every ≥ 0 and keep_checkpoints ≥ 1")
    need(0 <= c.teacher_grid_steps <= 1000, f"teacher_grid_steps must lie in 0 … 1000 (got {c.teacher_grid_steps})")
    if c.conditioning_timestep is not None:
        need(0 <= c.conditioning_timestep < 1000, "--conditioning-timestep must lie in [0, 999]")
    if c.student_timesteps is not None:
        _check_student_timesteps(c)
    need(0.0 <= c.ema_decay < 1.0, f"--ema-decay must lie in [0, 1) (got {c.ema_decay}; 0: no EMA)")
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
        need(
            c.lora_rank == 0,
            f"--method progressive trains full students; this run's LoRA rank is {c.lora_rank} (from --lora-rank "
            "or its recipe): pass --lora-rank 0",
        )
        need(not c.fsdp, "--method progressive runs in one process; drop --fsdp")
        need(c.init_from is None, "--method progressive starts from the teacher; drop --init-from")
    need(
        not (c.fsdp and c.lora_rank),
        f"--fsdp shards full-weight runs; a --lora-rank {c.lora_rank} run fits one GPU and "
        "trains data-parallel without it: drop --fsdp or --lora-rank",
    )


METHODS = ("dmd2", "dmd", "progressive")
LR_SCHEDULES = ("constant", "cosine", "linear")
DISTANCE_CHOICES = ("auto", "lpips", *REGRESSION_DISTANCES)  # LPIPS needs its package: train/regression.py


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def check_teacher_options(c: DistillConfig, spec, family) -> None:
    """The options a run's teacher (its TeacherSpec and Family) cannot take, each one usage line;
    asked by the run and by --dry-run alike."""
    denoiser_options = family.denoiser_kwargs(c)
    if c.gan_feature_block is not None and "gan_feature_block" not in denoiser_options:
        raise UsageError(f"--gan-feature-block is for transformer teachers; {spec.source} is a UNet")
    if not family.classifier_free_guidance and c.guidance_scale != 1:
        raise UsageError(
            f"{spec.source} is guidance-distilled: its real score is told --embedded-guidance "
            f"({c.embedded_guidance}) and takes no CFG; pass --guidance-scale 1"
        )
    if c.dm_timesteps != "shifted" and spec.prediction_type != "flow":
        raise UsageError(
            f"--dm-timesteps {c.dm_timesteps} draws the σ of a flow-matching teacher; {spec.source} "
            "is on a DDPM schedule: use shifted (uniform over its timesteps, the default)"
        )
    if c.fsdp and not family.shardable:
        raise UsageError(
            f"--fsdp: {family.title or family.name} runs a batch's prompts of each length as their own forward, "
            "whose count differs between processes, which FSDP's collectives cannot follow; train shared-base "
            "LoRA (--lora-rank), which fits one GPU"
        )


def _check_student_timesteps(c: DistillConfig) -> None:
    """--student-timesteps: whole numbers, decreasing, in [0, 999], as many as --steps."""
    given = f"--student-timesteps {c.student_timesteps!r}"
    try:
        timesteps = c.student_timestep_list()
    except ValueError:
        raise UsageError(f"{given}: not a comma list of whole numbers") from None
    if not all(0 <= t < 1000 for t in timesteps) or any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        raise UsageError(f"{given}: need decreasing timesteps in [0, 999]")
    if len(timesteps) != c.steps:
        raise UsageError(f"{given} gives {len(timesteps)} step(s) but --steps is {c.steps}")
