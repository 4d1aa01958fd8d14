"""A FLUX.1-dev teacher (guidance-distilled flow transformer, CLIP + T5, 2×2-packed latents, a
resolution-shifted schedule) on the same engine, with the tiny pipeline of dmdcli.models.tiny."""

import json
import shutil

import numpy as np
import pytest
import torch
from family_checks import dry_run
from PIL import Image
from students import lora_export_outputs, make_student
from test_reliability import distill
from typer.testing import CliRunner

from dmdcli.cli import app
from dmdcli.core.schedule import flow_sigmas, resolution_shift, time_shift_sigmas
from dmdcli.models.families import get_family
from dmdcli.models.pipeline import load_teacher
from dmdcli.models.student import find_model
from dmdcli.models.teacher import inspect_teacher

runner = CliRunner()
NO_CFG = ["--guidance-scale", "1"]  # --recipe tiny's 1.75 is CFG, which FLUX.1-dev refuses


def _image(folder):
    return np.asarray(Image.open(next(folder.glob("*.png"))).convert("RGB")).astype(int)


def test_the_teacher_conditions_and_is_called_as_flux_pipeline_does(tiny_flux):
    from diffusers import FluxPipeline

    spec = inspect_teacher(str(tiny_flux))
    assert (spec.family, spec.latent_channels, spec.network_downsample, spec.native_resolution) == ("flux", 16, 2, 32)
    schedule = spec.schedule(32)  # 8×8 = 64 image tokens: the shift of diffusers' calculate_shift
    expected = time_shift_sigmas(flow_sigmas(1000), resolution_shift(64, 256, 4096, 0.5, 1.15))
    assert torch.equal(schedule.sigmas, expected)
    with pytest.raises(ValueError, match="image_seq_len"):
        spec.schedule()

    teacher = load_teacher(spec, torch.device("cpu"), torch.float32, 32)
    cond = teacher.encode_prompts(["a red circle", "a blue square"])
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    states, pooled, text_ids = pipe.encode_prompt(["a red circle", "a blue square"], None)
    torch.testing.assert_close(cond["encoder_hidden_states"], states, atol=1e-5, rtol=0)
    torch.testing.assert_close(cond["pooled_projections"], pooled, atol=1e-5, rtol=0)

    denoiser = get_family("flux").denoiser(teacher.network, schedule, embedded_guidance=2.5)
    x, t = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 300])
    packed = pipe._pack_latents(x, 2, 16, 16, 16)
    ids = pipe._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32)
    velocity = pipe.transformer(
        hidden_states=packed,
        encoder_hidden_states=states,
        pooled_projections=pooled,
        timestep=schedule.sigmas[t].float(),
        img_ids=ids,
        txt_ids=text_ids,
        guidance=torch.full((2,), 2.5),
    ).sample
    torch.testing.assert_close(denoiser(x, t, cond), pipe._unpack_latents(velocity, 32, 32, 2), atol=1e-5, rtol=0)
    assert denoiser.bottleneck(x, t, cond).shape == (2, 32, 8, 8)


def test_schnell_and_cfg_are_refused_in_one_line(tmp_path, tiny_flux, prompts_file):
    schnell = tmp_path / "schnell"
    shutil.copytree(tiny_flux, schnell)
    config = json.loads((schnell / "transformer" / "config.json").read_text())
    (schnell / "transformer" / "config.json").write_text(json.dumps({**config, "guidance_embeds": False}))
    result = distill("--teacher", schnell, "--prompts", prompts_file, *NO_CFG, "--out", tmp_path / "a")
    assert result.exit_code == 1 and "FLUX.1-schnell" in result.stderr and result.stderr.count("\n") == 1
    result = distill("--teacher", tiny_flux, "--prompts", prompts_file, "--out", tmp_path / "b")  # tiny: CFG 1.75
    assert result.exit_code == 2 and "guidance-distilled" in result.stderr and "--guidance-scale 1" in result.stderr


