"""`dmd sample`: images from a student (or any diffusers pipeline), one JSON line per image."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dmdcli.cli import options
from dmdcli.cli.common import handle_errors, print_json, quiet_library_bars
from dmdcli.cli.ui import RichUI

HELP = """Generate images from a distilled student, an exported pipeline, or any diffusers pipeline.

A student runs its own few steps (one UNet call each, no guidance); a plain pipeline runs with its own scheduler,
--steps and --guidance-scale.

Seeds: image i of prompt p uses SEED + p·N + i (N = --num-images-per-prompt); with one prompt and one image, --seed S
draws what diffusers draws with generator=torch.Generator("cpu").manual_seed(S).

Example: cat prompts.txt | dmd sample --model runs/sdxl4 --prompts - --out images/ --json
"""


MODEL, WHAT = "Model", "What to draw"


def _opt(help: str, panel: str, *names: str, **kwargs):
    return typer.Option(*names, help=help, rich_help_panel=panel, **kwargs)


@handle_errors
def sample(
    model: Annotated[str, options.model(f"{options.ANY_MODEL}.", MODEL)],
    prompt: Annotated[
        Optional[list[str]],
        _opt('A prompt (repeatable; "" is the empty, unconditional prompt).', WHAT, "--prompt", show_default=False),
    ] = None,
    prompts: Annotated[
        Optional[str],
        _opt(
            "Prompts file, one a line (or JSON lines); - reads standard input.", WHAT, "--prompts", show_default=False
        ),
    ] = None,
    num_images_per_prompt: Annotated[int, _opt("Images per prompt.", WHAT, "--num-images-per-prompt", min=1)] = 1,
    seed: Annotated[int, options.seed("Base seed: image i of prompt p uses SEED + p·N + i.", WHAT)] = 0,
    steps: Annotated[
        Optional[int], options.steps("Sampling steps (default: the student's; a pipeline's own default).", WHAT)
    ] = None,
    guidance_scale: Annotated[
        Optional[float], options.guidance_scale("CFG scale, for plain pipelines only (default: the pipeline's).", WHAT)
    ] = None,
    resolution: Annotated[
        Optional[int], options.resolution("Square image size in pixels (default: the student's).", WHAT)
    ] = None,
    height: Annotated[
        Optional[int], _opt("Image height (overrides --resolution).", WHAT, "--height", min=1, show_default=False)
    ] = None,
    width: Annotated[
        Optional[int], _opt("Image width (overrides --resolution).", WHAT, "--width", min=1, show_default=False)
    ] = None,
    batch_size: Annotated[int, options.batch_size("Images per forward pass (images never depend on it).", MODEL)] = 4,
    device: Annotated[str, options.device(panel=MODEL)] = "auto",
    dtype: Annotated[str, options.dtype(panel=MODEL)] = "auto",
    allow_pickle: Annotated[bool, options.allow_pickle(panel=MODEL)] = False,
    out: Annotated[Path, _opt("Folder for the images.", options.OUTPUTS, "--out")] = Path("samples"),
    image_format: Annotated[str, _opt("png, jpg or webp.", options.OUTPUTS, "--format")] = "png",
    overwrite: Annotated[bool, options.overwrite("Replace image files that already exist.")] = False,
    json_out: Annotated[
        bool, options.json_lines("Print one JSON line per image written (path, prompt, seed, steps) on stdout.")
    ] = False,
    quiet: Annotated[bool, options.quiet()] = False,
) -> None:
    from dmdcli.data.prompts import read_prompts
    from dmdcli.errors import UsageError
    from dmdcli.models.samplers import load_sampler, pick_device, pick_dtype, sampling_messages
    from dmdcli.models.student import find_model
    from dmdcli.sample import check_free, plan, run

    ui = RichUI(quiet=quiet)
    quiet_library_bars()
    texts = list(prompt or []) + (read_prompts(prompts) if prompts else [])  # --prompt "" is the unconditional prompt
    if not texts:
        raise UsageError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE (- for standard input)")
    source = find_model(model)
    size = source.image_size(resolution, height, width)
    jobs = plan(texts, num_images_per_prompt, seed, out, image_format)
    check_free(jobs, overwrite)
    torch_device = pick_device(device)
    sampler = load_sampler(source, torch_device, pick_dtype(dtype, torch_device), guidance_scale, allow_pickle)
    n_steps = steps or sampler.default_steps
    for line in sampling_messages(source, sampler, n_steps, torch_device, [j.prompt for j in jobs], out):
        ui.message(line)

    generate = lambda ps, ss: sampler.generate(ps, ss, size[0], size[1], n_steps)  # noqa: E731
    with ui.task("sampling", total=len(jobs)) as update:
        for done, record in enumerate(run(generate, jobs, batch_size, n_steps, source.name), start=1):
            if json_out:
                print_json(record)
            update(done)
    ui.message(f"wrote {len(jobs)} image(s) to {out}/")
