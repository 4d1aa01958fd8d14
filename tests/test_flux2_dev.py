"""A FLUX.2 [dev] teacher (Flux2Pipeline: the FLUX.2 transformer with a guidance embedding, read by
Mistral Small 3.1 behind a PixtralProcessor; guidance-distilled, so no CFG) on the same engine,
with the tiny pipeline of dmdcli.models.tiny."""

import json
import shutil

import pytest
import torch
from family_checks import (
    distill_then_sample,
    dry_run,
    export_matches_sample,
    exported_lora_outputs,
    teacher_and_pipeline,
)
from test_reliability import distill
from typer.testing import CliRunner

from dmdcli.core.schedule import flow_sigmas, time_shift_sigmas
from dmdcli.models.families import get_family
from dmdcli.models.student import find_model

runner = CliRunner()
PROMPTS = ["a red circle", "a large blue square at the top left of a white background"]


@pytest.fixture(scope="module")
def teacher_and_pipe(tiny_flux2_dev):
    return teacher_and_pipeline(tiny_flux2_dev, "Flux2Pipeline")


def test_the_teacher_conditions_as_flux2_pipeline_does(teacher_and_pipe):
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu, format_input

    spec, teacher, pipe = teacher_and_pipe
    assert (spec.family, spec.layout, spec.latent_channels, spec.vae_scale_factor) == ("flux2-dev", "flux2-dev", 16, 16)
    assert torch.equal(spec.schedule(32).sigmas, time_shift_sigmas(flow_sigmas(1000), compute_empirical_mu(4, 50)))

    cond = teacher.encode_prompts(PROMPTS)
    states, _ = pipe.encode_prompt(PROMPTS, device="cpu")  # its system message, Mistral's layers 10, 20, 30
    assert cond["encoder_hidden_states"].shape == (2, 512, 48)
    torch.testing.assert_close(cond["encoder_hidden_states"], states, atol=0, rtol=0)

    tokenizer, limit = teacher.token_limits()[0]  # a prompt's own tokens: 512 less the system message's and template's

    def templated(prompt):
        inputs = pipe.tokenizer.apply_chat_template(format_input([prompt]), tokenize=True, return_dict=True)
        return len(inputs["input_ids"][0])

    ids = tokenizer(" ".join(["cat"] * 600)).input_ids
    fits, over = tokenizer.decode(ids[:limit]), tokenizer.decode(ids[: limit + 1])
    assert templated(fits) == 512 and teacher.truncation_note([fits]) is None
    assert templated(over) == 513 and teacher.truncation_note([over]) is not None


def test_training_encodes_prompts_in_bf16_and_the_estimate_counts_it():
    """Mistral Small 3.1 is 24B: fp32 would be 96 GB, so training encodes in bf16 as the pipeline does."""
    assert get_family("flux2-dev").teacher.training_encoder_dtype == torch.bfloat16
    assert get_family("flux2").teacher.training_encoder_dtype == torch.float32


def test_the_adapter_is_called_as_the_pipeline_calls_its_transformer(teacher_and_pipe):
    """Each prompt of a batch gives what the pipeline's transformer gives it alone, told the
    embedded guidance; another guidance gives another prediction (the embedding is read)."""
    spec, teacher, pipe = teacher_and_pipe
    schedule = spec.schedule(32)
    denoiser = get_family("flux2-dev").denoiser(teacher.network, schedule, embedded_guidance=2.5)
    cond = teacher.encode_prompts(PROMPTS)
    x, t = torch.randn(2, 16, 2, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 300])
    ours = denoiser(x, t, cond)
    for i, prompt in enumerate(PROMPTS):
        states, text_ids = pipe.encode_prompt([prompt], device="cpu")
        image_ids = pipe._prepare_latent_ids(x[i : i + 1])
        velocity = pipe.transformer(
            hidden_states=pipe._pack_latents(x[i : i + 1]),
            timestep=schedule.sigmas[t[i : i + 1]].float(),
            guidance=torch.full([1], 2.5),
            encoder_hidden_states=states,
            txt_ids=text_ids,
            img_ids=image_ids,
        ).sample
        torch.testing.assert_close(ours[i : i + 1], pipe._unpack_latents_with_ids(velocity, image_ids))
    other = get_family("flux2-dev").denoiser(teacher.network, schedule, embedded_guidance=6.0)(x, t, cond)
    assert (other - ours).abs().max() > 1e-4


