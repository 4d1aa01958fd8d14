"""`dmd distill`: turn a diffusers teacher into a few-step student with DMD2."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from dmdcli.cli import options
from dmdcli.cli.common import handle_errors, print_json, quiet_library_bars
from dmdcli.cli.ui import RichUI
from dmdcli.errors import UsageError
from dmdcli.models.families import default_family, named_family, teacher_aliases
from dmdcli.train.config import COMMAND_LINE, FIELD_TYPES, SECTION_OF, option_help
from dmdcli.train.recipes import choose_recipe, list_recipes, resolve_config, second_stage_note
from dmdcli.train.resume import resumed_values

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
FIRST, OUT = SECTION_OF["teacher"], options.OUTPUTS  # the panels of the command's own options (recipe; the rest)


def _opt(help: str, panel: str, *names: str):
    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=False)


# Extra words for an option's help that only the command line knows.
CLI_NOTES = {"teacher": f" Aliases: {ALIASES}."}
PLAIN_FLAGS = {"allow_pickle"}  # on/off options that are a flag alone (no --no-...)


def _config_option(name: str) -> inspect.Parameter:
    """The option that sets config field `name`, in its section's panel, with the field's help
    and default (DistillConfig); None when not given, so the recipe's value stands."""
    flag = "--" + name.replace("_", "-")
    if FIELD_TYPES[name] is bool and name not in PLAIN_FLAGS:
        flag = f"{flag}/--no-{name.replace('_', '-')}"
    option = _opt(option_help(name) + CLI_NOTES.get(name, ""), SECTION_OF[name], flag)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[FIELD_TYPES[name]], option]
    )


def _with_config_options(command):
    """`command` with one option per config field (DistillConfig's COMMAND_LINE fields, in their
    sections' order) after its first parameter: Typer reads a command's options from its signature, so the
    config's fields, not a list written out here, are the options."""
    own = list(inspect.signature(command, eval_str=True).parameters.values())[:-1]  # all but **overrides
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
    config = [_config_option(name) for name in COMMAND_LINE]
    command.__signature__ = inspect.Signature([own[0], *config, *own[1:]])
    return command


@_with_config_options
@handle_errors
def distill(
    recipe: Annotated[Optional[str], _opt("Recipe name (see above) or path to a TOML file.", FIRST, "--recipe")] = None,
    resume: Annotated[
        bool,
        _opt(
            "Continue the run in --out from its newest complete checkpoint (raise --iterations to extend it).",
            OUT,
            "--resume",
        ),
    ] = False,
    overwrite: Annotated[bool, options.overwrite("Replace a run already in --out.")] = False,
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
    **overrides: Any,
) -> None:
    """`overrides`: the config options (None where not given), by field name."""
    if overrides["student_timesteps"] and overrides["steps"] is None:  # the ladder says how many steps
        overrides["steps"] = overrides["student_timesteps"].count(",") + 1
    recipe, announce = choose_recipe(
        recipe,
        overrides["teacher"],
        overrides["steps"],
        overrides["lora_rank"],
        bool(overrides["prompts"] or overrides["data"]),
        resume,
    )
    base = resumed_values(overrides["out"], overwrite, recipe, overrides["init_from"]) if resume else None
    config = resolve_config(recipe, overrides, base)
    ui = RichUI(quiet=quiet)
    if announce:
        ui.message(announce)
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

    config.accumulation_steps(1)  # a global batch that no number of processes can make is refused here too
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
    # Gradient accumulation runs one micro-batch at a time (the others on the host): its memory is one's.
    batch = f"batch {config.batch_size}"
    if config.global_batch:
        batch += f" (global batch {config.global_batch})"
    elif config.gradient_accumulation_steps > 1:
        batch += f" × {config.gradient_accumulation_steps} accumulated"
    table = Table(
        title=f"estimated memory per process: {plan.spec.layout} at {plan.resolution}px, {batch}, "
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
