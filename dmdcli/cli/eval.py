"""`dmd eval`: FID, KID, patch FID and CLIP score of models on a COCO protocol or a captioned folder."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer

from dmdcli.cli import options
from dmdcli.cli.common import handle_errors, print_json, quiet_library_bars
from dmdcli.cli.ui import RichUI
from dmdcli.models.families import default_eval_set, eval_sets

HELP = """Score models with FID, KID, patch FID and CLIP score on a prompt/reference set.

Each --model (anything dmd sample accepts: run folder, exported pipeline, diffusers pipeline) draws one image per
prompt of the set, image i with seed SEED + i; the images are scored against the set's reference images. Reference
statistics are computed once and cached, so another model on the same set only generates and scores.

Sets (--fid): coco30k (COCO-2014 val, 256²) or coco10k (512²) with --coco-root DIR, or a folder of captioned images
(the layout dmd distill --data reads).

Writes OUT/eval-<set>-<N>.json (OUT: the run folder, else eval/<model>), a grid of samples beside it and the images in
OUT/eval-<set>-<N>/.

Example: dmd eval --model runs/sd15 --model sd15 --fid coco30k --coco-root coco/ --num-samples 5000 --json
"""

MODEL, SET, SCORING = "Models", "Prompt/reference set", "Scoring"


def _opt(help: str, panel: str, *names: str, **kwargs):
    return typer.Option(*names, help=help, rich_help_panel=panel, **kwargs)


@handle_errors
def eval_command(
    model: Annotated[list[str], options.model(f"{options.ANY_MODEL}; repeat to compare.", MODEL)],
    fid: Annotated[
        Optional[str],
        _opt(
            "coco30k, coco10k (with --coco-root), a captioned image folder, or "
            + ", ".join(f"{s.name} ({s.help})" for s in eval_sets())
            + ".",
            SET,
            "--fid",
            show_default=False,
        ),
    ] = None,
    coco_root: Annotated[
        Optional[Path],
        _opt(
            "COCO-2014 folder holding val2014/ and annotations/captions_val2014.json.",
            SET,
            "--coco-root",
            show_default=False,
        ),
    ] = None,
    num_samples: Annotated[
        Optional[int],
        _opt(
            "Score the first N (at least 2) of the set (default: all of it).", SET, "--num-samples", show_default=False
        ),
    ] = None,
    eval_resolution: Annotated[
        Optional[int],
        _opt(
            "Side images are cropped and resized to before the feature network (default: 256 coco30k and folders, "
            "512 coco10k).",
            SET,
            "--eval-resolution",
            min=1,
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, options.seed("Base seed: image i of the set uses SEED + i.", MODEL)] = 0,
    steps: Annotated[
        Optional[int],
        options.steps("Sampling steps of every model (default: the student's; a pipeline's own default).", MODEL),
    ] = None,
    guidance_scale: Annotated[
        Optional[float], options.guidance_scale("CFG scale of plain pipelines (students sample without CFG).", MODEL)
    ] = None,
    resolution: Annotated[
        Optional[int],
        options.resolution("Square size of the generated images (default: the student's; the pipeline's).", MODEL),
    ] = None,
    batch_size: Annotated[
        int, options.batch_size("Images per generation batch (images never depend on it).", MODEL)
    ] = 4,
    device: Annotated[str, options.device(f"{options.DEVICES} (generation and features).", MODEL)] = "auto",
    dtype: Annotated[str, options.dtype(panel=MODEL)] = "auto",
    allow_pickle: Annotated[bool, options.allow_pickle(panel=MODEL)] = False,
    features: Annotated[
        Optional[Path],
        _opt(
            "TorchScript feature extractor: float [B,3,H,W] in 0..255 → [B,D], instead of Inception.",
            SCORING,
            "--features",
            show_default=False,
        ),
    ] = None,
    inception: Annotated[
        Optional[Path],
        _opt(
            "clean-fid's inception-2015-12-05.pt (or its folder) from disk; default: downloaded on first use.",
            SCORING,
            "--inception",
            show_default=False,
        ),
    ] = None,
    clip_model: Annotated[
        Optional[str],
        _opt(
            "transformers CLIP model (folder or hub id) for the CLIP score; none without it.",
            SCORING,
            "--clip-model",
            show_default=False,
        ),
    ] = None,
    cache_dir: Annotated[
        Optional[Path],
        _opt(
            "Reference statistics cache (default: $DMD_CACHE/eval, else ~/.cache/dmd/eval).",
            SCORING,
            "--cache-dir",
            show_default=False,
        ),
    ] = None,
    num_workers: Annotated[
        int, _opt("Processes that read and resize images for the feature network.", SCORING, "--num-workers", min=0)
    ] = 0,
    out: Annotated[
        Optional[Path],
        _opt(
            "Folder for report, grid and images (default: the run folder, else eval/<model>; several models: "
            "OUT/<model>).",
            options.OUTPUTS,
            "--out",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[bool, options.overwrite("Replace an existing report and its images.")] = False,
    json_out: Annotated[bool, options.json_lines("Print each report as one JSON line on stdout.")] = False,
    quiet: Annotated[bool, options.quiet("No progress, messages or table on stderr.")] = False,
) -> None:
    from dmdcli.errors import UsageError
    from dmdcli.eval.report import render_table
    from dmdcli.eval.run import EvalOptions, evaluate, open_benchmark, plan_targets
    from dmdcli.files import check_can_make
    from dmdcli.models.samplers import STUDENT_TAKES_NO_CFG, pick_device, pick_dtype
    from dmdcli.models.student import find_model

    ui = RichUI(quiet=quiet)
    quiet_library_bars()
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    if cache_dir is not None:
        check_can_make(cache_dir, "--cache-dir")
    eval_options = EvalOptions(
        coco_root=coco_root,
        num_samples=num_samples,
        eval_resolution=eval_resolution,
        features=features,
        inception=inception,
        clip_model=clip_model,
        cache_dir=cache_dir,
        device=torch_device,
        num_workers=num_workers,
        allow_pickle=allow_pickle,
    )
    sources = [find_model(name) for name in model]
    if fid is None:
        fid = _default_fid(sources)
    benchmark = open_benchmark(fid, eval_options)
    if guidance_scale is not None and all(source.is_student for source in sources):
        raise UsageError(STUDENT_TAKES_NO_CFG)
    targets = plan_targets(
        sources,
        benchmark,
        out,
        seed=seed,
        steps=steps,
        guidance_scale=guidance_scale,
        resolution=resolution,
        overwrite=overwrite,
    )
    with _stages(ui, benchmark.label) as progress:  # feature networks, CLIP and the reference statistics:
        benchmark.prepare(progress)  # a bad one fails here, before any model loads
    ui.message(f"set: {benchmark.describe()}")
    if guidance_scale is not None and any(source.is_student for source in sources):
        ui.message(
            f"note: --guidance-scale {guidance_scale:g} applies to the plain pipelines only; students sample without "
            "CFG"
        )

    reports = []
    for target in targets:
        with _stages(ui, target.source.name) as progress:
            report = evaluate(
                target,
                benchmark,
                device=torch_device,
                dtype=torch_dtype,
                steps=steps,
                guidance_scale=guidance_scale,
                batch_size=batch_size,
                seed=seed,
                allow_pickle=allow_pickle,
                progress=progress,
                message=ui.message,
            )
        cached = [kind for kind, entry in report.get("reference_stats", {}).items() if entry.get("cached")]
        ui.message(
            f"wrote {target.report}"
            + (f" (reference statistics from the cache: {', '.join(cached)})" if cached else "")
        )
        if json_out:
            print_json(report)
        reports.append(report)
    if not quiet:
        ui.console.print(render_table(reports))


def _default_fid(sources) -> str:
    """--fid left out: the evaluation set of the built-in teacher every model is (or was distilled from)."""
    from dmdcli.errors import UsageError

    found = {default_eval_set(source.info.get("teacher") if source.info else source.path) for source in sources}
    if len(found) != 1 or None in found:
        raise UsageError(
            "--fid is required: coco30k or coco10k (with --coco-root), a captioned image folder, or "
            + ", ".join(s.name for s in eval_sets())
        )
    return found.pop().name


@contextlib.contextmanager
def _stages(ui: RichUI, name: str) -> Iterator:
    """One progress bar per stage (generating, reference features, ...), as score() reports them."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=ui.console,
        disable=ui.quiet,
    )
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(f"{name}: {stage}", total=total)
        progress.update(tasks[stage], completed=done, total=total)

    with progress:
        yield update
