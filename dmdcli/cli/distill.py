"""`dmd distill`: turn a diffusers teacher into a few-step student with DMD2."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dmdcli.cli import options
from dmdcli.cli.common import handle_errors, print_json, quiet_library_bars
from dmdcli.cli.ui import RichUI
from dmdcli.errors import UsageError
from dmdcli.models.families import default_family, named_family, teacher_aliases
from dmdcli.train.config import (
    FIELD_TYPES,
    choose_recipe,
    list_recipes,
    option_help,
    resolve_config,
    resumed_values,
    second_stage_note,
)

HELP = f"""Distill a teacher into a 1- to 4-step student with DMD2.

Options override the recipe's keys of the same name; the resolved configuration is written to
OUT/config.toml. Built-in recipes: {", ".join(list_recipes()) or "none"}.

{default_family().help} An SDXL
teacher without --recipe gets the reference's SDXL recipe (sdxl-1step, sdxl-4step, or with
--lora-rank sdxl-4step-lora); the defaults listed below are those of an SD teacher without one.

Example: dmd distill --recipe sdxl-4step-lora --prompts prompts.txt --data images/ --out runs/sdxl4

Other methods: --method dmd (DMD v1; the teacher's regression pairs are made on first use and
cached, see --pairs), --method progressive (rounds halving --teacher-steps down to --steps).
"""

ALIASES = ", ".join(f"{k} = {v}" for k, v in teacher_aliases().items())
MODEL, OBJ, OPT, OUT = "Teacher and data", "DMD2 objective", "Optimization", options.OUTPUTS
METHOD = "Other methods: DMD (v1) regression, progressive distillation"


def _opt(help: str, panel: str, *names: str):
    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=False)


# Extra words for an option's help that only the command line knows.
CLI_NOTES = {"teacher": f" Aliases: {ALIASES}."}
PLAIN_FLAGS = {"allow_pickle"}  # on/off options that are a flag alone (no --no-...)


def _cfg(name: str, panel: str):
    """The option that sets config field `name`: its help and default come from DistillConfig."""
    flag = "--" + name.replace("_", "-")
    if FIELD_TYPES[name] is bool and name not in PLAIN_FLAGS:
        flag = f"{flag}/--no-{name.replace('_', '-')}"
    return _opt(option_help(name) + CLI_NOTES.get(name, ""), panel, flag)


@handle_errors
def distill(
    recipe: Annotated[Optional[str], _opt("Recipe name (see above) or path to a TOML file.", MODEL, "--recipe")] = None,
    teacher: Annotated[Optional[str], _cfg("teacher", MODEL)] = None,
    steps: Annotated[Optional[int], _cfg("steps", MODEL)] = None,
    conditioning_timestep: Annotated[Optional[int], _cfg("conditioning_timestep", MODEL)] = None,
    prompts: Annotated[Optional[str], _cfg("prompts", MODEL)] = None,
    data: Annotated[Optional[str], _cfg("data", MODEL)] = None,
    resolution: Annotated[Optional[int], _cfg("resolution", MODEL)] = None,
    allow_pickle: Annotated[Optional[bool], _cfg("allow_pickle", MODEL)] = None,
    guidance_scale: Annotated[Optional[float], _cfg("guidance_scale", OBJ)] = None,
    dm_weight: Annotated[Optional[float], _cfg("dm_weight", OBJ)] = None,
    gan_generator_weight: Annotated[Optional[float], _cfg("gan_generator_weight", OBJ)] = None,
    gan_discriminator_weight: Annotated[Optional[float], _cfg("gan_discriminator_weight", OBJ)] = None,
    diffusion_gan: Annotated[Optional[bool], _cfg("diffusion_gan", OBJ)] = None,
    diffusion_gan_max_timestep: Annotated[Optional[int], _cfg("diffusion_gan_max_timestep", OBJ)] = None,
    fake_updates_per_gen: Annotated[Optional[int], _cfg("fake_updates_per_gen", OBJ)] = None,
    method: Annotated[Optional[str], _cfg("method", METHOD)] = None,
    regression_weight: Annotated[Optional[float], _cfg("regression_weight", METHOD)] = None,
    regression_iterations: Annotated[Optional[int], _cfg("regression_iterations", METHOD)] = None,
    regression_distance: Annotated[Optional[str], _cfg("regression_distance", METHOD)] = None,
    pairs: Annotated[Optional[int], _cfg("pairs", METHOD)] = None,
    pair_steps: Annotated[Optional[int], _cfg("pair_steps", METHOD)] = None,
    pairs_dir: Annotated[Optional[str], _cfg("pairs_dir", METHOD)] = None,
    teacher_steps: Annotated[Optional[int], _cfg("teacher_steps", METHOD)] = None,
    iterations_per_round: Annotated[Optional[int], _cfg("iterations_per_round", METHOD)] = None,
    parameterization: Annotated[Optional[str], _cfg("parameterization", METHOD)] = None,
    loss_weight: Annotated[Optional[str], _cfg("loss_weight", METHOD)] = None,
    lora_rank: Annotated[Optional[int], _cfg("lora_rank", OPT)] = None,
    lora_alpha: Annotated[Optional[float], _cfg("lora_alpha", OPT)] = None,
    shared_base: Annotated[Optional[bool], _cfg("shared_base", OPT)] = None,
    fake_lora_rank: Annotated[Optional[int], _cfg("fake_lora_rank", OPT)] = None,
    iterations: Annotated[Optional[int], _cfg("iterations", OPT)] = None,
    batch_size: Annotated[Optional[int], _cfg("batch_size", OPT)] = None,
    lr: Annotated[Optional[float], _cfg("lr", OPT)] = None,
    fake_lr: Annotated[Optional[float], _cfg("fake_lr", OPT)] = None,
    warmup_steps: Annotated[Optional[int], _cfg("warmup_steps", OPT)] = None,
    lr_schedule: Annotated[Optional[str], _cfg("lr_schedule", OPT)] = None,
    max_grad_norm: Annotated[Optional[float], _cfg("max_grad_norm", OPT)] = None,
    mixed_precision: Annotated[Optional[str], _cfg("mixed_precision", OPT)] = None,
    gradient_checkpointing: Annotated[Optional[bool], _cfg("gradient_checkpointing", OPT)] = None,
    fsdp: Annotated[Optional[bool], _cfg("fsdp", OPT)] = None,
    cache_prompts: Annotated[Optional[bool], _cfg("cache_prompts", OPT)] = None,
    seed: Annotated[Optional[int], _cfg("seed", OPT)] = None,
    skip_nonfinite: Annotated[Optional[bool], _cfg("skip_nonfinite", OPT)] = None,
    out: Annotated[Optional[str], _cfg("out", OUT)] = None,
    init_from: Annotated[Optional[str], _cfg("init_from", OUT)] = None,
    resume: Annotated[
        bool,
        _opt(
            "Continue the run in --out from its newest complete checkpoint (raise --iterations to extend it).",
            OUT,
            "--resume",
        ),
    ] = False,
    overwrite: Annotated[bool, options.overwrite("Replace a run already in --out.")] = False,
    checkpoint_every: Annotated[Optional[int], _cfg("checkpoint_every", OUT)] = None,
    keep_checkpoints: Annotated[Optional[int], _cfg("keep_checkpoints", OUT)] = None,
    log_every: Annotated[Optional[int], _cfg("log_every", OUT)] = None,
    sample_every: Annotated[Optional[int], _cfg("sample_every", OUT)] = None,
    grid_size: Annotated[Optional[int], _cfg("grid_size", OUT)] = None,
    teacher_grid_steps: Annotated[Optional[int], _cfg("teacher_grid_steps", OUT)] = None,
    dry_run: Annotated[
        bool,
        _opt(
            "Print the resolved configuration and the estimated peak memory, load nothing heavy, and exit.",
            OUT,
            "--dry-run",
        ),
    ] = False,
    json_out: Annotated[bool, options.json_lines("Print one JSON summary line on stdout at the end.")] = False,
    quiet: Annotated[bool, options.quiet()] = False,
) -> None:
    overrides = {
        k: v for k, v in locals().items() if k not in ("recipe", "resume", "overwrite", "dry_run", "json_out", "quiet")
    }
    recipe, chosen = choose_recipe(recipe, teacher, steps, lora_rank, bool(prompts or data), resume)
    base = resumed_values(out, overwrite, recipe, init_from) if resume else None
    config = resolve_config(recipe, overrides, base)
    ui = RichUI(quiet=quiet)
    if chosen:
        ui.message(f"recipe {chosen}: the reference's values for an SDXL teacher (--recipe to choose another)")
    if note := second_stage_note(recipe, config):
        ui.message(note)
    if dry_run:
        return _dry_run(config, json_out)
    quiet_library_bars()

    if config.method == "progressive":
        return _progressive(config, ui, overwrite, resume, json_out)

    # Imported here so that `dmd --help` and usage errors stay instant (torch is slow to import).
    from dmdcli.train.distill import Distillation
    from dmdcli.train.stop import RunFinished, WriteFailed

    try:
        run = Distillation(config, ui, overwrite=overwrite, resume=resume)
    except RunFinished as done:
        from accelerate import PartialState

        return ui.message(str(done)) if PartialState().is_main_process else None  # one process says so
    try:
        summary = run.run()
    except OSError as e:
        raise WriteFailed(e, run.out) from e
    if not run.accelerator.is_main_process:  # under torchrun / accelerate launch, one process reports
        return
    ui.message(f"student: {summary['student']}  (samples: {summary['grid']})")
    family = named_family(config.teacher)  # a built-in teacher: a prompt it knows, and its own benchmark
    prompt = family.example_prompt if family else "..."
    fid = "" if family and family.eval_set else " --fid DIR"
    ui.message(
        f"next: dmd sample --model {summary['out']} --prompt \"{prompt}\"  |  "
        f"dmd eval --model {summary['out']}{fid}  |  dmd export --model {summary['out']} --format diffusers"
    )
    if json_out:
        print_json(summary)


def _progressive(config, ui, overwrite: bool, resume: bool, json_out: bool) -> None:
    if resume:
        raise UsageError("--method progressive has no --resume; each round's student is in RUN/rounds/")
    from dmdcli.train.progressive import ProgressiveDistillation

    summary = ProgressiveDistillation(config, ui, overwrite=overwrite).run()
    ui.message(f"student: {summary['student']} ({config.steps} DDIM steps; samples: {summary['grid']})")
    ui.message(
        f"next: dmd sample --model {summary['out']} --prompt \"...\"  |  "
        f"dmd export --model {summary['out']} --format diffusers"
    )
    if json_out:
        print_json(summary)


def _dry_run(config, json_out: bool) -> None:
    """The resolved configuration (TOML) and the memory estimate, from config files alone."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dmd-dry-run-") as scratch:
        _estimate(config, json_out, Path(scratch))


def _estimate(config, json_out: bool, scratch: Path) -> None:
    import tomli_w
    from rich.table import Table

    from dmdcli.cli.ui import stderr_console
    from dmdcli.train.memory import plan_memory

    console = stderr_console()
    plan = plan_memory(config, scratch, lambda note: console.print(note, markup=False))
    console.print(tomli_w.dumps({k: v for k, v in config.to_dict().items() if v is not None}), markup=False)
    table = Table(
        title=f"estimated memory per process: {plan.spec.layout} at {plan.resolution}px, batch {config.batch_size}, "
        f"{'bf16' if plan.bf16 else 'fp32'}" + (", sharded with FSDP" if config.fsdp else "")
    )
    table.add_column("what")
    for n in plan.estimates:
        table.add_column(f"GiB, {n} processes" if config.fsdp else "GiB", justify="right")
    rows = [estimate.rows() for estimate in plan.estimates.values()]
    for i, (name, _) in enumerate(rows[0]):
        table.add_row(name, *(f"{r[i][1]:.2f}" for r in rows))
    console.print(table)
    for note in plan.notes:
        console.print(note, markup=False)
    if json_out:
        print_json(plan.summary(config))
