"""The `dmd` command: one small module per subcommand, assembled here."""

from __future__ import annotations

import typer
from typer.core import TyperCommand, TyperGroup

from dmdcli import __version__
from dmdcli.cli import distill, export, sample
from dmdcli.cli import eval as evaluate  # not `eval`: that name is a builtin
from dmdcli.cli.common import DEBUG


class _FlagsShowNoType:
    """Typer's help shows each option's type, `<bool>` for on/off flags too, which reads as if
    they took a value (`--overwrite true` is an error). The help shows an option's metavar in place
    of its type, so every flag, --help (which Typer adds) included, gets an empty one. Public API
    only: the command classes go in through `cls=`; metavar and is_flag are click's attributes."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class _Group(_FlagsShowNoType, TyperGroup):
    pass


class _Command(_FlagsShowNoType, TyperCommand):
    pass


app = typer.Typer(
    name="dmd",
    cls=_Group,
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


app.command("distill", help=distill.HELP, cls=_Command)(distill.distill)
app.command("sample", help=sample.HELP, cls=_Command)(sample.sample)
app.command("export", help=export.HELP, cls=_Command)(export.export)
app.command("eval", help=evaluate.HELP, cls=_Command)(evaluate.eval_command)


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
