"""An SD3 teacher (a flow-matching transformer with CLIP-L, CLIP-G and T5) on the same engine:
the tiny pipeline of dmdcli.models.tiny, distilled, sampled and resumed as SD and SDXL are."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from students import lora_export_outputs, make_student
from test_reliability import assert_same_tensors, checkpoint_tensors, distill
from typer.testing import CliRunner

from dmdcli.cli import app
from dmdcli.models.families import get_family
from dmdcli.models.pipeline import load_teacher
from dmdcli.models.student import find_model
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


@pytest.mark.parametrize(
    "teacher, options",
    [("tiny_sd3", []), ("tiny_flux", ["--guidance-scale", "1"]), ("tiny_qwen_image", ["--guidance-scale", "4"])],
)
def test_resume_is_bit_exact(tmp_path, request, teacher, options, prompts_file, image_folder):
    """The flow families (FLUX: its packing, shifted schedule and embedded guidance; Qwen-Image: its
    masked text and per-channel latents)."""
    teacher = request.getfixturevalue(teacher)
    common = ["--teacher", teacher, "--prompts", prompts_file, "--data", image_folder, "--steps", "2", *options]
    common += ["--fake-updates-per-gen", "2", "--batch-size", "2", "--lora-rank", "4"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert distill(*common, "--iterations", 4, "--out", whole).exit_code == 0
    assert distill(*common, "--iterations", 2, "--out", part).exit_code == 0
    resumed = runner.invoke(app, ["distill", "--out", str(part), "--resume", "--iterations", "4", "--quiet"])
    assert resumed.exit_code == 0, resumed.stderr
    assert_same_tensors(checkpoint_tensors(whole), checkpoint_tensors(part), skip=())
    assert_same_tensors(load_file(whole / "student.safetensors"), load_file(part / "student.safetensors"))


def _image(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("kind, steps", [("full", 4), ("lora", 1)])
def test_diffusers_export_reproduces_dmd_sample(tmp_path, tiny_sd3, kind, steps):
    from diffusers import DiffusionPipeline

    run = make_student(tmp_path / "run", tiny_sd3, "sd3", kind, steps)
    out = tmp_path / "pipeline"
    exported = runner.invoke(app, ["export", "--model", str(run), "--format", "diffusers", "--out", str(out)])
    assert exported.exit_code == 0, exported.stderr
    sigmas = [1.0, 0.75, 0.5, 0.25][:steps]
    assert f"sigmas={sigmas}" in exported.stderr  # the snippet calls the pipeline with the student's sigmas
    ours = runner.invoke(app, ["sample", "--model", str(run), "--prompt", "a cat", "--out", str(tmp_path / "ours")])
    assert ours.exit_code == 0, ours.stderr

    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "FlowMatchLCMScheduler"
    # StableDiffusion3Pipeline draws the re-noise of steps 2..N from torch's global RNG, not from
    # `generator`: seeded so that it continues the generator's stream, as dmd sample's noise does.
    torch.manual_seed(0)
    torch.randn(1, 16, 16, 16)
    image = pipe("a cat", sigmas=sigmas, guidance_scale=0, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert np.abs(np.asarray(image).astype(int) - _image(next((tmp_path / "ours").glob("*.png")))).mean() <= 2.0
    again = runner.invoke(app, ["sample", "--model", str(out), "--prompt", "a cat", "--out", str(tmp_path / "again")])
    assert again.exit_code == 0, again.stderr
    assert (
        np.abs(
            _image(next((tmp_path / "again").glob("*.png"))) - _image(next((tmp_path / "ours").glob("*.png")))
        ).mean()
        <= 2.0
    )


def test_lora_export_loads_into_the_teacher_pipeline(tmp_path, tiny_sd3):

    run = make_student(tmp_path / "run", tiny_sd3, "sd3", "lora", 1)
    out = tmp_path / "lora.safetensors"
    assert runner.invoke(app, ["export", "--model", str(run), "--format", "lora", "--out", str(out)]).exit_code == 0
    kohya = runner.invoke(app, ["export", "--model", str(run), "--format", "kohya", "--out", str(tmp_path / "k")])
    assert kohya.exit_code == 2 and "kohya layout is for UNets" in kohya.stderr
    assert all(k.startswith("transformer.") for k in load_file(out))

    g = torch.Generator().manual_seed(1)
    x, text, pooled = torch.randn(2, 16, 16, 16, generator=g), torch.randn(2, 9, 64, generator=g), torch.randn(2, 64)
    inputs = dict(
        hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=torch.tensor([999.0, 400.0])
    )
    teacher, student, loaded = lora_export_outputs(run, out, tiny_sd3, inputs)
    assert (teacher - student).abs().max() > 0.1  # the LoRA matters...
    assert (loaded - student).abs().max() < 1e-4  # ...and comes back whole, alpha included


def test_dry_run_of_sd35_large_from_its_bundled_configs(tmp_path, prompts_file):
    """Offline, from the public configs dmd ships: the 8B transformer's weights, and the head on
    the middle block's tokens when a GAN is on."""
    args = ["distill", "--teacher", "sd3.5-large", "--prompts", str(prompts_file), "--dry-run", "--json"]
    args += ["--mixed-precision", "bf16", "--lora-rank", "64", "--gradient-checkpointing"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    memory = json.loads(result.stdout)["memory_gib"]
    assert memory["parameters"]["teacher network (frozen)"] == pytest.approx(8.06e9 * 2 / 2**30, rel=0.02)
    assert memory["startup_only"]  # CLIP-L, CLIP-G and T5-XXL, counted from their own classes
    assert 10 < memory["peak"] < memory["parameters"]["teacher network (frozen)"] + 30


def test_a_progressive_student_exports_to_the_euler_scheduler_and_the_same_image(tmp_path, tiny_sd3, prompts_file):
    from diffusers import DiffusionPipeline

    run = tmp_path / "run"
    args = ["--teacher", tiny_sd3, "--prompts", prompts_file, "--method", "progressive", "--parameterization", "v"]
    args += ["--teacher-steps", "4", "--steps", "2", "--iterations-per-round", "2", "--batch-size", "2"]
    result = runner.invoke(app, ["distill", *map(str, args), "--out", str(run), "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert student_info(run / "student.safetensors")["prediction_type"] == "flow"  # v on a flow path
    out = tmp_path / "pipeline"
    assert (
        runner.invoke(app, ["export", "--model", str(run), "--format", "diffusers", "--out", str(out)]).exit_code == 0
    )
    ours = runner.invoke(app, ["sample", "--model", str(run), "--prompt", "a cat", "--out", str(tmp_path / "ours")])
    assert ours.exit_code == 0, ours.stderr
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    image = pipe("a cat", sigmas=[1.0, 0.5], guidance_scale=0, generator=torch.Generator("cpu").manual_seed(0)).images[
        0
    ]
    assert np.abs(np.asarray(image).astype(int) - _image(next((tmp_path / "ours").glob("*.png")))).mean() <= 2.0


def student_info(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: json.loads(v) for k, v in f.metadata().items() if k != "format"}


def test_the_gan_head_reads_the_block_asked_for_and_other_blocks_are_refused(tmp_path, tiny_sd3, tiny_sd, prompts_file):
    args = ["--teacher", tiny_sd3, "--prompts", prompts_file, "--batch-size", "2", "--iterations", "1"]
    result = distill(*args, "--gan-feature-block", "0", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    assert find_model(str(tmp_path / "run")).info["denoiser"] == {"gan_feature_block": 0}
    spec = inspect_teacher(str(tiny_sd3))
    teacher = load_teacher(spec, torch.device("cpu"), torch.float32, 32)
    denoiser = get_family("sd3").denoiser(teacher.network, spec.schedule(), gan_feature_block=0)
    assert denoiser.feature_module is teacher.network.transformer_blocks[0]

    result = distill(*args, "--gan-feature-block", "2", "--out", tmp_path / "two")  # the tiny one has blocks 0, 1
    assert result.exit_code == 2 and "not one of the transformer's blocks (0 to 1)" in result.stderr
    result = distill(*args[2:], "--teacher", tiny_sd, "--gan-feature-block", "1", "--out", tmp_path / "unet")
    assert result.exit_code == 2 and "for transformer teachers" in result.stderr


@pytest.fixture(scope="module")
def sd3_without_t5(tiny_sd3, tmp_path_factory):
    """The tiny SD3 pipeline saved without T5 (text_encoder_3 and tokenizer_3 null), as diffusers'
    docs drop it to save memory."""
    from diffusers import StableDiffusion3Pipeline

    folder = tmp_path_factory.mktemp("sd3") / "no-t5"
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def test_an_sd3_pipeline_without_t5_conditions_as_diffusers_does(sd3_without_t5, tmp_path):
    """Zeros in T5's place: 256 positions, or the number its model_index.json records."""
    import shutil

    from diffusers import StableDiffusion3Pipeline

    from dmdcli.models.teacher import record_max_sequence_length

    recorded = tmp_path / "recorded"
    shutil.copytree(sd3_without_t5, recorded)
    record_max_sequence_length(recorded, 0)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_without_t5, text_encoder_3=None, tokenizer_3=None)
    prompts = ["a red circle", "a blue square"]
    for folder, length in ((sd3_without_t5, 256), (recorded, 0)):
        spec = inspect_teacher(str(folder))
        assert spec.absent_required == {"text_encoder_3": None, "tokenizer_3": None}
        teacher = load_teacher(spec, torch.device("cpu"), torch.float32, 32)
        cond = teacher.encode_prompts(prompts)
        states, _, pooled, _ = pipe.encode_prompt(
            prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=length
        )
        assert cond["encoder_hidden_states"].shape[1] == 77 + length
        torch.testing.assert_close(cond["encoder_hidden_states"], states, atol=1e-5, rtol=0)
        torch.testing.assert_close(cond["pooled_projections"], pooled, atol=1e-5, rtol=0)


def test_an_sd3_pipeline_without_t5_samples_as_a_plain_pipeline(sd3_without_t5, tmp_path):
    """`dmd sample --model` of the teacher itself: diffusers' pipeline, told what its folder says."""
    import shutil

    from dmdcli.models.teacher import record_max_sequence_length

    teacher = tmp_path / "teacher"
    shutil.copytree(sd3_without_t5, teacher)
    record_max_sequence_length(teacher, 0)
    args = ["sample", "--model", str(teacher), "--prompt", "a cat", "--steps", "2", "--out", str(tmp_path / "images")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert len(list((tmp_path / "images").glob("*.png"))) == 1


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_student_of_an_sd3_without_t5_exports_with_what_its_pipeline_must_be_told(sd3_without_t5, tmp_path):
    """The exported pipeline keeps the recorded T5 positions, and the printed snippet loads it (T5
    passed as None) and calls it (max_sequence_length) so that it draws dmd sample's image."""
    import shutil

    from dmdcli.models.teacher import record_max_sequence_length

    teacher = tmp_path / "teacher"
    shutil.copytree(sd3_without_t5, teacher)
    record_max_sequence_length(teacher, 0)
    run = make_student(tmp_path / "run", teacher, "sd3", "full", 1)
    out = tmp_path / "pipeline"
    exported = runner.invoke(app, ["export", "--model", str(run), "--format", "diffusers", "--out", str(out)])
    assert exported.exit_code == 0, exported.stderr
    code = exported.stderr[exported.stderr.index("import torch") :].strip()
    assert "text_encoder_3=None, tokenizer_3=None" in code and "max_sequence_length=0" in code
    assert inspect_teacher(str(out)).max_sequence_length == 0
    ours = runner.invoke(app, ["sample", "--model", str(run), "--prompt", "a cat", "--out", str(tmp_path / "ours")])
    assert ours.exit_code == 0, ours.stderr

    code = code.replace('prompt="a photo of a cat"', 'prompt="a cat"')
    scope = {}
    exec(code, scope)  # the snippet as a user would paste it
    ours_image = _image(next((tmp_path / "ours").glob("*.png")))
    assert np.abs(np.asarray(scope["image"]).astype(int) - ours_image).mean() <= 2.0
