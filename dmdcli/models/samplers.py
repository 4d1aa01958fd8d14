"""Sample what `--model` names (dmdcli.models.student.find_model): a student or a plain pipeline.

Students run the DMD2 few-step sampler (dmdcli.core.sampler.sample): one UNet call per step,
no classifier-free guidance. Students whose metadata says "sampler": "ddim" (progressive
distillation) run deterministic DDIM over their own timesteps instead (ddim_sample, no guidance),
in the parameterization their metadata's prediction_type names. Every image has its own CPU
torch.Generator, seeded by its own seed, that draws first the initial latent and then each step's
re-noising noise, in the order diffusers' LCMScheduler pipeline draws them: an image never
depends on the batch it was in, and the exported pipeline called with
generator=torch.Generator("cpu").manual_seed(seed) reproduces it. Any other pipeline is sampled
by itself, with its own scheduler.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from dmdcli.core.denoiser import Cond
from dmdcli.core.sampler import ddim_sample, sample
from dmdcli.core.schedule import ddim_timesteps, student_timesteps
from dmdcli.errors import DmdError, UsageError, first_line
from dmdcli.models.families import get_family, pipeline_guidance_scale
from dmdcli.models.pipeline import load_teacher
from dmdcli.models.student import ModelSource, load_student_weights
from dmdcli.models.teacher import inspect_teacher


class ImageSampler(Protocol):
    """Anything `dmd sample` can draw from: prompts and per-image seeds → uint8 images."""

    name: str
    default_steps: int
    default_size: tuple[int, int] | None  # (height, width); None: the pipeline decides

    def generate(
        self, prompts: list[str], seeds: list[int], height: int | None, width: int | None, steps: int
    ) -> np.ndarray:
        """[B, H, W, 3] uint8; image b depends only on (prompts[b], seeds[b], size, steps)."""
        ...


def sampling_messages(
    source: ModelSource, sampler: ImageSampler, steps: int, device: torch.device, prompts: list[str], dest: str
) -> list[str]:
    """What `dmd sample` and `dmd eval` say before drawing an image per entry of `prompts` into `dest`."""
    what = f"student, {steps} step(s)" if source.is_student else f"{type(sampler.pipe).__name__}, {steps} steps"
    lines = [f"model: {source.name} ({what}) on {device}; {len(prompts)} image(s) → {dest}/"]
    if source.is_student and steps != sampler.default_steps:
        lines.append(
            f"note: the student was distilled for {sampler.default_steps} step(s); sampling at t = "
            f"{sampler.timesteps(steps)}"
        )
    # (a pipeline warns about its own long prompts)
    if source.is_student and (note := sampler.teacher.truncation_note(prompts)):
        lines.append(note)
    return lines


def to_uint8(images: Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] → [B, H, W, 3] uint8, rounded exactly as diffusers' image processor."""
    x = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return (x * 255).round().astype(np.uint8)


def image_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image, as diffusers' `generator=torch.Generator("cpu").manual_seed(seed)`."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def per_image_noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> Tensor:
    """[B, *shape] float32 noise, row b drawn from generators[b] alone (diffusers' randn_tensor on CPU)."""
    rows = [torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators]
    return torch.cat(rows).to(device)


