"""`dmd distill`: turn a diffusers teacher into a few-step student with DMD2."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dmdcli.cli.common import handle_errors, print_json, quiet_library_bars
from dmdcli.cli.ui import RichUI
from dmdcli.errors import UsageError
from dmdcli.models.teacher import TEACHER_ALIASES, teacher_layout
from dmdcli.train.config import layout_recipe, list_recipes, recipe_continues, resolve_config, run_config_values

HELP = f"""Distill a teacher into a 1- to 4-step student with DMD2.

Options override the recipe's keys of the same name; the resolved configuration is written to
OUT/config.toml. Built-in recipes: {", ".join(list_recipes()) or "none"}.

With no --teacher and no --recipe (or with --teacher shapes) the recipe is `shapes`: the
built-in teacher, its prompts and images, a 4-step student in about 5 CPU minutes. An SDXL
teacher without --recipe gets the reference's SDXL recipe (sdxl-1step, sdxl-4step, or with
--lora-rank sdxl-4step-lora); the defaults listed below are those of an SD teacher without one.

Example: dmd distill --recipe sdxl-4step-lora --prompts prompts.txt --data images/ --out runs/sdxl4

Other methods: --method dmd (DMD v1; the teacher's regression pairs are made on first use and
cached, see --pairs), --method progressive (rounds halving --teacher-steps down to --steps).
"""

FSDP_PROCESS_COUNTS = (2, 4, 8)
ALIASES = ", ".join(f"{k} = {v}" for k, v in TEACHER_ALIASES.items())
MODEL, OBJ, OPT, OUT = "Teacher and data", "DMD2 objective", "Optimization", "Outputs"
METHOD = "Other methods: DMD (v1) regression, progressive distillation"


def _opt(help: str, panel: str, *names: str):
    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=False)


@handle_errors
def distill(
    recipe: Annotated[Optional[str], _opt("Recipe name (see above) or path to a TOML file.", MODEL, "--recipe")] = None,
    teacher: Annotated[
        Optional[str], _opt(f"Diffusers pipeline folder or hub id; aliases: {ALIASES}.", MODEL, "--teacher")
    ] = None,
    steps: Annotated[Optional[int], _opt("Student sampling steps (default 1).", MODEL, "--steps")] = None,
    conditioning_timestep: Annotated[
        Optional[int], _opt("Timestep a 1-step student is told (399 SDXL, 999 SD).", MODEL, "--conditioning-timestep")
    ] = None,
    prompts: Annotated[
        Optional[str], _opt("Prompts file: one a line, or JSON lines with prompt/text.", MODEL, "--prompts")
    ] = None,
    data: Annotated[
        Optional[str],
        _opt(
            "Folder of captioned real images for the GAN term (.txt beside each, or metadata.jsonl).", MODEL, "--data"
        ),
    ] = None,
    resolution: Annotated[
        Optional[int], _opt("Training resolution in pixels (default: the teacher's).", MODEL, "--resolution")
    ] = None,
    allow_pickle: Annotated[
        Optional[bool], _opt("Allow teacher weights stored as pickle files.", MODEL, "--allow-pickle")
    ] = None,
    guidance_scale: Annotated[
        Optional[float],
        _opt("Real-score CFG scale s: uncond + s·(cond − uncond) (default 1.75).", OBJ, "--guidance-scale"),
    ] = None,
    dm_weight: Annotated[
        Optional[float], _opt("Distribution-matching loss weight (default 1).", OBJ, "--dm-weight")
    ] = None,
    gan_generator_weight: Annotated[
        Optional[float], _opt("GAN generator loss weight (default 1e-3).", OBJ, "--gan-generator-weight")
    ] = None,
    gan_discriminator_weight: Annotated[
        Optional[float], _opt("GAN discriminator loss weight (default 1e-2).", OBJ, "--gan-discriminator-weight")
    ] = None,
    diffusion_gan: Annotated[
        Optional[bool], _opt("Noise latents before the classifier.", OBJ, "--diffusion-gan/--no-diffusion-gan")
    ] = None,
    diffusion_gan_max_timestep: Annotated[
        Optional[int],
        _opt("Upper bound of the diffusion-GAN timesteps (default 1000).", OBJ, "--diffusion-gan-max-timestep"),
    ] = None,
    fake_updates_per_gen: Annotated[
        Optional[int], _opt("Fake score updates per generator update (default 10).", OBJ, "--fake-updates-per-gen")
    ] = None,
    method: Annotated[
        Optional[str],
        _opt(
            "dmd2 (default) | dmd: DMD v1, distribution matching + regression on teacher noise→image pairs (λ 0.25, fake score updated every iteration, no GAN even with --data) | progressive: Progressive Distillation, rounds that halve the steps from --teacher-steps to --steps.",
            METHOD,
            "--method",
        ),
    ] = None,
    regression_weight: Annotated[
        Optional[float],
        _opt(
            "Regression loss weight λ (default 0; 0.25 with --method dmd). Also usable with dmd2 as a warm-up (--regression-iterations).",
            METHOD,
            "--regression-weight",
        ),
    ] = None,
    regression_iterations: Annotated[
        Optional[int],
        _opt("Regression only for the first K iterations (default 0: always).", METHOD, "--regression-iterations"),
    ] = None,
    regression_distance: Annotated[
        Optional[str],
        _opt(
            "auto (LPIPS if the lpips package and its weights load, else pseudo_huber) | lpips | pseudo_huber | mse. The one that ran is in config.toml and metrics.jsonl.",
            METHOD,
            "--regression-distance",
        ),
    ] = None,
    pairs: Annotated[
        Optional[int],
        _opt(
            "Regression pairs: made on first use by the teacher's deterministic DDIM with CFG, cached and reused (default 64).",
            METHOD,
            "--pairs",
        ),
    ] = None,
    pair_steps: Annotated[
        Optional[int], _opt("DDIM steps of the teacher per regression pair (default 25).", METHOD, "--pair-steps")
    ] = None,
    pairs_dir: Annotated[
        Optional[str],
        _opt("Regression pair cache (default $DMD_CACHE/pairs, else ~/.cache/dmd/pairs).", METHOD, "--pairs-dir"),
    ] = None,
    teacher_steps: Annotated[
        Optional[int],
        _opt(
            "Progressive: DDIM steps of the first round's teacher, --steps × a power of two (default 64).",
            METHOD,
            "--teacher-steps",
        ),
    ] = None,
    iterations_per_round: Annotated[
        Optional[int],
        _opt("Progressive: iterations of each halving round (default 1000).", METHOD, "--iterations-per-round"),
    ] = None,
    parameterization: Annotated[
        Optional[str],
        _opt(
            "Progressive: the student predicts x, v or epsilon (default: the teacher's own).",
            METHOD,
            "--parameterization",
        ),
    ] = None,
    loss_weight: Annotated[
        Optional[str],
        _opt("Progressive: truncated_snr (max(SNR, 1), default) | snr_plus_one.", METHOD, "--loss-weight"),
    ] = None,
    lora_rank: Annotated[
        Optional[int], _opt("Train the generator as a LoRA of this rank (default 0: full).", OPT, "--lora-rank")
    ] = None,
    lora_alpha: Annotated[Optional[float], _opt("LoRA alpha (default: the rank).", OPT, "--lora-alpha")] = None,
    shared_base: Annotated[
        Optional[bool],
        _opt(
            "With LoRA: generator and fake score as two adapters on one frozen copy of the teacher (default), or the reference layout with a full fake score.",
            OPT,
            "--shared-base/--no-shared-base",
        ),
    ] = None,
    fake_lora_rank: Annotated[
        Optional[int],
        _opt("Rank of the fake score's adapter on the shared base (default: --lora-rank).", OPT, "--fake-lora-rank"),
    ] = None,
    iterations: Annotated[Optional[int], _opt("Training iterations (default 1000).", OPT, "--iterations")] = None,
    batch_size: Annotated[Optional[int], _opt("Per-process batch size (default 2).", OPT, "--batch-size")] = None,
    lr: Annotated[Optional[float], _opt("Generator learning rate (default 1e-5).", OPT, "--lr")] = None,
    fake_lr: Annotated[Optional[float], _opt("Fake score learning rate (default: --lr).", OPT, "--fake-lr")] = None,
    warmup_steps: Annotated[
        Optional[int], _opt("Linear LR warm-up iterations (default 500).", OPT, "--warmup-steps")
    ] = None,
    lr_schedule: Annotated[
        Optional[str],
        _opt(
            "After the warm-up: constant (default, the reference) | cosine | linear, which decay to 0 at the last iteration.",
            OPT,
            "--lr-schedule",
        ),
    ] = None,
    max_grad_norm: Annotated[
        Optional[float], _opt("Gradient clipping norm (default 10).", OPT, "--max-grad-norm")
    ] = None,
    mixed_precision: Annotated[
        Optional[str], _opt("bf16 | no | auto (bf16 on CUDA, fp32 on CPU).", OPT, "--mixed-precision")
    ] = None,
    gradient_checkpointing: Annotated[
        Optional[bool],
        _opt("Recompute activations to save memory.", OPT, "--gradient-checkpointing/--no-gradient-checkpointing"),
    ] = None,
    fsdp: Annotated[
        Optional[bool],
        _opt(
            "Shard the generator, fake score and teacher across processes with PyTorch FSDP2 (full-weight runs under torchrun / accelerate launch).",
            OPT,
            "--fsdp/--no-fsdp",
        ),
    ] = None,
    cache_prompts: Annotated[
        Optional[bool],
        _opt(
            "Encode every prompt once at start-up and keep the conditionings on the CPU, so the text encoders leave the GPU (default on; off or over 8 GiB: encode on the fly).",
            OPT,
            "--cache-prompts/--no-cache-prompts",
        ),
    ] = None,
    seed: Annotated[Optional[int], _opt("Random seed (default 0).", OPT, "--seed")] = None,
    skip_nonfinite: Annotated[
        Optional[bool],
        _opt(
            "Skip and count updates with a non-finite loss or gradient instead of stopping.",
            OPT,
            "--skip-nonfinite/--no-skip-nonfinite",
        ),
    ] = None,
    out: Annotated[Optional[str], _opt("Run folder (default runs/<teacher>-<steps>step).", OUT, "--out")] = None,
    init_from: Annotated[
        Optional[str],
        _opt(
            "Start the generator, fake score and GAN head from another run (its newest checkpoint) or RUN/checkpoints/iter-N; optimizers and iterations start anew (second stages: sd15-1step after sd15-1step-stage1).",
            OUT,
            "--init-from",
        ),
    ] = None,
    resume: Annotated[
        bool,
        _opt(
            "Continue the run in --out from its newest complete checkpoint (raise --iterations to extend it).",
            OUT,
            "--resume",
        ),
    ] = False,
    overwrite: Annotated[bool, _opt("Replace a run already in --out.", OUT, "--overwrite")] = False,
    checkpoint_every: Annotated[
        Optional[int],
        _opt(
            "Checkpoint every N iterations (default 500; also at the end and on Ctrl-C/SIGTERM).",
            OUT,
            "--checkpoint-every",
        ),
    ] = None,
    keep_checkpoints: Annotated[
        Optional[int], _opt("Newest checkpoints kept (default 2).", OUT, "--keep-checkpoints")
    ] = None,
    log_every: Annotated[
        Optional[int], _opt("Write metrics every N iterations (default 10).", OUT, "--log-every")
    ] = None,
    sample_every: Annotated[
        Optional[int], _opt("Write a sample grid every N iterations (default 250; 0: end only).", OUT, "--sample-every")
    ] = None,
    grid_size: Annotated[
        Optional[int], _opt("Images per sample grid: grid-size/2 prompts × 2 seeds (default 4).", OUT, "--grid-size")
    ] = None,
    teacher_grid_steps: Annotated[
        Optional[int],
        _opt(
            "DDIM steps of the teacher's reference grid for the collapse watch (default 25; 0: off).",
            OUT,
            "--teacher-grid-steps",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        _opt(
            "Print the resolved configuration and the estimated peak memory, load nothing heavy, and exit.",
            OUT,
            "--dry-run",
        ),
    ] = False,
    json_out: Annotated[bool, _opt("Print one JSON summary line on stdout at the end.", OUT, "--json")] = False,
    quiet: Annotated[bool, _opt("No progress or messages on stderr.", OUT, "--quiet", "-q")] = False,
) -> None:
    overrides = {
        k: v for k, v in locals().items() if k not in ("recipe", "resume", "overwrite", "dry_run", "json_out", "quiet")
    }
    base = None
    if recipe is None and teacher in (None, "shapes") and not resume:
        if teacher is None and (prompts or data):  # most likely a forgotten --teacher
            raise UsageError(
                "--prompts/--data without --teacher: pass --teacher (a diffusers folder, hub id, or "
                f"{', '.join(TEACHER_ALIASES)}), or --recipe shapes to use them with the built-in teacher"
            )
        recipe = "shapes"  # `dmd distill` alone distills the built-in teacher
    chosen = None
    if recipe is None and teacher is not None and not resume:
        recipe = chosen = layout_recipe(teacher_layout(teacher), steps, lora_rank)
    if resume:
        if overwrite or recipe or init_from:
            raise UsageError(
                "--resume continues the run in --out with its own config.toml; drop --overwrite/--recipe/--init-from"
            )
        if out is None:
            raise UsageError("--resume needs --out RUN, the run folder to continue")
        base = run_config_values(Path(out))
    config = resolve_config(recipe, overrides, base)
    ui = RichUI(quiet=quiet)
    if chosen:
        ui.message(f"recipe {chosen}: the reference's values for an SDXL teacher (--recipe to choose another)")
    if recipe and not resume and config.init_from is None and (first := recipe_continues(recipe)):
        ui.message(
            f"note: recipe {recipe} is the second stage of {first}; without --init-from RUN (a {first} run) "
            "it starts from the teacher"
        )
    if dry_run:
        return _dry_run(config, json_out)
    quiet_library_bars()

    if config.method == "progressive":
        return _progressive(config, ui, overwrite, resume, json_out)

    # Imported here so that `dmd --help` and usage errors stay instant (torch is slow to import).
    from dmdcli.train.distill import Distillation, RunFinished, WriteFailed

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
    if config.teacher == "shapes":  # the built-in world: a prompt it knows, and its own benchmark
        prompt, fid = "a large red circle at the top left on a white background", ""
    else:
        prompt, fid = "...", " --fid DIR"
    ui.message(
        f"next: dmd sample --model {summary['out']} --prompt \"{prompt}\"  |  dmd eval --model {summary['out']}{fid}  |  "
        f"dmd export --model {summary['out']} --format diffusers"
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
        f"next: dmd sample --model {summary['out']} --prompt \"...\"  |  dmd export --model {summary['out']} --format diffusers"
    )
    if json_out:
        print_json(summary)


def _dry_run(config, json_out: bool) -> None:
    """The resolved configuration (TOML) and the memory estimate, from config files alone."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dmd-dry-run-") as scratch:
        _estimate(config, json_out, Path(scratch))


