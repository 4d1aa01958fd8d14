"""A Z-Image teacher (single-stream flow transformer told 1 − σ and predicting x0 − ε, lists of
per-prompt text of its own length, Qwen3's second-to-last states, CFG scale s = w − 1) on the same
engine, with the tiny pipeline of dmdcli.models.tiny."""

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
    teacher_sample_differences,
)
from test_reliability import distill
from typer.testing import CliRunner

from dmdcli.core.denoiser import cat_cond
from dmdcli.core.schedule import flow_sigmas, shift_sigmas
from dmdcli.models.families import get_family
from dmdcli.train.sharding import shard_units

runner = CliRunner()
PROMPTS = ["a red circle", "a large blue square at the top left of a white background"]


@pytest.fixture(scope="module")
def teacher_and_pipe(tiny_z_image):
    return teacher_and_pipeline(tiny_z_image, "ZImagePipeline")


def _encoded(pipe, prompt):
    return pipe.encode_prompt([prompt], device="cpu", do_classifier_free_guidance=False)[0]


def test_the_teacher_conditions_as_z_image_pipeline_does(teacher_and_pipe):
    spec, teacher, pipe = teacher_and_pipe
    assert (spec.family, spec.latent_channels, spec.network_downsample) == ("z-image", 16, 2)
    assert torch.equal(spec.schedule(32).sigmas, shift_sigmas(flow_sigmas(1000), 6.0))  # the base's static shift

    cond = teacher.encode_prompts(PROMPTS)
    assert cond["encoder_hidden_states"].shape == (2, 512, 16)
    for i, prompt in enumerate(PROMPTS):  # each prompt's own positions, then zeros the mask leaves out
        states = _encoded(pipe, prompt)[0]
        n = len(states)
        torch.testing.assert_close(cond["encoder_hidden_states"][i, :n], states, atol=0, rtol=0)
        assert cond["encoder_hidden_states"][i, n:].abs().max() == 0
        assert cond["encoder_hidden_states_mask"][i].sum() == n and cond["encoder_hidden_states_mask"][i, :n].all()
    torch.testing.assert_close(
        teacher.empty_cond()["encoder_hidden_states"][0, : len(_encoded(pipe, "")[0])], _encoded(pipe, "")[0]
    )

    tokenizer, limit = teacher.token_limits()[0]  # 512 less the chat template's tokens
    ids = tokenizer(" ".join(["cat"] * 600)).input_ids
    fits, over = tokenizer.decode(ids[:limit]), tokenizer.decode(ids[: limit + 1])
    assert len(_encoded(pipe, fits)[0]) == 512 and teacher.truncation_note([fits]) is None
    assert teacher.truncation_note([over]) is not None


def test_the_adapter_is_called_as_the_pipeline_calls_its_transformer(teacher_and_pipe):
    """A CFG batch (three prompt lengths, padded to 512) gives what the pipeline's transformer gives
    each prompt alone: told 1 − σ, its output negated; the GAN head reads a layer's image tokens."""
    spec, teacher, pipe = teacher_and_pipe
    schedule = spec.schedule(32)
    denoiser = get_family("z-image").denoiser(teacher.network, schedule)
    cond = cat_cond(teacher.encode_prompts(PROMPTS), teacher.empty_cond())
    x, t = torch.randn(3, 16, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 500, 20])
    ours = denoiser(x, t, cond)
    for i, prompt in enumerate([*PROMPTS, ""]):
        time = (1000 - schedule.sigmas[t[i : i + 1]].float() * 1000) / 1000  # as the pipeline: (1000 − t) / 1000
        out = pipe.transformer([x[i].unsqueeze(1)], time, _encoded(pipe, prompt), return_dict=False)[0]
        torch.testing.assert_close(ours[i : i + 1], -torch.stack(out).squeeze(2))

    captured = {}
    hook = teacher.network.layers[0].register_forward_hook(lambda m, i, o: captured.__setitem__("layer", o))
    denoiser(x, t, cond)
    hook.remove()
    grid = captured["layer"][:, :64].float().transpose(1, 2).reshape(3, 32, 8, 8)  # 8×8 image tokens first
    torch.testing.assert_close(denoiser.bottleneck(x, t, cond), grid)
    assert denoiser.feature_block == 0 and len(shard_units(teacher.network)) == 4  # 2 layers, 2 refiners


def test_variants_dmd_cannot_distill_are_refused_in_one_line(tmp_path, tiny_z_image, prompts_file):
    omni = tmp_path / "omni"
    shutil.copytree(tiny_z_image, omni)
    index = json.loads((omni / "model_index.json").read_text())
    (omni / "model_index.json").write_text(json.dumps({**index, "_class_name": "ZImageOmniPipeline"}))
    result = distill("--teacher", omni, "--prompts", prompts_file, "--out", tmp_path / "a")
    assert result.exit_code == 1 and "unsupported pipeline ZImageOmniPipeline" in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("steps, lora", [(4, False), (1, True)])
def test_distill_then_sample(tmp_path, tiny_z_image, prompts_file, image_folder, steps, lora):
    distill_then_sample(tmp_path, tiny_z_image, "z-image", prompts_file, image_folder, steps, lora)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("kind, steps", [("full", 4), ("lora", 1)])
def test_a_diffusers_export_reproduces_dmd_sample(tmp_path, tiny_z_image, kind, steps):
    """The later steps' noise drawn on the latent grid after the initial latent [1, 16, 16, 16]."""
    difference = export_matches_sample(
        tmp_path, tiny_z_image, "z-image", kind, steps, (1, 16, 16, 16), "guidance_scale=0", guidance_scale=0
    )
    assert difference <= 2.0


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_lora_export_loads_into_the_teacher_pipeline(tmp_path, tiny_z_image):
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        x=[torch.randn(16, 1, 16, 16, generator=g) for _ in range(2)],
        t=torch.tensor([0.0, 0.6]),
        cap_feats=[torch.randn(n, 16, generator=g) for n in (7, 12)],
    )

    def output(network, kwargs):  # a list of [C, 1, h, w], one per image
        return torch.stack(network(**kwargs, return_dict=False)[0])

    before, student, loaded = exported_lora_outputs(tmp_path, tiny_z_image, "z-image", inputs, output)
    assert (before - student).abs().max() > 5e-3 and (loaded - student).abs().max() < 5e-5


def test_the_teacher_samples_with_its_cfg_scale_as_w_minus_one(tmp_path, teacher_and_pipe, tiny_z_image):
    """`dmd sample` of the teacher: --guidance-scale w is ZImagePipeline's guidance_scale w − 1."""
    same, other = teacher_sample_differences(
        tmp_path, teacher_and_pipe[2], tiny_z_image, 6, {"guidance_scale": 5}, {"guidance_scale": 6}
    )
    assert same <= 1.0 and other > 1.0


def test_dry_run_of_z_image_from_its_bundled_configs(prompts_file):
    """Offline, from the public configs shipped with dmd: the recipe Z-Image gets fits one 48 GB GPU."""
    record, _ = dry_run("z-image", prompts_file, "--batch-size", 2)
    assert (record["config"]["guidance_scale"], record["config"]["lora_rank"]) == (5.0, 64)
    memory = record["memory_gib"]
    assert memory["parameters"]["teacher network (frozen)"] == pytest.approx(6.15e9 * 2 / 2**30, rel=0.02)
    assert memory["peak"] < 48e9 / 2**30
