"""An SD3 teacher (a flow-matching transformer with CLIP-L, CLIP-G and T5) on the same engine:
the tiny pipeline of dmdcli.models.tiny, distilled, sampled and resumed as SD and SDXL are."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_reliability import assert_same_tensors, checkpoint_tensors, distill
from typer.testing import CliRunner

from dmdcli.cli import app
from dmdcli.models.families import get_family
from dmdcli.models.pipeline import load_teacher
from dmdcli.models.teacher import inspect_teacher

runner = CliRunner()


def test_the_teacher_conditions_as_the_sd3_pipeline_and_its_features_are_a_grid(tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    spec = inspect_teacher(str(tiny_sd3))
    assert (spec.family, spec.network, spec.prediction_type, spec.latent_channels) == ("sd3", "transformer", "flow", 16)
    schedule = spec.schedule()
    assert schedule.is_flow and abs(float(schedule.sigmas[499]) - 3 * 0.5 / (1 + 2 * 0.5)) < 1e-12  # shift 3

    teacher = load_teacher(spec, torch.device("cpu"), torch.float32, 32)
    cond = teacher.encode_prompts(["a red circle", "a blue square"])
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, local_files_only=True)
    states, negative, pooled, negative_pooled = pipe.encode_prompt(
        ["a red circle", "a blue square"], None, None, do_classifier_free_guidance=True, negative_prompt=""
    )
    torch.testing.assert_close(cond["encoder_hidden_states"], states, atol=1e-5, rtol=0)
    torch.testing.assert_close(cond["pooled_projections"], pooled, atol=1e-5, rtol=0)
    empty = teacher.empty_cond()
    torch.testing.assert_close(empty["encoder_hidden_states"], negative[:1], atol=1e-5, rtol=0)

    # The adapter is the pipeline's transformer call: timestep 1000·σ, latents as they are.
    denoiser = get_family("sd3").denoiser(teacher.network, schedule)
    x, t = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 300])
    expected = pipe.transformer(
        hidden_states=x,
        encoder_hidden_states=states,
        pooled_projections=pooled,
        timestep=1000 * schedule.sigmas[t].float(),
    ).sample
    torch.testing.assert_close(denoiser(x, t, cond), expected, atol=1e-5, rtol=0)
    assert denoiser.bottleneck(x, t, cond).shape == (2, 32, 8, 8)  # the middle block's tokens on the 8×8 patch grid


@pytest.mark.parametrize("steps, lora", [(4, False), (1, True)])
def test_distill_then_sample(tmp_path, tiny_sd3, prompts_file, image_folder, steps, lora):
    args = ["--teacher", tiny_sd3, "--prompts", prompts_file, "--data", image_folder, "--steps", steps]
    args += ["--lora-rank", "4"] if lora else []
    result = distill(*args, "--iterations", 3, "--batch-size", 2, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    config = (tmp_path / "run" / "config.toml").read_text()
    assert 'layout = "sd3"' in config and 'prediction_type = "flow"' in config
    student = load_file(tmp_path / "run" / "student.safetensors")
    assert any("lora" in k for k in student) == lora

    out = tmp_path / "images"
    sampled = runner.invoke(
        app, ["sample", "--model", str(tmp_path / "run"), "--prompt", "a red circle", "--out", str(out), "--json"]
    )
    assert sampled.exit_code == 0, sampled.stderr
    record = json.loads(sampled.stdout.splitlines()[0])
    assert record["steps"] == steps and (out / record["path"].split("/")[-1]).is_file()


def test_resume_is_bit_exact(tmp_path, tiny_sd3, prompts_file, image_folder):
    common = ["--teacher", tiny_sd3, "--prompts", prompts_file, "--data", image_folder, "--steps", "2"]
    common += ["--fake-updates-per-gen", "2", "--batch-size", "2", "--lora-rank", "4"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert distill(*common, "--iterations", 4, "--out", whole).exit_code == 0
    assert distill(*common, "--iterations", 2, "--out", part).exit_code == 0
    resumed = runner.invoke(app, ["distill", "--out", str(part), "--resume", "--iterations", "4", "--quiet"])
    assert resumed.exit_code == 0, resumed.stderr
    assert_same_tensors(checkpoint_tensors(whole), checkpoint_tensors(part), skip=())
    assert_same_tensors(load_file(whole / "student.safetensors"), load_file(part / "student.safetensors"))
