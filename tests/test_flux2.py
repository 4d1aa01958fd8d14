"""A FLUX.2 [klein] teacher (flow transformer read by Qwen3's stacked layers, the VAE's 2×2 patches
normalized by its batch-norm statistics, 4-D position ids, μ from the pipeline's own fit) on the
same engine, with the tiny pipeline of dmdcli.models.tiny."""

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
from dmdcli.core.schedule import flow_sigmas, time_shift_sigmas
from dmdcli.models.families import get_family
from dmdcli.train.sharding import shard_units

runner = CliRunner()
PROMPTS = ["a red circle", "a large blue square at the top left of a white background"]


def _edited(tmp_path, tiny_flux2, name, file, **changes):
    """A copy of the tiny pipeline with `changes` made to one of its json files."""
    folder = tmp_path / name
    shutil.copytree(tiny_flux2, folder)
    config = json.loads((folder / file).read_text())
    (folder / file).write_text(json.dumps({**config, **changes}))
    return folder


@pytest.fixture(scope="module")
def teacher_and_pipe(tiny_flux2):
    return teacher_and_pipeline(tiny_flux2, "Flux2KleinPipeline")


def test_the_teacher_conditions_as_flux2_klein_pipeline_does(teacher_and_pipe):
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    spec, teacher, pipe = teacher_and_pipe
    # the VAE's 4 channels as 2×2 patches, 16× down; the pipeline's default size, 1024
    assert (spec.family, spec.latent_channels, spec.vae_scale_factor, spec.network_downsample) == ("flux2", 16, 16, 1)
    assert spec.native_resolution == 1024
    # 2×2 image tokens at 32 px: μ as the pipeline computes it for its default 50 steps
    mu = compute_empirical_mu(4, 50)
    assert mu != compute_empirical_mu(4, 4)  # (μ depends on the step count at this size)
    assert torch.equal(spec.schedule(32).sigmas, time_shift_sigmas(flow_sigmas(1000), mu))

    cond = teacher.encode_prompts(PROMPTS)
    states, _ = pipe.encode_prompt(PROMPTS, device="cpu")
    assert cond["encoder_hidden_states"].shape == (2, 512, 48)  # three Qwen3 layers' 16 side by side
    torch.testing.assert_close(cond["encoder_hidden_states"], states, atol=0, rtol=0)
    negative, _ = pipe.encode_prompt([""], device="cpu")  # the pipeline's negative prompt
    torch.testing.assert_close(teacher.empty_cond()["encoder_hidden_states"], negative, atol=0, rtol=0)

    tokenizer, limit = teacher.token_limits()[0]  # a prompt's own tokens: 512 less the chat template's

    def templated(prompt):
        turn = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        return len(tokenizer(text).input_ids)

    ids = tokenizer(" ".join(["cat"] * 600)).input_ids
    fits, over = tokenizer.decode(ids[:limit]), tokenizer.decode(ids[: limit + 1])
    assert templated(fits) == 512 and teacher.truncation_note([fits]) is None
    assert templated(over) == 513 and teacher.truncation_note([over]) is not None