@pytest.mark.parametrize("steps, lora", [(4, False), (1, True)])
def test_distill_then_sample(tmp_path, tiny_flux, prompts_file, image_folder, steps, lora):
    args = ["--teacher", tiny_flux, "--prompts", prompts_file, "--data", image_folder, "--steps", steps, *NO_CFG]
    args += ["--lora-rank", "4"] if lora else []
    result = distill(*args, "--iterations", 3, "--batch-size", 2, "--embedded-guidance", 2.5, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    assert 'layout = "flux"' in (tmp_path / "run" / "config.toml").read_text()
    info = find_model(str(tmp_path / "run")).info
    assert info["denoiser"] == {"embedded_guidance": 2.5, "gan_feature_block": None}  # sample and export: the same
    out = tmp_path / "samples"
    sampled = runner.invoke(app, ["sample", "--model", str(tmp_path / "run"), "--prompt", "a cat", "--out", str(out)])
    assert sampled.exit_code == 0, sampled.stderr
    assert len(list(out.glob("*.png"))) == 1


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_multi_step_export_reproduces_dmd_sample(tmp_path, tiny_flux):
    from diffusers import DiffusionPipeline

    run = make_student(tmp_path / "run", tiny_flux, "flux", "full", 4)
    pipeline = tmp_path / "pipeline"
    exported = runner.invoke(app, ["export", "--model", str(run), "--format", "diffusers", "--out", str(pipeline)])
    assert exported.exit_code == 0, exported.stderr
    ours = runner.invoke(app, ["sample", "--model", str(run), "--prompt", "a cat", "--out", str(tmp_path / "ours")])
    assert ours.exit_code == 0, ours.stderr

    pipe = DiffusionPipeline.from_pretrained(pipeline)
    pipe.set_progress_bar_config(disable=True)
    # FluxPipeline draws the re-noise of steps 2..N from torch's global RNG, as packed tokens; dmd sample
    # draws it from the image's generator in the same layout, after the initial latent [1, 16, 16, 16].
    torch.manual_seed(0)
    torch.randn(1, 16, 16, 16)
    seed = torch.Generator("cpu").manual_seed(0)
    sigmas = [1.0, 0.75, 0.5, 0.25]
    image = pipe("a cat", height=32, width=32, sigmas=sigmas, guidance_scale=3.5, generator=seed).images[0]
    assert np.abs(np.asarray(image).astype(int) - _image(tmp_path / "ours")).mean() <= 2.0


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_exports_reproduce_the_student(tmp_path, tiny_flux):
    from diffusers import DiffusionPipeline

    run = make_student(tmp_path / "run", tiny_flux, "flux", "lora", 1)
    pipeline, lora = tmp_path / "pipeline", tmp_path / "lora.safetensors"
    exported = runner.invoke(app, ["export", "--model", str(run), "--format", "diffusers", "--out", str(pipeline)])
    assert exported.exit_code == 0, exported.stderr
    assert "sigmas=[1.0], guidance_scale=3.5" in exported.stderr  # the embedded guidance, not CFG
    assert runner.invoke(app, ["export", "--model", str(run), "--format", "lora", "--out", str(lora)]).exit_code == 0
    ours = runner.invoke(app, ["sample", "--model", str(run), "--prompt", "a cat", "--out", str(tmp_path / "ours")])
    assert ours.exit_code == 0, ours.stderr

    pipe = DiffusionPipeline.from_pretrained(pipeline)
    pipe.set_progress_bar_config(disable=True)
    seed = torch.Generator("cpu").manual_seed(0)  # FluxPipeline's default size is 128 × its VAE factor: asked for
    image = pipe("a cat", height=32, width=32, sigmas=[1.0], guidance_scale=3.5, generator=seed).images[0]
    assert np.abs(np.asarray(image).astype(int) - _image(tmp_path / "ours")).mean() <= 2.0

    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(2, 64, 64, generator=g),
        encoder_hidden_states=torch.randn(2, 9, 64, generator=g),
        pooled_projections=torch.randn(2, 32, generator=g),
        timestep=torch.tensor([1.0, 0.4]),
        img_ids=torch.zeros(64, 3),
        txt_ids=torch.zeros(9, 3),
        guidance=torch.full((2,), 3.5),
    )
    before, student, loaded = lora_export_outputs(run, lora, tiny_flux, inputs)
    assert (before - student).abs().max() > 0.1 and (loaded - student).abs().max() < 1e-4


def test_dry_run_of_flux_dev_from_its_bundled_configs(prompts_file):
    """Offline, from the public configs shipped with dmd: the recipe FLUX.1-dev gets (no CFG,
    shared-base LoRA with checkpointing) fits one 48 GB GPU."""
    record, said = dry_run("flux-dev", prompts_file)
    assert "recipe flux-dev" in said  # chosen for the family
    config = record["config"]
    assert (config["guidance_scale"], config["lora_rank"], config["shared_base"]) == (1.0, 64, True)
    assert config["gradient_checkpointing"]
    memory = record["memory_gib"]
    assert memory["parameters"]["teacher network (frozen)"] == pytest.approx(11.9e9 * 2 / 2**30, rel=0.02)
    assert memory["peak"] < 48e9 / 2**30
