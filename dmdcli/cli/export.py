"""`dmd export`: a student as a diffusers pipeline, a LoRA (diffusers or kohya keys) or a UNet file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dmdcli.cli import options
from dmdcli.cli.common import handle_errors, print_json, quiet_library_bars
from dmdcli.cli.ui import RichUI

HELP = """Export a distilled student for diffusers, ComfyUI and Automatic1111.

Formats: diffusers (a complete pipeline folder with an LCMScheduler set for the student), lora (diffusers LoRA file
for the teacher pipeline), kohya (lora_unet_… keys with per-module alpha), unet (the student UNet's state dict, LoRA
fused). Prints a diffusers snippet on stderr.

Example: dmd export --model runs/sdxl4 --format diffusers --out sdxl4-pipeline
"""


def _opt(help: str, *names: str, **kwargs):
    return typer.Option(*names, help=help, **kwargs)


@handle_errors
def export(
    model: Annotated[
        str,
        options.model(
            "Run folder of dmd distill (or its student.safetensors, or one of its checkpoints, RUN/checkpoints/iter-N)."
        ),
    ],
    fmt: Annotated[str, _opt("diffusers, lora, kohya or unet.", "--format")] = "diffusers",
    out: Annotated[
        Optional[Path],
        _opt(
            "Where to write (default: MODEL/export/diffusers, a folder; MODEL/export/<format>.safetensors for lora, "
            "kohya and unet).",
            "--out",
            show_default=False,
        ),
    ] = None,
    dtype: Annotated[str, options.dtype("Weights' precision: fp32, fp16 or bf16.")] = "fp32",
    allow_pickle: Annotated[bool, options.allow_pickle("Allow teacher weights stored as pickle files.")] = False,
    overwrite: Annotated[bool, options.overwrite("Replace what is already at --out.", panel=None)] = False,
    json_out: Annotated[
        bool, options.json_lines("Print one JSON line on stdout saying what was written.", panel=None)
    ] = False,
    quiet: Annotated[bool, options.quiet("No messages on stderr.", panel=None)] = False,
) -> None:
    from dmdcli.export import (
        check_dtype,
        check_format,
        check_kind,
        check_out,
        default_out,
        snippet,
        student_source,
    )
    from dmdcli.export import (
        export as run_export,
    )

    ui = RichUI(quiet=quiet)
    quiet_library_bars()
    check_format(fmt)
    torch_dtype = check_dtype(dtype)
    source = student_source(model)
    check_kind(source, fmt)
    out = out or default_out(source, fmt)
    check_out(out, fmt, overwrite)
    info = source.info
    ui.message(
        f"student: {source.name} ({info['layout']}, {info['kind']}, {info['steps']} step(s), t = "
        f"{info['timesteps']}); writing {fmt} to {out}"
    )
    with ui.working(f"exporting {fmt}"):
        record = run_export(source, fmt, out, torch_dtype, allow_pickle)
    if not quiet:  # unwrapped, so that it can be copied as it is
        ui.console.print(
            f"wrote {out}. In diffusers:\n\n{snippet(fmt, out, info, dtype, record)}\n",
            markup=False,
            soft_wrap=True,
        )
    if json_out:
        print_json(record)