def test_the_adapter_is_called_as_the_pipeline_calls_its_transformer(teacher_and_pipe):
    """A CFG batch gives what the pipeline's transformer gives each prompt alone (its packing, ids and
    unpacking); the GAN head reads a double-stream block's image tokens and a single-stream one's."""
    spec, teacher, pipe = teacher_and_pipe
    schedule = spec.schedule(32)
    denoiser = get_family("flux2").denoiser(teacher.network, schedule)
    cond = cat_cond(teacher.encode_prompts(PROMPTS), teacher.empty_cond())
    x, t = torch.randn(3, 16, 2, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 500, 20])
    ours = denoiser(x, t, cond)
    for i, prompt in enumerate([*PROMPTS, ""]):
        states, text_ids = pipe.encode_prompt([prompt], device="cpu")
        image_ids = pipe._prepare_latent_ids(x[i : i + 1])
        velocity = pipe.transformer(
            hidden_states=pipe._pack_latents(x[i : i + 1]),
            timestep=schedule.sigmas[t[i : i + 1]].float(),
            guidance=None,
            encoder_hidden_states=states,
            txt_ids=text_ids,
            img_ids=image_ids,
        ).sample
        torch.testing.assert_close(ours[i : i + 1], pipe._unpack_latents_with_ids(velocity, image_ids, 2, 2))

    captured = {}
    hooks = [
        block.register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o))
        for k, block in (
            ("double", teacher.network.transformer_blocks[0]),
            ("single", teacher.network.single_transformer_blocks[0]),
        )
    ]
    denoiser(x, t, cond)
    for hook in hooks:
        hook.remove()
    grid = lambda tokens: tokens.float().transpose(1, 2).reshape(3, 16, 2, 2)  # noqa: E731
    torch.testing.assert_close(denoiser.bottleneck(x, t, cond), grid(captured["double"][1]))
    single = get_family("flux2").denoiser(teacher.network, schedule, gan_feature_block=1)
    torch.testing.assert_close(single.bottleneck(x, t, cond), grid(captured["single"][:, -4:]))
    assert shard_units(teacher.network) == [
        *teacher.network.transformer_blocks,
        *teacher.network.single_transformer_blocks,
    ]


