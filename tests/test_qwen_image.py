"""A Qwen-Image teacher (flow MMDiT read by Qwen2.5-VL, masked text of varying length, Wan's VAE
with per-channel latent statistics, 2×2-packed latents) on the same engine, with the tiny pipeline
of dmdcli.models.tiny."""

import json
import shutil

import numpy as np
import pytest
import torch
from family_checks import (
    distill_then_sample,
    dry_run,
    export_matches_sample,
    exported_lora_outputs,
    sampled_image,
    teacher_and_pipeline,
    teacher_sample_differences,
)
from students import make_student
from test_reliability import distill
from typer.testing import CliRunner

from dmdcli.cli import app
from dmdcli.core.denoiser import cat_cond
from dmdcli.core.schedule import flow_sigmas, resolution_shift, time_shift_sigmas
from dmdcli.models.families import get_family
from dmdcli.train.sharding import shard_units

runner = CliRunner()
PROMPTS = ["a red circle", "a large blue square at the top left of a white background"]


@pytest.fixture(scope="module")
def teacher_and_pipe(tiny_qwen_image):
    return teacher_and_pipeline(tiny_qwen_image, "QwenImagePipeline")


def test_the_teacher_conditions_as_qwen_image_pipeline_does(teacher_and_pipe):
    spec, teacher, pipe = teacher_and_pipe
    assert (spec.family, spec.latent_channels, spec.vae_scale_factor, spec.network_downsample) == (
        "qwen-image",
        16,
        8,
        2,
    )
    assert spec.native_resolution == 1024  # QwenImagePipeline's default size
    # 2×2 image tokens at 32 px: the exponential shift of the pipeline's calculate_shift, with its config's bounds
    expected = time_shift_sigmas(flow_sigmas(1000), resolution_shift(4, 256, 8192, 0.5, 0.9))
    assert torch.equal(spec.schedule(32).sigmas, expected)

    cond = teacher.encode_prompts(PROMPTS)
    states, mask = pipe.encode_prompt(PROMPTS, device="cpu")  # padded to the longer prompt
    n = states.shape[1]
    assert cond["encoder_hidden_states"].shape == (2, 512, 64)  # the pipeline's max_sequence_length
    torch.testing.assert_close(cond["encoder_hidden_states"][:, :n], states, atol=0, rtol=0)
    assert cond["encoder_hidden_states"][:, n:].abs().max() == 0
    assert torch.equal(cond["encoder_hidden_states_mask"][:, :n], mask.float())
    assert cond["encoder_hidden_states_mask"][:, n:].sum() == 0 and mask[0].sum() < n  # the short prompt is padded

    negative, _ = pipe.encode_prompt([" "], device="cpu")  # the model card's negative prompt
    empty = teacher.empty_cond()
    torch.testing.assert_close(empty["encoder_hidden_states"][:, : negative.shape[1]], negative, atol=0, rtol=0)
    assert empty["encoder_hidden_states_mask"].sum() == negative.shape[1]


def test_the_adapter_is_called_as_the_pipeline_calls_its_transformer(teacher_and_pipe):
    """A CFG batch (each prompt and the negative one, of three lengths, padded to 512) gives what the
    pipeline's transformer gives each prompt alone, at its own length; the GAN head's features are a grid."""
    spec, teacher, pipe = teacher_and_pipe
    schedule = spec.schedule(32)
    denoiser = get_family("qwen-image").denoiser(teacher.network, schedule)
    cond = cat_cond(teacher.encode_prompts(PROMPTS), teacher.empty_cond())
    x, t = torch.randn(3, 16, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 500, 20])
    ours = denoiser(x, t, cond)
    for i, prompt in enumerate([*PROMPTS, " "]):
        states, mask = pipe.encode_prompt([prompt], device="cpu")
        velocity = pipe.transformer(
            hidden_states=pipe._pack_latents(x[i : i + 1], 1, 16, 4, 4),
            timestep=schedule.sigmas[t[i : i + 1]].float(),
            encoder_hidden_states=states,
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, 2, 2)]],
        ).sample
        unpacked = pipe._unpack_latents(velocity, 32, 32, pipe.vae_scale_factor)[:, :, 0]
        torch.testing.assert_close(ours[i : i + 1], unpacked, atol=1e-5, rtol=0)
    assert denoiser.bottleneck(x, t, cond).shape == (3, 32, 2, 2)
    assert shard_units(teacher.network) == list(teacher.network.transformer_blocks)  # FSDP's units


