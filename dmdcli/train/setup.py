"""The start every method's run shares: the accelerator, the teacher's spec, the run folder's
path, the user's files, then the teacher itself (the order fails fast: config files are read,
and the user's files checked, before minutes of model loading)."""

from __future__ import annotations

import torch

from dmdcli.models.families import Family, get_family
from dmdcli.models.teacher import Teacher, TeacherSpec, inspect_teacher
from dmdcli.train import rundir
from dmdcli.train.data import read_user_files
from dmdcli.train.ui import UI, SilentUI


class Run:
    """A configured run of any method, up to its teacher. Methods subclass it: after
    `super().__init__` they check what they must before `load_teacher` (their run folder rules,
    a checkpoint to resume), then build their networks."""

    def __init__(self, config, ui: UI):
        from accelerate import Accelerator

        # Under torchrun / accelerate launch this joins the process group (gloo on CPU).
        self.accelerator = Accelerator(mixed_precision=config.precision(), cpu=not torch.cuda.is_available())
        self.config, self.ui = config, ui if self.accelerator.is_main_process else SilentUI()
        self.spec: TeacherSpec = inspect_teacher(config.teacher)
        self.family: Family = get_family(self.spec.family)  # its adapter and defaults
        self.resolution = self.spec.training_resolution(config.resolution)
        self.out = rundir.run_folder(config.out, config.teacher, config.steps)

    def load_teacher(self) -> list[str] | None:
        """The user's prompts and image folder (checked), then the teacher; returns the prompts
        (None without --prompts) and sets `data_folder` and `teacher`."""
        prompts, self.data_folder = read_user_files(self.config, self.accelerator)
        device = self.accelerator.device
        self.ui.message(
            f"teacher: {self.spec.source} ({self.spec.layout}, {self.spec.prediction_type}) at {self.resolution}px "
            f"on {device}"
        )
        self.teacher = Teacher(
            self.spec,
            device,
            self.config.frozen_dtype(),
            self.resolution,
            self.config.allow_pickle,
            encoder_dtype=torch.float32,
        )
        return prompts

    def teacher_identity(self) -> dict:
        """The resolved facts about the teacher that every run's config.toml records."""
        return {
            "teacher": self.spec.source,
            "layout": self.spec.layout,
            "prediction_type": self.spec.prediction_type,
        }