def test_latents_are_patches_normalized_by_the_vae_batch_norm_as_the_pipeline_does(teacher_and_pipe):
    _, teacher, pipe = teacher_and_pipe
    bn = pipe.vae.bn
    mean, std = bn.running_mean.view(1, -1, 1, 1), torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
    assert mean.abs().max() > 0.1  # the tiny VAE's statistics are not the identity

    latents = torch.randn(1, 16, 2, 2, generator=torch.Generator().manual_seed(1))
    expected = pipe.vae.decode(pipe._unpatchify_latents(latents * std + mean)).sample.clamp(-1, 1)
    torch.testing.assert_close(teacher.decode(latents), expected, atol=1e-5, rtol=0)

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    teacher.latent_generator = torch.Generator().manual_seed(3)
    encoded = teacher.encode_images(images)
    z = pipe.vae.encode(images).latent_dist.sample(generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(encoded, (pipe._patchify_latents(z) - mean) / std, atol=1e-5, rtol=0)


def test_variants_dmd_cannot_distill_are_refused_in_one_line(tmp_path, tiny_flux2, prompts_file):
    distilled = _edited(tmp_path, tiny_flux2, "distilled", "model_index.json", is_distilled=True)
    result = distill("--teacher", distilled, "--prompts", prompts_file, "--out", tmp_path / "a")
    assert result.exit_code == 1 and "step-distilled" in result.stderr and result.stderr.count("\n") == 1

    # a Flux2Pipeline is FLUX.2 [dev] (tests/test_flux2_dev.py), whose transformer is guidance-distilled
    dev = _edited(tmp_path, tiny_flux2, "dev", "model_index.json", _class_name="Flux2Pipeline")
    result = distill("--teacher", dev, "--prompts", prompts_file, "--out", tmp_path / "b")
    assert result.exit_code == 1 and "Flux2Pipeline transformer without a guidance embedding" in result.stderr
    assert result.stderr.count("\n") == 1

    guided = _edited(tmp_path, tiny_flux2, "guided", "transformer/config.json", guidance_embeds=True)
    result = distill("--teacher", guided, "--prompts", prompts_file, "--out", tmp_path / "c")
    assert result.exit_code == 1 and "guidance embedding" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("steps, lora", [(4, False), (1, True)])
def test_distill_then_sample(tmp_path, tiny_flux2, prompts_file, image_folder, steps, lora):
    distill_then_sample(tmp_path, tiny_flux2, "flux2", prompts_file, image_folder, steps, lora, "--guidance-scale", 4)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("kind, steps", [("full", 4), ("lora", 1)])
def test_a_diffusers_export_reproduces_dmd_sample(tmp_path, tiny_flux2, kind, steps):
    """The exported scheduler shifts the student's sigmas by the teacher's μ (a static shift), not by
    the μ the pipeline computes for the student's few steps; the later steps' noise drawn as tokens
    after the initial latent [1, 16, 2, 2]."""
    difference = export_matches_sample(
        tmp_path, tiny_flux2, "flux2", kind, steps, (1, 16, 2, 2), "guidance_scale=0", guidance_scale=0
    )
    assert difference <= 2.0
    from diffusers import FlowMatchLCMScheduler

    assert not FlowMatchLCMScheduler.from_pretrained(
        tmp_path / "pipeline", subfolder="scheduler"
    ).config.use_dynamic_shifting


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_lora_export_loads_into_the_teacher_pipeline(tmp_path, tiny_flux2):
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(2, 4, 16, generator=g),
        encoder_hidden_states=torch.randn(2, 7, 48, generator=g),
        timestep=torch.tensor([1.0, 0.4]),
        img_ids=torch.cartesian_prod(*(torch.arange(n) for n in (1, 2, 2, 1))),
        txt_ids=torch.cartesian_prod(*(torch.arange(n) for n in (1, 1, 1, 7))),
    )
    before, student, loaded = exported_lora_outputs(tmp_path, tiny_flux2, "flux2", inputs)
    # (the random LoRA moves this tiny transformer's output by ~1e-2: 100× the tolerance)
    assert (before - student).abs().max() > 5e-3 and (loaded - student).abs().max() < 5e-5


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_the_printed_lora_snippet_samples_the_student(tmp_path, tiny_flux2, monkeypatch):
    """The lines `dmd export --format lora` prints, run as a user would: the teacher pipeline, the
    LoRA, the student's scheduler with the teacher's shift made static, its sigma, no CFG."""
    run = make_student(tmp_path / "run", tiny_flux2, "flux2", "lora", 1)
    lora = tmp_path / "lora.safetensors"
    exported = runner.invoke(app, ["export", "--model", str(run), "--format", "lora", "--out", str(lora)])
    assert exported.exit_code == 0, exported.stderr
    code = exported.stderr[exported.stderr.index("import torch") :]
    assert "use_dynamic_shifting=False, shift=" in code and "guidance_scale=0," in code
    prompt = ["sample", "--model", str(run), "--prompt", "a photo of a cat", "--out", str(tmp_path / "ours")]
    assert runner.invoke(app, prompt).exit_code == 0
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(code, scope)  # noqa: S102 - the snippet dmd printed, on the tiny teacher
    image = np.asarray(scope["image"]).astype(int)
    assert np.abs(image - sampled_image(tmp_path / "ours")).mean() <= 2.0


def test_the_teacher_samples_with_cfg_against_the_empty_prompt(tmp_path, teacher_and_pipe, tiny_flux2):
    """`dmd sample` of the teacher pipeline: --guidance-scale is Flux2KleinPipeline's guidance_scale (12:
    the tiny teacher's conditional and unconditional predictions are close)."""
    same, other = teacher_sample_differences(
        tmp_path, teacher_and_pipe[2], tiny_flux2, 12, {"guidance_scale": 12}, {"guidance_scale": 1}
    )
    assert same <= 1.0 and other > 1.0


def test_dry_run_of_flux2_klein_from_its_bundled_configs(prompts_file):
    """Offline, from the public configs shipped with dmd: the recipe FLUX.2 [klein] 4B gets fits one 24 GB GPU."""
    record, said = dry_run("flux2-klein-4b", prompts_file, "--batch-size", 2)
    assert "recipe flux2-klein" in said
    assert (record["config"]["guidance_scale"], record["config"]["lora_rank"]) == (4.0, 64)
    memory = record["memory_gib"]
    assert memory["parameters"]["teacher network (frozen)"] == pytest.approx(3.876e9 * 2 / 2**30, rel=0.01)
    assert memory["peak"] < 24e9 / 2**30
