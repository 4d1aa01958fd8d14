"""The shapes world as teacher families: `--teacher shapes` (what `dmd distill` runs with no
--teacher) and `--teacher shapes-flow`, `--data shapes`, `--fid shapes`.

The shapes teacher is an SD pipeline (SD's adapter and defaults) and shapes-flow an SD3 one
without T5 (SD3's); each is known by its name and its folder rather than by its config files, so a
copy of one elsewhere is an SD (SD3) teacher like any other.
"""

from __future__ import annotations

from dataclasses import replace

from dmdcli.models.families import EvalSet, register
from dmdcli.models.sd import SD
from dmdcli.models.sd3 import SD3
from dmdcli.shapes import flow_teacher_path, teacher_path

NAME = "shapes"
FLOW_NAME = "shapes-flow"
EVAL_SET = EvalSet(
    NAME,
    "dmdcli.shapes.eval:benchmark",
    "FD-shapes and alignment; the default for models of the built-in shapes teachers",
)


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
        eval_set=EVAL_SET,
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

SHAPES_FLOW = register(
    replace(
        SD3,
        name=FLOW_NAME,
        recognises=None,
        aliases={},
        builtin_teacher=lambda: str(flow_teacher_path()),
        recipe=lambda steps, lora_rank: FLOW_NAME,
        eval_set=EVAL_SET,
        data={NAME: _data_folder},
        example_prompt=SHAPES.example_prompt,
        title="the built-in flow teacher",
    )
)