class StudentSampler:
    """A student on the DMD2 few-step sampler, with its teacher's text encoders and VAE.

    Args:
        source: a "student" or "export" ModelSource.
        device, dtype: where and in which precision the UNet and text encoders run (the VAE
            stays float32, as in training).
    """

    def __init__(self, source: ModelSource, device: torch.device, dtype: torch.dtype, allow_pickle: bool = False):
        info = source.info
        self.source, self.info, self.name = source, info, source.name
        self.spec = source.spec()
        resolution = source.resolution(self.spec)
        self.default_size = (resolution, resolution)
        self.default_steps = int(info["steps"])
        # The network read in `dtype` straight onto the device (not whole in fp32 on the host first:
        # Qwen-Image's 82 GB); a full student's weights are rounded to it as a cast would, a LoRA
        # student is fused there (in fp32 then rounded: `fuse_lora_student`).
        self.teacher = load_teacher(self.spec, device, dtype, resolution, allow_pickle, frozen_network=True)
        if source.kind == "student":
            load_student_weights(self.teacher.network, source)
        self.unet = self.teacher.network
        teacher_schedule = self.spec.schedule(resolution)
        self.schedule = teacher_schedule.with_prediction_type(
            info.get("prediction_type", teacher_schedule.prediction_type)
        )
        self.generator = get_family(self.spec.family).denoiser(self.unet, self.schedule, **info.get("denoiser", {}))
        self.ddim = info.get("sampler") == "ddim"  # a progressive-distillation student
        self.device = device

    def timesteps(self, steps: int) -> list[int]:
        """The student's own timesteps at its trained step count; evenly spaced from T−1 otherwise."""
        if steps == self.default_steps:
            return list(self.info["timesteps"])
        if self.ddim:
            return ddim_timesteps(steps, self.schedule.num_train_timesteps)
        conditioning = self.info.get("conditioning_timestep") if steps == 1 else None
        return student_timesteps(steps, self.schedule.num_train_timesteps, conditioning)

    def encode(self, prompts: list[str], height: int, width: int) -> Cond:
        cond = self.teacher.encode_prompts(prompts)
        if "time_ids" in cond:  # SDXL micro-conditioning as its pipeline: (H, W, 0, 0, H, W)
            cond["time_ids"] = torch.tensor(
                [[height, width, 0, 0, height, width]], dtype=torch.float32, device=self.device
            ).expand(len(prompts), 6)
        return cond

    @torch.no_grad()
    def generate(
        self, prompts: list[str], seeds: list[int], height: int | None, width: int | None, steps: int
    ) -> np.ndarray:
        height, width = height or self.default_size[0], width or self.default_size[1]
        f = self.spec.vae_scale_factor
        generators = image_generators(seeds)
        shape = (self.spec.latent_channels, height // f, width // f)
        noise = per_image_noise(generators, shape, self.device)

        def renoise(x: Tensor) -> Tensor:
            # As the exported pipeline's scheduler: from the image's generator after its latent, in its layout.
            return self.generator.draw_noise(x, lambda shape: per_image_noise(generators, shape, x.device))

        cond = self.encode(prompts, height, width)
        if self.ddim:  # deterministic: nothing is drawn after the initial latent
            latents = ddim_sample(
                self.generator, self.schedule, noise, cond, None, steps, 1.0, timesteps=self.timesteps(steps)
            )
        else:
            latents = sample(self.generator, self.schedule, noise, cond, self.timesteps(steps), renoise)
        return to_uint8(self.teacher.decode(latents))


class PipelineSampler:
    """A plain diffusers pipeline, sampled with its own scheduler (and CFG, if it does that)."""

    def __init__(
        self,
        source: ModelSource,
        device: torch.device,
        dtype: torch.dtype,
        guidance_scale: float | None,
        allow_pickle: bool = False,
    ):
        from diffusers import DiffusionPipeline

        self.name = source.name
        # A pipeline dmd distills is loaded and called as its config files say (SD3 without T5:
        # T5 passed as None, a recorded max_sequence_length); any other with diffusers' defaults.
        try:
            spec = inspect_teacher(source.path)
            absent, self.call_kwargs = spec.absent_required, spec.call_kwargs
            family = get_family(spec.family)
            self.guidance = family.pipeline_guidance  # Qwen-Image: true CFG, a negative prompt
            self.prompt_arguments = family.pipeline_prompts  # Chroma: encoded here, its masks made right
        except DmdError:
            absent, self.call_kwargs, self.guidance, self.prompt_arguments = {}, {}, pipeline_guidance_scale, None
        try:
            self.pipe = DiffusionPipeline.from_pretrained(
                source.path, use_safetensors=None if allow_pickle else True, **absent
            )
        except Exception as e:  # missing files, offline hub, pickle-only weights, unknown class...
            first = re.sub(
                r"\s*(Please )?check out the root cause in the stacktrace above\.?",
                "",
                first_line(e),
                flags=re.IGNORECASE,
            )
            where = "" if Path(source.path).expanduser().exists() else " (no such local folder; tried it as a hub id)"
            raise DmdError(f"could not load pipeline {source.path}{where}: {first}") from e
        self.pipe.to(device, dtype)
        self.pipe.set_progress_bar_config(disable=True)
        params = inspect.signature(self.pipe.__call__).parameters
        if "prompt" not in params or "generator" not in params:
            raise DmdError(f"{source.path} ({type(self.pipe).__name__}) is not a text-to-image pipeline")
        default = params.get("num_inference_steps")
        self.default_steps = int(default.default) if default is not None and isinstance(default.default, int) else 50
        self.default_size = None
        self.guidance_scale = guidance_scale

    @torch.no_grad()
    def generate(
        self, prompts: list[str], seeds: list[int], height: int | None, width: int | None, steps: int
    ) -> np.ndarray:
        kwargs: dict[str, Any] = dict(num_inference_steps=steps, generator=image_generators(seeds), output_type="np")
        kwargs.update(self.call_kwargs)
        if height:
            kwargs.update(height=height, width=width)
        guidance = self.guidance(self.guidance_scale)
        try:
            encode = self.prompt_arguments
            text = encode(self.pipe, list(prompts), guidance, self.call_kwargs) if encode else {"prompt": list(prompts)}
            images = self.pipe(**text, **kwargs, **guidance).images
        except (ValueError, TypeError) as e:
            raise DmdError(f"{type(self.pipe).__name__} refused the request: {first_line(e)}") from e
        return (np.asarray(images) * 255).round().astype(np.uint8)


STUDENT_TAKES_NO_CFG = (
    "a DMD2 student samples without classifier-free guidance; --guidance-scale is for plain pipelines"
)


def load_sampler(
    source: ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    guidance_scale: float | None = None,
    allow_pickle: bool = False,
) -> ImageSampler:
    """The sampler for `source`; students take no guidance scale (they sample without CFG)."""
    if source.is_student:
        if guidance_scale is not None:
            raise UsageError(STUDENT_TAKES_NO_CFG)
        return StudentSampler(source, device, dtype, allow_pickle)
    return PipelineSampler(source, device, dtype, guidance_scale, allow_pickle)


def pick_device(name: str | None) -> torch.device:
    """--device: "auto" / None → cuda if available, else mps, else cpu."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"unknown --device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is available")
    return device


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype: "auto" → bf16 on CUDA (fp16 on a GPU without bf16), fp32 elsewhere. bf16, as the
    flow transformers and their LLM and T5 encoders are stored and run (T5 overflows in fp16)."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise UsageError(f"unknown --dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]
