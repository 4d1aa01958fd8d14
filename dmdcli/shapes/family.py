"""The shapes world as a teacher family: `--teacher shapes`, `--data shapes`, `--fid shapes`, and
what `dmd distill` runs with no --teacher.

Its teacher is an SD pipeline (SD's adapter and defaults), known by its name and its folder
rather than by its config files, so a copy of it elsewhere is an SD teacher like any other.
"""

from __future__ import annotations

from dataclasses import replace

from dmdcli.models.families import EvalSet, register
from dmdcli.models.sd import SD
from dmdcli.shapes import teacher_path

NAME = "shapes"


def _data_folder() -> str:
    from dmdcli.shapes.data import dataset_folder  # renders the scenes on first use

    return str(dataset_folder())


SHAPES = register(
    replace(
        SD,
        name=NAME,
        recognises=None,
        aliases={},
        builtin_teacher=lambda: str(teacher_path()),
        recipe=lambda steps, lora_rank: NAME,  # the built-in recipe: teacher, data and values for it
        eval_set=EvalSet(
            NAME,
            "dmdcli.shapes.eval:benchmark",
            "FD-shapes and alignment; the default for models of the built-in shapes teacher",
        ),
        data={NAME: _data_folder},
        example_prompt="a large red circle at the top left on a white background",
        default=True,
        title="the built-in teacher",
        help=(
            "With no --teacher and no --recipe (or with --teacher shapes) the recipe is `shapes`: the\n"
            "built-in teacher, its prompts and images, a 4-step student in about 5 CPU minutes."
        ),
    )
)
