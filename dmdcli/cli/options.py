"""The options several commands take, each declared once: its flag, its limits and its panel.

A command passes the sentence that says what the option does there (`--json` prints a summary in
one command, a line per image in another) and gives the default in its signature, as Typer's
`Annotated` style wants: `quiet: Annotated[bool, options.quiet()] = False`.
"""

from __future__ import annotations

import typer

OUTPUTS = "Outputs"  # the panel every command lists what it writes in
MAX_STEPS = 1000  # the noise schedule's 1000 timesteps: more steps would repeat t = 999
# What `dmd sample` and `dmd eval` accept as a model (find_model).
ANY_MODEL = (
    "Run folder (or one of its checkpoints, RUN/checkpoints/iter-N), `dmd export --format diffusers` folder, "
    "or diffusers pipeline (folder or hub id)"
)
DEVICES = "cuda, cuda:1, cpu, mps, or auto"
AUTO_DTYPE = "auto (bf16 on CUDA, fp16 on a GPU without bf16, fp32 elsewhere), fp32, fp16, bf16."


def _option(names: tuple[str, ...], help: str, panel: str | None, **kwargs):
    return typer.Option(*names, help=help, rich_help_panel=panel, **kwargs)


def model(help: str, panel: str | None = None):
    """--model, the one option every command but distill needs."""
    return _option(("--model",), help, panel, show_default=False)


def device(help: str = f"{DEVICES}.", panel: str | None = None):
    return _option(("--device",), help, panel)


def dtype(help: str = AUTO_DTYPE, panel: str | None = None):
    return _option(("--dtype",), help, panel)


def allow_pickle(help: str = "Allow weights stored as pickle files.", panel: str | None = None):
    return _option(("--allow-pickle",), help, panel)


def seed(help: str, panel: str | None = None):
    return _option(("--seed",), help, panel, min=0)


def steps(help: str, panel: str | None = None):
    return _option(("--steps",), help, panel, min=1, max=MAX_STEPS, show_default=False)


def guidance_scale(help: str, panel: str | None = None):
    return _option(("--guidance-scale",), help, panel, show_default=False)


def resolution(help: str, panel: str | None = None):
    return _option(("--resolution",), help, panel, min=1, show_default=False)


def batch_size(help: str, panel: str | None = None):
    return _option(("--batch-size",), help, panel, min=1)


def overwrite(help: str, panel: str | None = OUTPUTS):
    return _option(("--overwrite",), help, panel)


def json_lines(help: str, panel: str | None = OUTPUTS):
    """--json: what a command prints on stdout, one JSON object a line."""
    return _option(("--json",), help, panel)


def quiet(help: str = "No progress or messages on stderr.", panel: str | None = OUTPUTS):
    return _option(("--quiet", "-q"), help, panel)