def _estimate(config, json_out: bool, scratch: Path) -> None:
    import dataclasses

    import tomli_w
    import torch
    from rich.table import Table

    from dmdcli.cli.ui import stderr_console
    from dmdcli.errors import DmdError
    from dmdcli.models.architectures import bundled_architecture, write_config_only_pipeline
    from dmdcli.models.teacher import inspect_teacher
    from dmdcli.train.memory import estimate_memory

    console = stderr_console()
    try:
        spec = inspect_teacher(config.teacher)
    except DmdError:  # offline: SD1.5's and SDXL's public configs ship with dmd
        arch = bundled_architecture(config.teacher)
        if arch is None:
            raise
        spec = inspect_teacher(str(write_config_only_pipeline(scratch, arch)))
        console.print(
            f"note: could not read the config files of {config.teacher} (offline?); estimating with the public "
            f"{arch} architecture, whose configs ship with dmd",
            markup=False,
        )
    resolution = spec.training_resolution(config.resolution)
    bf16 = config.precision() == "bf16"
    # bf16 is CUDA's layout, also when a CPU is asked for it (--mixed-precision bf16 to estimate a GPU run).
    device_type = "cuda" if bf16 or torch.cuda.is_available() else "cpu"
    # Sharded, memory per process depends on how many there are: a column for each of a few.
    counts = FSDP_PROCESS_COUNTS if config.fsdp else (1,)
    estimates = {
        n: estimate_memory(spec, config, resolution, bf16, processes=n, device_type=device_type) for n in counts
    }
    console.print(tomli_w.dumps({k: v for k, v in config.to_dict().items() if v is not None}), markup=False)
    table = Table(
        title=f"estimated memory per process: {spec.layout} at {resolution}px, batch {config.batch_size}, "
        f"{'bf16' if bf16 else 'fp32'}" + (", sharded with FSDP" if config.fsdp else "")
    )
    table.add_column("what")
    for n in counts:
        table.add_column(f"GiB, {n} processes" if config.fsdp else "GiB", justify="right")
    rows = [estimate.rows() for estimate in estimates.values()]
    for i, (name, _) in enumerate(rows[0]):
        table.add_row(name, *(f"{r[i][1]:.2f}" for r in rows))
    console.print(table)
    if config.mixed_precision == "auto" and not bf16:
        console.print(
            "note: no CUDA here, so this is a run on this machine, in fp32; --mixed-precision bf16 estimates a "
            "GPU run (bf16, what auto picks on CUDA)",
            markup=False,
        )
    if config.method == "progressive":
        console.print(
            "note: this estimate is for DMD2's three networks; --method progressive holds two UNets (teacher and "
            "student) and one optimizer, so it needs less",
            markup=False,
        )
    if json_out:
        summary = {
            "config": config.to_dict(),
            "resolution": resolution,
            "memory_gib": dataclasses.asdict(estimates[counts[0]]),
        }
        if config.fsdp:
            summary["memory_gib_by_processes"] = {str(n): dataclasses.asdict(e) for n, e in estimates.items()}
        print_json(summary)
