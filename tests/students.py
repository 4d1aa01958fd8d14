"""Student files for the sample and export tests, written directly (no training): the teacher's
UNet with every weight nudged (full) or a LoRA whose A and B are both random (a freshly trained
LoRA's B is still near zero, which would make "reproduces the student" checks vacuous)."""

from pathlib import Path

import torch

from dmdcli import runfiles
from dmdcli.core.schedule import student_timesteps
from dmdcli.models.families import get_family
from dmdcli.models.lora import add_generator_lora, lora_state_dict
from dmdcli.models.teacher import inspect_teacher
from dmdcli.train import rundir
from dmdcli.train.config import DistillConfig

RANK, ALPHA = 4, 2.0  # alpha ≠ rank on purpose: exports must keep it


def make_student(
    out: Path, teacher: Path, layout: str, kind: str, steps: int, seed: int = 0, timesteps: list[int] | None = None
) -> Path:
    """A run folder holding only student.safetensors, as `dmd distill` writes it (`timesteps`: a
    ladder of its own, as --student-timesteps gives)."""
    import diffusers

    family = get_family(layout)
    unet = getattr(diffusers, family.teacher.network_class).from_pretrained(teacher, subfolder=family.network)
    g = torch.Generator().manual_seed(seed)
    if kind == "lora":
        add_generator_lora(unet, RANK, ALPHA, family.lora_targets)
        weights = {k: 0.2 * torch.randn(v.shape, generator=g) for k, v in lora_state_dict(unet).items()}
    else:
        weights = {
            k: v + 0.02 * v.std().nan_to_num() * torch.randn(v.shape, generator=g) for k, v in unet.state_dict().items()
        }
    default = family.conditioning_timestep  # sd: 999, sdxl: 399
    conditioning = default if steps == 1 else None
    info = {
        "teacher": str(teacher),
        "layout": layout,
        "prediction_type": inspect_teacher(str(teacher)).prediction_type,
        "kind": kind,
        "steps": steps,
        "timesteps": timesteps or student_timesteps(steps, 1000, default),
        "conditioning_timestep": conditioning,
        "resolution": 32,
        "iterations": 0,
        "guidance_scale": 1.75,
        "seed": seed,
    }
    if family.denoiser_options:  # as dmd distill records them, at their defaults (FLUX: embedded guidance)
        info["denoiser"] = family.denoiser_kwargs(DistillConfig)
    if kind == "lora":
        info.update(lora_rank=RANK, lora_alpha=ALPHA, lora_target_modules=list(family.lora_targets))
    out.mkdir(parents=True, exist_ok=True)
    rundir.save_student(out / runfiles.STUDENT_FILE, weights, info)
    return out


def unet_inputs(layout: str, batch: int = 2, seed: int = 1):
    """Random (x_t, t, kwargs) for a tiny UNet of `layout`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    t = torch.tensor([999, 399][:batch] + [249] * max(0, batch - 2))
    kwargs = {"encoder_hidden_states": torch.randn(batch, 77, 64 if layout == "sdxl" else 32, generator=g)}
    if layout == "sdxl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 32, generator=g),
            "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * batch),
        }
    return x, t, kwargs


def lora_export_outputs(run: Path, lora: Path, teacher: Path, inputs: dict, output=None) -> tuple:
    """The network's outputs on `inputs` [B, ...]: (the teacher's, the student's as dmd loads it, the
    teacher pipeline's after `load_lora_weights(lora)`), for a transformer family. `output(network,
    inputs)`: its call (default: `network(**inputs).sample`)."""
    from diffusers import DiffusionPipeline

    from dmdcli.models.student import find_model, load_student_network

    output = output or (lambda network, kwargs: network(**kwargs).sample)
    pipe = DiffusionPipeline.from_pretrained(teacher)
    with torch.no_grad():
        student = output(load_student_network(find_model(str(run))), inputs)
        before = output(pipe.transformer, inputs)
        pipe.load_lora_weights(str(lora))
        return before, student, output(pipe.transformer, inputs)
