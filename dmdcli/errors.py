"""Errors that the CLI turns into one clear line and an exit code, never a traceback."""


class DmdError(Exception):
    """A failure the user can act on (bad file, missing weights, ...): exit code 1."""

    exit_code = 1


class UsageError(DmdError):
    """A mistake on the command line or in a recipe: exit code 2, like Typer's own usage errors."""

    exit_code = 2