def _edited(tmp_path, teacher, name, file, **changes):
    folder = tmp_path / name
    shutil.copytree(teacher, folder)
    config = json.loads((folder / file).read_text())
    (folder / file).write_text(json.dumps({**config, **changes}))
    return folder


def test_cfg_and_an_unguided_transformer_are_refused_in_one_line(tmp_path, tiny_flux2_dev, prompts_file):
    result = distill("--teacher", tiny_flux2_dev, "--prompts", prompts_file, "--guidance-scale", 4)
    assert result.exit_code == 2 and "guidance-distilled" in result.stderr and result.stderr.count("\n") == 1

    unguided = _edited(tmp_path, tiny_flux2_dev, "unguided", "transformer/config.json", guidance_embeds=False)
    result = distill("--teacher", unguided, "--prompts", prompts_file, "--out", tmp_path / "run")
    assert result.exit_code == 1 and "without a guidance embedding" in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("steps, lora", [(1, True)])
def test_distill_then_sample(tmp_path, tiny_flux2_dev, prompts_file, image_folder, steps, lora):
    """The student records the guidance it was told, which `dmd sample` and `dmd export` tell it."""
    no_cfg = ("--guidance-scale", 1, "--embedded-guidance", 2.5)
    distill_then_sample(tmp_path, tiny_flux2_dev, "flux2-dev", prompts_file, image_folder, steps, lora, *no_cfg)
    assert find_model(str(tmp_path / "run")).info["denoiser"] == {"embedded_guidance": 2.5, "gan_feature_block": None}


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("kind, steps", [("full", 4), ("lora", 1)])
def test_a_diffusers_export_reproduces_dmd_sample(tmp_path, tiny_flux2_dev, kind, steps):
    """The pipeline's guidance_scale is the student's embedded guidance (3.5, recorded by make_student)."""
    difference = export_matches_sample(
        tmp_path, tiny_flux2_dev, "flux2-dev", kind, steps, (1, 16, 2, 2), "guidance_scale=3.5", guidance_scale=3.5
    )
    assert difference <= 2.0


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_lora_export_loads_into_the_teacher_pipeline(tmp_path, tiny_flux2_dev):
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(2, 4, 16, generator=g),
        encoder_hidden_states=torch.randn(2, 7, 48, generator=g),
        timestep=torch.tensor([1.0, 0.4]),
        guidance=torch.tensor([3.5, 3.5]),
        img_ids=torch.cartesian_prod(*(torch.arange(n) for n in (1, 2, 2, 1))),
        txt_ids=torch.cartesian_prod(*(torch.arange(n) for n in (1, 1, 1, 7))),
    )
    before, student, loaded = exported_lora_outputs(tmp_path, tiny_flux2_dev, "flux2-dev", inputs)
    assert (before - student).abs().max() > 5e-3 and (loaded - student).abs().max() < 5e-5


def test_dry_run_of_flux2_dev_from_its_bundled_configs(prompts_file):
    """Offline, from the public configs shipped with dmd: the recipe, the 32B transformer in bf16,
    Mistral Small 3.1 (24B) in bf16 while the prompts are encoded."""
    record, said = dry_run("flux2-dev", prompts_file, "--batch-size", 1)
    assert "recipe flux2-dev" in said
    assert (record["config"]["guidance_scale"], record["config"]["embedded_guidance"]) == (1.0, 4.0)
    memory = record["memory_gib"]
    assert memory["parameters"]["teacher network (frozen)"] == pytest.approx(32.2e9 * 2 / 2**30, rel=0.02)
    encoder = memory["startup_only"]["text encoders (bf16, dropped once prompts are cached)"]
    assert encoder == pytest.approx(24.0e9 * 2 / 2**30, rel=0.02)
