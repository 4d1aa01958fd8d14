"""The start every method's run shares: the accelerator, the teacher's spec, the run folder's
path, the user's files, then the teacher itself (the order fails fast: config files are read,
and the user's files checked, before minutes of model loading)."""

from __future__ import annotations

from pathlib import Path

import torch

from dmdcli import runfiles
from dmdcli.core.denoiser import Denoiser
from dmdcli.core.schedule import NoiseSchedule
from dmdcli.models.families import Family, get_family
from dmdcli.models.pipeline import load_teacher
from dmdcli.models.teacher import TeacherSpec, inspect_teacher
from dmdcli.train import rundir
from dmdcli.train.data import read_user_files
from dmdcli.train.ui import UI, SilentUI
from dmdcli.train.validation import check_teacher_options


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
        self.schedule: NoiseSchedule = self.spec.schedule(self.resolution)
        self.denoiser_options = self.family.denoiser_kwargs(config)
        check_teacher_options(config, self.spec, self.family)
        self.accumulation_steps = config.accumulation_steps(self.accelerator.num_processes)
        self.out = rundir.run_folder(config.out, config.teacher, config.steps)

    def load_teacher(self, frozen_network: bool = False) -> list[str] | None:
        """The user's prompts and image folder (checked), then the teacher; returns the prompts
        (None without --prompts) and sets `data_folder` and `teacher`. frozen_network: the
        teacher's network is loaded in the frozen dtype onto the device (a shared LoRA base)."""
        prompts, self.data_folder = read_user_files(self.config, self.accelerator)
        self.prompts_read = prompts
        if note := self.memory_note():
            self.ui.message(note)
        device = self.accelerator.device
        self.ui.message(
            f"teacher: {self.spec.source} ({self.spec.layout}, {self.spec.prediction_type}) at {self.resolution}px "
            f"on {device}"
        )
        self.teacher = load_teacher(
            self.spec,
            device,
            self.config.frozen_dtype(),
            self.resolution,
            self.config.allow_pickle,
            encoder_dtype=self.family.teacher.training_encoder_dtype,
            frozen_network=frozen_network,
        )
        return prompts

    def memory_note(self) -> str | None:
        """What to say before the teacher loads when the run will not fit its GPU (a method that can tell)."""
        return None

    def config_to_record(self):
        """The config that config.toml and the checkpoints record: prompts read from a stream (a pipe,
        `<(...)`) are named by their copy in the run folder (`keep_prompts`), which --resume reads."""
        from dataclasses import replace

        from dmdcli.data.prompts import is_stream

        if not (self.config.prompts and is_stream(self.config.prompts)):
            return self.config
        return replace(self.config, prompts=str(self.out / runfiles.STREAM_PROMPTS_FILE))

    def keep_prompts(self) -> None:
        """Write the prompts read from a stream into the run folder (main process; see config_to_record)."""
        from dmdcli.data.prompts import write_prompts

        kept = self.config_to_record().prompts
        if kept != self.config.prompts and self.accelerator.is_main_process:
            write_prompts(self.prompts_read, Path(kept))

    def denoiser(self, network) -> Denoiser:
        """A network of the teacher's architecture behind the Denoiser interface (the family's adapter)."""
        return self.family.denoiser(network, self.schedule, **self.denoiser_options)

    def teacher_identity(self) -> dict:
        """The resolved facts about the teacher that every run's config.toml records."""
        return {
            "teacher": self.spec.source,
            "layout": self.spec.layout,
            "prediction_type": self.spec.prediction_type,
        }
