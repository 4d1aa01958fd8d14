"""A DMD2 run's state on disk: checkpoints (save, restore, --resume, --init-from) and the student.

What a checkpoint holds is dmdcli.train.checkpoint's format; which weights and optimizer states
go in it, and how they come back, is the network layout's (dmdcli.train.layouts).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dmdcli import runfiles
from dmdcli.errors import DmdError, UsageError, first_line
from dmdcli.models.families import get_family
from dmdcli.runfiles import CHECKPOINTS_DIR, is_checkpoint, read_checkpoint
from dmdcli.train import rundir
from dmdcli.train.checkpoint import (
    checkpoint_keys,
    checkpoint_name,
    latest_checkpoint,
    optimizer_state,
    optimizer_state_dict,
    restore_rng,
    staging_dir,
    write_checkpoint,
    write_rng,
)
from dmdcli.train.config import DistillConfig
from dmdcli.train.layouts import Layout, part, prefixed
from dmdcli.train.networks import Networks
from dmdcli.train.resume import init_conflicts, resume_conflicts
from dmdcli.train.stop import RunFinished

# -- before any model loads: what to resume or start from ----------------------------------------


def checkpoint_to_resume(out: Path, config: DistillConfig, accelerator, ui) -> Path:
    """The newest complete checkpoint of the run folder, checked against this run's configuration.
    Raises RunFinished when the run has done its --iterations."""
    found = latest_checkpoint(out)
    if found is None:
        raise UsageError(f"nothing to resume: {out} holds no complete checkpoint")
    _, state = read_checkpoint(found, with_tensors=False)
    if state.get("world_size", 1) != accelerator.num_processes:
        raise UsageError(
            f"--resume with {accelerator.num_processes} process(es), but checkpoint {found.name} was written by "
            f"{state.get('world_size', 1)}: resume with the same number of processes"
        )
    conflicts = resume_conflicts(state["config"], config)
    if conflicts:
        details = ", ".join(f"{k} {before!r} → {now!r}" for k, before, now in conflicts)
        raise UsageError(f"--resume with a configuration that contradicts the checkpoint {found.name}: {details}")
    done = state["iteration"]
    if done > config.iterations:
        raise UsageError(
            f"{out} is already at iteration {done}, past --iterations {config.iterations}; raise it to continue"
        )
    if done == config.iterations:
        wrote = _student_from_final_checkpoint(out, found, state, accelerator)
        raise RunFinished(f"{out} is already at iteration {done}{wrote}; raise --iterations to continue")
    planned = state["config"].get("iterations")
    if config.lr_schedule != "constant" and planned != config.iterations:
        ui.message(
            f"the {config.lr_schedule} LR decay now spans {config.iterations} iterations instead of "
            f"{planned}: the LR goes up from where the run stopped and decays again"
        )
    return found


def _student_from_final_checkpoint(out: Path, found: Path, state: dict[str, Any], accelerator) -> str:
    """The student of a finished run, written from its last checkpoint when the run stopped
    between the two (a full disk, a kill); a note for the user, or "" when it was there."""
    student = out / runfiles.STUDENT_FILE
    try:
        if runfiles.read_student_info(student).get("iterations") == state["iteration"]:
            return ""
    except DmdError:  # missing or damaged
        pass
    if accelerator.is_main_process:
        tensors, _ = read_checkpoint(found)
        rundir.save_student(student, part("generator.", tensors), state["student"])
    accelerator.wait_for_everyone()
    return f" (its student was missing: written from checkpoint {found.name})"


def checkpoint_to_init_from(config: DistillConfig) -> Path:
    """--init-from's checkpoint (given, or the newest of a run folder), whose networks must be this run's."""
    source = Path(config.init_from)
    found = source if is_checkpoint(source) else latest_checkpoint(source)
    if found is None:
        raise UsageError(
            f"--init-from {source}: neither a checkpoint (RUN/checkpoints/iter-N) nor a run folder holding one"
        )
    _, state = read_checkpoint(found, with_tensors=False)
    conflicts = init_conflicts(state["config"], config)
    if conflicts:
        details = ", ".join(f"{k} {there!r} there, {here!r} here" for k, there, here in conflicts)
        raise UsageError(f"--init-from {found}: its networks are not this run's ({details})")
    return found


# -- the student's metadata --------------------------------------------------------------------


def student_info(
    config: DistillConfig, spec, resolution: int, timesteps: list[int], conditioning: int | None, iterations: int
) -> dict[str, Any]:
    """What `dmd sample`, `eval` and `export` need to know about a generator, saved beside it."""
    info = {
        "teacher": spec.source,
        "layout": spec.layout,
        "prediction_type": spec.prediction_type,
        "kind": "lora" if config.lora_rank else "full",
        "steps": config.steps,
        "timesteps": timesteps,
        "conditioning_timestep": conditioning,
        "resolution": resolution,
        "iterations": iterations,
        "guidance_scale": config.guidance_scale,
        "seed": config.seed,
    }
    if options := get_family(spec.family).denoiser_kwargs(config):  # what the adapter is told (FLUX: its guidance)
        info["denoiser"] = options
    if config.ema_decay:  # the student's weights are the generator's average
        info["ema_decay"] = config.ema_decay
    if config.lora_rank:
        info.update(
            lora_rank=config.lora_rank,
            lora_alpha=config.lora_alpha_value(),
            lora_target_modules=list(get_family(spec.family).lora_targets),
        )
    return info


# -- checkpoints of a running run ----------------------------------------------------------------


class Checkpoints:
    """Save and load everything needed to continue exactly: weights, optimizers, LR schedules, RNG
    states; and the student file beside each checkpoint. Collectives: every process calls these."""

    def __init__(
        self, out: Path, config: DistillConfig, accelerator, layout: Layout, nets: Networks, step, ui, info: Callable
    ):
        self.out, self.config, self.accelerator, self.ui = out, config, accelerator, ui
        self.layout, self.nets, self.step = layout, nets, step
        self.info = info  # iterations done → the student's metadata

    def save(self, iteration: int, extra: dict[str, Any]) -> Path:
        step, acc = self.step, self.accelerator
        tensors = self.layout.weights(self.nets)
        generator_state, fake_state = self.layout.optimizer_states(self.nets, step)
        opt_g, opt_g_json = optimizer_state(generator_state, "optimizer.generator")
        opt_f, opt_f_json = optimizer_state(fake_state, "optimizer.fake")
        student = raw = part("generator.", tensors)
        if step.ema is not None:  # the student is the average; the raw weights stay beside it
            with step.ema.swapped():  # copied out (to host memory: no second copy on the GPU) before the swap back
                student = {
                    k: v.detach().to("cpu", copy=True) for k, v in self.layout.generator_weights(self.nets).items()
                }
            tensors.update(prefixed(runfiles.EMA_PREFIX, student))
        tensors.update({**opt_g, **opt_f})
        state = {
            "config": self.config.to_dict(),
            "world_size": acc.num_processes,
            "skipped_updates": step.skipped_updates,
            "optimizers": {"generator": opt_g_json, "fake": opt_f_json},
            # LambdaLR's state is JSON-able: its lambdas (rebuilt from the config) appear as None.
            "lr_schedulers": {
                "generator": step.generator_lr_scheduler.state_dict(),
                "fake": step.fake_lr_scheduler.state_dict(),
            },
            # What `--model RUN/checkpoints/iter-N` needs to sample, score or export this generator.
            "student": self.info(iteration),
            **extra,
        }
        # Every process leaves its RNG state in a staging folder; the main one assembles the rest.
        staged = staging_dir(self.out, iteration)
        if acc.is_main_process:
            staged.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        write_rng(staged, acc.process_index)
        acc.wait_for_everyone()
        path = self.out / CHECKPOINTS_DIR / checkpoint_name(iteration)
        if acc.is_main_process:
            path = write_checkpoint(
                self.out, iteration, tensors, state, self.config.keep_checkpoints, staged, acc.num_processes
            )
            rundir.save_student(self.out / runfiles.STUDENT_FILE, student, self.info(iteration))
            if step.ema is not None:
                info = {k: v for k, v in self.info(iteration).items() if k != "ema_decay"}
                rundir.save_student(self.out / runfiles.STUDENT_RAW_FILE, raw, info)
        acc.wait_for_everyone()
        return path

    def restore(self, path: Path) -> dict[str, Any]:
        """Load a checkpoint written by `save`; returns its JSON state."""
        step = self.step
        tensors, state = read_checkpoint(path, with_tensors=self.layout.reads_tensors(self.accelerator.is_main_process))
        generator, fake = (
            optimizer_state_dict(f"optimizer.{name}", tensors, state["optimizers"][name]) if tensors else {}
            for name in ("generator", "fake")
        )
        self.layout.load_weights(self.nets, tensors, with_head=self.nets.head is not None)
        if step.ema is not None:
            with step.ema.swapped():
                self.layout.load_generator_weights(self.nets, part(runfiles.EMA_PREFIX, tensors))
        self.layout.load_optimizer_states(self.nets, step, generator, fake)
        step.generator_lr_scheduler.load_state_dict(state["lr_schedulers"]["generator"])
        step.fake_lr_scheduler.load_state_dict(state["lr_schedulers"]["fake"])
        step.skipped_updates = state["skipped_updates"]
        restore_rng(path, self.accelerator.process_index)
        return state

    def initialize_from(self, path: Path) -> None:
        """--init-from: another run's generator, fake score and, when both runs have one, classifier
        head (a first stage without GAN has none: this run's starts fresh)."""
        tensors, _ = read_checkpoint(path, with_tensors=self.layout.reads_tensors(self.accelerator.is_main_process))
        with_head = self.nets.head is not None and any(k.startswith("discriminator.") for k in checkpoint_keys(path))
        try:
            self.layout.load_weights(self.nets, tensors, with_head)
        except (RuntimeError, ValueError, KeyError) as e:  # shapes that differ, e.g. a head made at another resolution
            raise UsageError(f"--init-from {path}: its weights do not fit this run's networks ({first_line(e)})") from e
        if self.step.ema is not None:  # the average starts at the generator this run starts from
            self.step.ema.reset()
        self.ui.message(f"generator, fake score{' and GAN head' if with_head else ''} from {path}")
