"""The end-to-end checks every transformer family's tests run on its tiny pipeline (Qwen-Image,
FLUX.2 [klein], Z-Image), each family passing its own arguments: distill then sample, a
diffusers export that reproduces `dmd sample`, and `dmd sample` of the teacher pipeline itself."""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from students import lora_export_outputs, make_student
from test_reliability import distill
from typer.testing import CliRunner

from dmdcli.cli import app

runner = CliRunner()


def teacher_and_pipeline(folder: Path, pipeline_class: str) -> tuple:
    """(its TeacherSpec, the teacher dmd loads, on the CPU in fp32 at 32 px, its diffusers pipeline)."""
    import diffusers

    from dmdcli.models.pipeline import load_teacher
    from dmdcli.models.teacher import inspect_teacher

    spec = inspect_teacher(str(folder))
    teacher = load_teacher(spec, torch.device("cpu"), torch.float32, 32)
    return spec, teacher, getattr(diffusers, pipeline_class).from_pretrained(folder)


def sampled_image(folder: Path) -> np.ndarray:
    """The one image `dmd sample` wrote into `folder`, as ints [H, W, 3]."""
    return np.asarray(Image.open(next(folder.glob("*.png"))).convert("RGB")).astype(int)


def sample(model, out: Path, *options) -> np.ndarray:
    """`dmd sample --prompt "a cat"` of `model` into `out`; its image."""
    result = runner.invoke(app, ["sample", "--model", str(model), "--prompt", "a cat", "--out", str(out), *options])
    assert result.exit_code == 0, result.stderr
    return sampled_image(out)


def distill_then_sample(
    tmp_path: Path, teacher, layout: str, prompts_file, image_folder, steps: int, lora: bool, *extra
):
    """A few iterations with real images (the GAN on), full or LoRA, then one sampled image."""
    args = ["--teacher", teacher, "--prompts", prompts_file, "--data", image_folder, "--steps", steps, *extra]
    args += ["--lora-rank", "4"] if lora else []
    result = distill(*args, "--iterations", 3, "--batch-size", 2, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    assert f'layout = "{layout}"' in (tmp_path / "run" / "config.toml").read_text()
    assert sample(tmp_path / "run", tmp_path / "samples").shape[-1] == 3


def export_matches_sample(
    tmp_path: Path,
    teacher,
    layout: str,
    kind: str,
    steps: int,
    latent: tuple[int, ...],
    no_cfg: str,
    prompt=lambda pipe: {"prompt": "a cat"},
    **call,
) -> float:
    """Export a student (`make_student`) as a diffusers pipeline and call it as the printed snippet
    does (the prompt by name, or as `prompt(pipe)` gives it; the student's sigmas, CFG off as
    `no_cfg` says, seed 0); the mean absolute difference from `dmd sample`'s image. The later
    steps' noise comes from torch's global RNG, which dmd sample draws from the image's generator
    after the initial latent `latent`: it is seeded so and drawn past that latent first."""
    from diffusers import DiffusionPipeline

    run = make_student(tmp_path / "run", teacher, layout, kind, steps)
    pipeline = tmp_path / "pipeline"
    exported = runner.invoke(app, ["export", "--model", str(run), "--format", "diffusers", "--out", str(pipeline)])
    assert exported.exit_code == 0, exported.stderr
    assert f"{no_cfg}," in exported.stderr
    ours = sample(run, tmp_path / "ours")

    pipe = DiffusionPipeline.from_pretrained(pipeline)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    torch.randn(*latent)
    sigmas = [1.0, 0.75, 0.5, 0.25] if steps == 4 else [1.0]
    seed = torch.Generator("cpu").manual_seed(0)
    image = pipe(**prompt(pipe), height=32, width=32, sigmas=sigmas, generator=seed, **call).images[0]
    return float(np.abs(np.asarray(image).astype(int) - ours).mean())


def exported_lora_outputs(tmp_path: Path, teacher, layout: str, inputs: dict, output=None) -> tuple:
    """A 1-step LoRA student (`make_student`) exported with `--format lora`; `lora_export_outputs`
    on `inputs`: (the teacher's, the student's, the teacher pipeline's after `load_lora_weights`)."""
    run = make_student(tmp_path / "run", teacher, layout, "lora", 1)
    lora = tmp_path / "lora.safetensors"
    exported = runner.invoke(app, ["export", "--model", str(run), "--format", "lora", "--out", str(lora)])
    assert exported.exit_code == 0, exported.stderr
    return lora_export_outputs(run, lora, teacher, inputs, output)


def dry_run(teacher: str, prompts_file, *options) -> tuple[dict, str]:
    """`dmd distill --teacher TEACHER --dry-run --json --mixed-precision bf16 OPTIONS`, offline from
    the public configs shipped with dmd: (its JSON record, what it said on stderr)."""
    args = ["distill", "--teacher", teacher, "--prompts", str(prompts_file), "--dry-run", "--json"]
    result = runner.invoke(app, [*args, "--mixed-precision", "bf16", *map(str, options)])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout), result.stderr


def teacher_sample_differences(tmp_path: Path, pipe, teacher, guidance_scale: float, same: dict, other: dict):
    """`dmd sample --guidance-scale S` of the teacher pipeline (2 steps, seed 0) against the
    pipeline called with `same` and with `other` (each with the prompt "a cat" unless it passes
    prompt_embeds): the two mean absolute differences."""
    ours = sample(
        teacher,
        tmp_path / "ours",
        "--steps",
        "2",
        "--width",
        "32",
        "--height",
        "32",
        "--guidance-scale",
        str(guidance_scale),
    )
    common = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    images = [
        pipe(
            **({} if "prompt_embeds" in kwargs else {"prompt": "a cat"}),
            **common,
            **kwargs,
            generator=torch.Generator().manual_seed(0),
        ).images[0]
        for kwargs in (same, other)
    ]
    return tuple(float(np.abs((image * 255).round() - ours).mean()) for image in images)