def test_latents_are_normalized_per_channel_as_the_pipeline_does(teacher_and_pipe):
    _, teacher, pipe = teacher_and_pipe
    latents = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    config = pipe.vae.config
    mean, std = (torch.tensor(v).view(1, 16, 1, 1, 1) for v in (config.latents_mean, config.latents_std))
    expected = pipe.vae.decode(latents[:, :, None] / (1.0 / std) + mean).sample[:, :, 0].clamp(-1, 1)
    torch.testing.assert_close(teacher.decode(latents), expected, atol=1e-6, rtol=0)

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    teacher.latent_generator = torch.Generator().manual_seed(3)
    encoded = teacher.encode_images(images)
    # one posterior sample from the same generator, normalized as QwenImage's img2img pipelines do
    z = pipe.vae.encode(images[:, :, None]).latent_dist.sample(generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(encoded, ((z - mean) * (1.0 / std))[:, :, 0], atol=1e-6, rtol=0)


def test_variants_dmd_cannot_distill_are_refused_in_one_line(tmp_path, tiny_qwen_image, prompts_file):
    edit = tmp_path / "edit"
    shutil.copytree(tiny_qwen_image, edit)
    index = json.loads((edit / "model_index.json").read_text())
    (edit / "model_index.json").write_text(json.dumps({**index, "_class_name": "QwenImageEditPipeline"}))
    result = distill("--teacher", edit, "--prompts", prompts_file, "--out", tmp_path / "a")
    assert result.exit_code == 1 and "unsupported pipeline QwenImageEditPipeline" in result.stderr
    assert result.stderr.count("\n") == 1

    guided = tmp_path / "guided"
    shutil.copytree(tiny_qwen_image, guided)
    config = json.loads((guided / "transformer" / "config.json").read_text())
    (guided / "transformer" / "config.json").write_text(json.dumps({**config, "guidance_embeds": True}))
    result = distill("--teacher", guided, "--prompts", prompts_file, "--out", tmp_path / "b")
    assert result.exit_code == 1 and "guidance_embeds" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("steps, lora", [(4, False), (1, True)])
def test_distill_then_sample(tmp_path, tiny_qwen_image, prompts_file, image_folder, steps, lora):
    distill_then_sample(
        tmp_path, tiny_qwen_image, "qwen-image", prompts_file, image_folder, steps, lora, "--guidance-scale", 4
    )


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("kind, steps", [("full", 4), ("lora", 1)])
def test_a_diffusers_export_reproduces_dmd_sample(tmp_path, tiny_qwen_image, kind, steps):
    """CFG off as the pipeline turns it off (true_cfg_scale=1: no warning about a guidance_scale);
    the later steps' noise drawn as packed tokens after the initial latent [1, 16, 4, 4]."""
    difference = export_matches_sample(
        tmp_path, tiny_qwen_image, "qwen-image", kind, steps, (1, 16, 4, 4), "true_cfg_scale=1", true_cfg_scale=1
    )
    assert difference <= 2.0


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_lora_export_loads_into_the_teacher_pipeline(tmp_path, tiny_qwen_image):
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(2, 4, 64, generator=g),
        encoder_hidden_states=torch.randn(2, 7, 64, generator=g),
        timestep=torch.tensor([1.0, 0.4]),
        img_shapes=[[(1, 2, 2)]] * 2,
    )
    before, student, loaded = exported_lora_outputs(tmp_path, tiny_qwen_image, "qwen-image", inputs)
    assert (before - student).abs().max() > 0.1 and (loaded - student).abs().max() < 1e-4


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_the_printed_lora_snippet_samples_the_student(tmp_path, tiny_qwen_image, monkeypatch):
    """The lines `dmd export --format lora` prints, run as a user would: the teacher pipeline, the
    LoRA, the student's scheduler (not stretched by the teacher's shift_terminal), its sigma, no CFG."""
    run = make_student(tmp_path / "run", tiny_qwen_image, "qwen-image", "lora", 1)
    lora = tmp_path / "lora.safetensors"
    exported = runner.invoke(app, ["export", "--model", str(run), "--format", "lora", "--out", str(lora)])
    assert exported.exit_code == 0, exported.stderr
    code = exported.stderr[exported.stderr.index("import torch") :]
    assert "shift_terminal=None" in code and "true_cfg_scale=1," in code
    prompt = ["sample", "--model", str(run), "--prompt", "a photo of a cat", "--out", str(tmp_path / "ours")]
    assert runner.invoke(app, prompt).exit_code == 0
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(code, scope)  # noqa: S102 - the snippet dmd printed, on the tiny teacher
    image = np.asarray(scope["image"]).astype(int)
    assert np.abs(image - sampled_image(tmp_path / "ours")).mean() <= 2.0


def test_the_teacher_samples_with_true_cfg_and_the_negative_prompt(tmp_path, teacher_and_pipe, tiny_qwen_image):
    """`dmd sample` (and `dmd eval`) of the teacher pipeline: --guidance-scale is QwenImagePipeline's
    true_cfg_scale with the negative prompt " " (its guidance_scale would be ignored, CFG off)."""
    cfg = dict(true_cfg_scale=4, negative_prompt=" ")
    same, other = teacher_sample_differences(
        tmp_path, teacher_and_pipe[2], tiny_qwen_image, 4, cfg, {"true_cfg_scale": 1}
    )
    assert same <= 1.0 and other > 1.0


def test_dry_run_of_qwen_image_from_its_bundled_configs(prompts_file):
    """Offline, from the public configs shipped with dmd: the recipe Qwen-Image gets fits one 80 GB GPU."""
    record, said = dry_run("qwen-image", prompts_file, "--batch-size", 1)
    assert "recipe qwen-image" in said
    assert (record["config"]["guidance_scale"], record["config"]["lora_rank"]) == (4.0, 64)
    memory = record["memory_gib"]
    assert memory["parameters"]["teacher network (frozen)"] == pytest.approx(20.4e9 * 2 / 2**30, rel=0.02)
    assert memory["peak"] < 80e9 / 2**30
