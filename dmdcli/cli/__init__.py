"""The `dmd` command: one small module per subcommand, assembled here."""

from __future__ import annotations

import typer

from dmdcli import __version__
from dmdcli.cli import distill, export, sample
from dmdcli.cli import eval as evaluate  # not `eval`: that name is a builtin
from dmdcli.cli.common import DEBUG


def _no_type_on_flags() -> None:
    """Typer's help shows each option's type, `<bool>` for on/off flags too, which read as if
    they took a value (`--overwrite true` is an error); a flag shows none."""
    from typer.core import TyperOption

    show_type = getattr(TyperOption, "display_type_rich", None)
    if show_type is None or getattr(show_type, "skips_flags", False):  # another Typer: leave its help as it is
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else show_type(self, ctx)

    display_type_rich.skips_flags = True
    TyperOption.display_type_rich = display_type_rich


_no_type_on_flags()

app = typer.Typer(
    name="dmd",
    help="Distill diffusion text-to-image models into 1- to 4-step generators with DMD2.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dmd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    DEBUG["on"] = debug


app.command("distill", help=distill.HELP)(distill.distill)
app.command("sample", help=sample.HELP)(sample.sample)
app.command("export", help=export.HELP)(export.export)
app.command("eval", help=evaluate.HELP)(evaluate.eval_command)


def _quiet_libraries() -> None:
    """diffusers and transformers log loading chatter and their own progress bars to stderr;
    our messages and progress bar say what matters."""
    import os

    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def main() -> None:
    _quiet_libraries()
    app()
