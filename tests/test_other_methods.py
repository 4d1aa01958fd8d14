"""DMD (v1) regression and progressive distillation: their math against hand computations, and
`dmd distill --method dmd|progressive` end to end on the tiny SD teacher."""

import json
import math
import tomllib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from dmdcli.cli import app
from dmdcli.core import progressive as pd
from dmdcli.core.losses import pseudo_huber_loss
from dmdcli.core.schedule import NoiseSchedule, ddim_timesteps
from dmdcli.models.teacher import inspect_teacher
from dmdcli.runfiles import read_student_info
from dmdcli.train.recipes import resolve_config

runner = CliRunner()
QUICK = [
    "--recipe",
    "tiny",
    "--batch-size",
    "2",
    "--log-every",
    "1",
    "--sample-every",
    "0",
    "--teacher-grid-steps",
    "0",
    "--quiet",
]
# Progressive distillation writes no grids during a round, so it reads neither option (and refuses them).
QUICK_PROGRESSIVE = ["--recipe", "tiny", "--batch-size", "2", "--log-every", "1", "--quiet"]


# -- math ------------------------------------------------------------------------------------


def test_progressive_target_against_a_hand_computation():
    abar = torch.linspace(0.99, 0.10, 10, dtype=torch.float64)
    schedule = NoiseSchedule(abar, "sample")
    teacher_x0 = lambda z, t: 0.5 * z  # noqa: E731  (a teacher whose x0 estimate is z/2 at every t)
    z = torch.tensor([[1.0, -2.0]])
    t, t1, t2 = (torch.tensor([i]) for i in (8, 5, 2))
    a = lambda i: math.sqrt(abar[i])  # noqa: E731
    s = lambda i: math.sqrt(1 - abar[i])  # noqa: E731
    for zi, got in zip(
        z[0].tolist(),
        pd.distillation_target(
            z,
            pd.teacher_two_steps(teacher_x0, schedule, z, t, t1, t2),
            *schedule.alpha_sigma(t, z),
            *schedule.alpha_sigma(t2, z),
        )[0].tolist(),
    ):
        x0a = 0.5 * zi  # DDIM 8 → 5
        z1 = a(5) * x0a + s(5) * (zi - a(8) * x0a) / s(8)
        x0b = 0.5 * z1  # DDIM 5 → 2
        z2 = a(2) * x0b + s(2) * (z1 - a(5) * x0b) / s(5)
        expected = (z2 - s(2) / s(8) * zi) / (a(2) - s(2) / s(8) * a(8))  # Salimans & Ho, Algorithm 2
        assert got == pytest.approx(expected, rel=1e-6)
        # ... and one student DDIM step 8 → 2 with x̃ lands on the teacher's z_t''
        assert a(2) * expected + s(2) * (zi - a(8) * expected) / s(8) == pytest.approx(z2, rel=1e-6)

    # the last step (t'' = −1, ᾱ = 1): the target is the teacher's final x0
    end = torch.tensor([-1])
    z_end = pd.teacher_two_steps(teacher_x0, schedule, z, t1, t2, end)
    target = pd.distillation_target(z, z_end, *schedule.alpha_sigma(t1, z), *schedule.alpha_sigma(end, z))
    torch.testing.assert_close(target, z_end)

    snr = abar / (1 - abar)
    w = pd.loss_weight(schedule, torch.tensor([9, 0]), "truncated_snr")
    assert w.tolist() == pytest.approx([1.0, float(snr[0])])  # max(SNR, 1)
    assert pd.loss_weight(schedule, torch.tensor([9]), "snr_plus_one").item() == pytest.approx(1 / (1 - 0.10))


def test_ddim_ladders_nest_and_pseudo_huber():
    for n in (2, 4, 8, 64):
        assert ddim_timesteps(n)[::2] == ddim_timesteps(n // 2)
    assert ddim_timesteps(4) == [999, 749, 499, 249] and pd.student_step_pair(ddim_timesteps(4), 1) == (499, 249, -1)
    x, y = torch.zeros(2, 4, 2, 2), torch.full((2, 4, 2, 2), 2.0)
    assert pseudo_huber_loss(x, y).item() == pytest.approx(math.sqrt(4 + 0.00054**2) - 0.00054, rel=1e-6)
    # per element: the same differences at 4× the size give the same distance, so λ means the
    # same at every latent size (the norm of Song & Dhariwal's form would double)
    assert pseudo_huber_loss(x.repeat(1, 1, 2, 2), y.repeat(1, 1, 2, 2)).item() == pytest.approx(
        pseudo_huber_loss(x, y).item(), rel=1e-6
    )


class _StubLPIPS(torch.nn.Module):
    """Stands in for lpips.LPIPS (its VGG weights need a download): a fixed conv "backbone" and
    the squared feature difference, [B, 1, 1, 1] like the real one."""

    seen: list = []

    def __init__(self, net="alex", verbose=True):
        super().__init__()
        assert net == "vgg"  # DMD v1's choice
        self.features = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, a, b):
        _StubLPIPS.seen.append((a.detach().min().item(), a.detach().max().item()))
        return (self.features(a) - self.features(b)).pow(2).mean(dim=(1, 2, 3), keepdim=True)


def test_lpips_distance_decodes_latents_and_auto_picks_it(tiny_sd, monkeypatch):
    """With lpips importable, "auto" runs LPIPS on decoded images in [-1, 1], with gradient to the
    generator's latents only; without it, "auto" falls back with a note and "lpips" is a usage error."""
    import sys
    import types

    from diffusers import AutoencoderKL

    from dmdcli.errors import UsageError
    from dmdcli.train.regression import build_distance, latent_decoder

    vae = AutoencoderKL.from_pretrained(f"{tiny_sd}/vae").requires_grad_(False)
    decoder = lambda: (latent_decoder(vae), "vae", None)  # noqa: E731
    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=_StubLPIPS))
    distance, used, notes = build_distance("auto", decoder)
    assert (used, notes) == ("lpips (vae)", [])
    torch.manual_seed(0)
    target = torch.randn(2, vae.config.latent_channels, 8, 8)
    x = (target + 0.5 * torch.randn_like(target)).requires_grad_(True)
    assert distance(target, target).item() == 0.0
    loss = distance(x, target)
    loss.backward()
    assert loss.item() > 0 and x.grad.abs().sum() > 0
    assert all(-1.0 <= lo and hi <= 1.0 for lo, hi in _StubLPIPS.seen)  # LPIPS' input range

    monkeypatch.setitem(sys.modules, "lpips", None)  # "import lpips" now raises ImportError
    distance, used, notes = build_distance("auto", decoder)
    assert used == "pseudo_huber" and "LPIPS unavailable" in notes[0]
    with pytest.raises(UsageError, match="needs the lpips package"):
        build_distance("lpips", decoder)

    class Silent:  # an lpips whose import fails with no message: its type's name once, not twice
        def __getattr__(self, name):
            raise OSError()

    monkeypatch.setitem(sys.modules, "lpips", Silent())
    assert build_distance("auto", decoder)[2][0].startswith("LPIPS unavailable (OSError):")


def test_lpips_decodes_with_the_tiny_autoencoder_and_says_when_it_cannot(tmp_path, tiny_sdxl, monkeypatch):
    """--regression-decoder: an AutoencoderTiny folder decodes for LPIPS (its own scaling: the
    pipeline's latents as they are); "auto" tries the family's (TAESDXL), and offline without it
    falls back to the teacher's VAE with a note; a folder that is no AutoencoderTiny is one line."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    from dmdcli.errors import UsageError
    from dmdcli.models.families import get_family
    from dmdcli.train.regression import latent_decoder, regression_decoder

    torch.manual_seed(0)
    tiny = AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
        upsampling_scaling_factor=2,
    )
    tiny.save_pretrained(tmp_path / "taesd")
    vae = AutoencoderKL.from_pretrained(f"{tiny_sdxl}/vae").requires_grad_(False)
    sdxl = get_family("sdxl")
    assert sdxl.tiny_autoencoder == "madebyollin/taesdxl"
    z = torch.randn(1, 4, 4, 4)
    decode, what, note = regression_decoder(str(tmp_path / "taesd"), sdxl, latent_decoder(vae), "cpu")
    assert (what, note) == (str(tmp_path / "taesd"), None)
    assert torch.allclose(decode(z), tiny.decode(z).sample.clamp(-1, 1), atol=1e-6)  # no VAE scaling applied

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    decode, what, note = regression_decoder("auto", sdxl, latent_decoder(vae), "cpu")
    assert what == "vae" and note.startswith("tiny autoencoder madebyollin/taesdxl unavailable")
    scale = vae.config.scaling_factor
    assert torch.allclose(decode(z), vae.decode(z / scale).sample.clamp(-1, 1), atol=1e-6)
    assert regression_decoder("vae", sdxl, latent_decoder(vae), "cpu")[1:] == ("vae", None)
    with pytest.raises(UsageError, match=r"--regression-decoder .*: not a readable AutoencoderTiny"):
        regression_decoder(str(tiny_sdxl / "vae"), sdxl, latent_decoder(vae), "cpu")


def test_method_presets(tiny_sd, prompts_file):
    base = {"teacher": str(tiny_sd), "prompts": str(prompts_file)}
    dmd = resolve_config("tiny", {**base, "method": "dmd"})  # tiny (a DMD2 recipe) says 5: the preset wins
    assert (dmd.fake_updates_per_gen, dmd.regression_weight) == (1, 0.25)
    assert resolve_config("tiny", {**base, "method": "dmd", "fake_updates_per_gen": 3}).fake_updates_per_gen == 3
    assert resolve_config("tiny", base).regression_weight == 0


# -- DMD v1 ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_dmd_v1_pairs_are_deterministic_and_reused(tmp_path, tiny_sd, prompts_file, image_folder):
    def run(name, pairs_dir, *extra):
        args = [
            "distill",
            *QUICK,
            "--teacher",
            str(tiny_sd),
            "--prompts",
            str(prompts_file),
            "--method",
            "dmd",
            "--pairs",
            "3",
            "--pair-steps",
            "2",
            "--pairs-dir",
            str(pairs_dir),
            "--out",
            str(tmp_path / name),
            *extra,
        ]
        result = runner.invoke(app, [a for a in args if a != "--quiet"])
        assert result.exit_code == 0, result.stderr + repr(result.exception)
        return result

    first = run("a", tmp_path / "pairs", "--iterations", "2", "--data", str(image_folder), "--json")
    assert "no GAN term" in first.stderr and "made and cached" in first.stderr
    (folder,) = (tmp_path / "pairs").iterdir()
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    summary = json.loads(first.stdout.strip())
    assert set(summary["losses"]) == {"loss_dm", "loss_regression", "loss_denoise"}  # no GAN even with --data
    config = tomllib.loads((tmp_path / "a" / "config.toml").read_text())
    used = config["resolved"]["regression_distance"]
    assert (
        used in ("lpips", "pseudo_huber") and config["fake_updates_per_gen"] == 1 and config["resolved"]["gan"] is False
    )
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["regression_distance"] == used for r in records if "loss_regression" in r)

    second = run("b", tmp_path / "pairs", "--iterations", "1")
    (bar,) = [line for line in second.stderr.splitlines() if line.startswith("regression pairs")]
    assert "reused" in second.stderr and " 3/3 " in bar  # the bar says all are there, not 0 of 3
    assert "Loading weights" not in second.stderr  # transformers' own bar, silenced as diffusers'
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp  # not regenerated

    run("c", tmp_path / "pairs-again", "--iterations", "1")  # made again elsewhere: the same pairs, bit for bit
    (again,) = (tmp_path / "pairs-again").iterdir()
    assert again.name == folder.name
    a, b = load_file(folder / "pairs-00000.safetensors"), load_file(again / "pairs-00000.safetensors")
    assert a["noise"].shape[0] == 3 and a["latent"].shape == a["noise"].shape and torch.isfinite(a["latent"]).all()
    assert all(torch.equal(a[k], b[k]) for k in ("noise", "latent"))
    # Pairs made by a teacher run in bf16, or on another schedule, are other pairs.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # this process ran fp32 so far (reset again by the fixture)
    assert "made and cached" in run("d", tmp_path / "pairs", "--iterations", "1", "--mixed-precision", "bf16").stderr
    from dmdcli.data.pairs import teacher_identity

    spec = inspect_teacher(str(tiny_sd))
    other = {**spec.scheduler_config, "beta_end": 0.02}
    assert teacher_identity(spec.source, "sd", "epsilon", other) != teacher_identity(
        spec.source, "sd", "epsilon", spec.scheduler_config
    )


def test_regression_as_a_dmd2_warm_up_stops_after_k_iterations(tmp_path, tiny_sd, prompts_file):
    from dmdcli.train.distill import Distillation
    from dmdcli.train.ui import SilentUI

    config = resolve_config(
        "tiny",
        {
            "teacher": str(tiny_sd),
            "prompts": str(prompts_file),
            "regression_weight": 0.5,
            "regression_iterations": 1,
            "regression_distance": "mse",
            "fake_updates_per_gen": 1,
            "pairs": 2,
            "pair_steps": 2,
            "batch_size": 2,
            "pairs_dir": str(tmp_path / "pairs"),
            "out": str(tmp_path / "run"),
            "teacher_grid_steps": 0,
        },
    )
    run = Distillation(config, SilentUI())
    assert run.regression_distance_name == "mse" and len(run.data.pairs) == 2
    logs = [run.step(run.data.batch(run.teacher, config.seed, it, 2, run.uncond), it) for it in range(2)]
    assert "loss_regression" in logs[0] and math.isfinite(logs[0]["loss_regression"])
    assert "loss_regression" not in logs[1] and "loss_dm" in logs[1]  # only the first K = 1 iterations


# -- progressive distillation -------------------------------------------------------------------


def test_one_progressive_round_halves_the_steps_and_the_student_samples_and_exports(tmp_path, tiny_sd, prompts_file):
    out = tmp_path / "run"
    args = [
        "distill",
        *QUICK_PROGRESSIVE,
        "--teacher",
        str(tiny_sd),
        "--prompts",
        str(prompts_file),
        "--method",
        "progressive",
        "--teacher-steps",
        "4",
        "--steps",
        "2",
        "--iterations-per-round",
        "2",
        "--parameterization",
        "v",
        "--loss-weight",
        "snr_plus_one",
        "--out",
        str(out),
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr + repr(result.exception)
    summary = json.loads(result.stdout.strip())
    assert summary["rounds"] == 1 and math.isfinite(summary["losses"]["loss_progressive"])

    info = read_student_info(out / "student.safetensors")
    assert (info["kind"], info["steps"], info["timesteps"], info["sampler"]) == ("full", 2, [999, 499], "ddim")
    assert info["prediction_type"] == "v_prediction" and info["conditioning_timestep"] is None
    assert read_student_info(out / "rounds" / "round-1-2step.safetensors")["steps"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["round"], r["steps"]) for r in records] == [(1, 1, 2), (2, 1, 2)]

    sampled = runner.invoke(
        app, ["sample", "--model", str(out), "--prompt", "a red circle", "--out", str(tmp_path / "s"), "--json"]
    )
    assert sampled.exit_code == 0, sampled.stderr + repr(sampled.exception)
    image = np.asarray(Image.open(json.loads(sampled.stdout.strip())["path"]), dtype=np.float64)

    exported = runner.invoke(
        app, ["export", "--model", str(out), "--format", "diffusers", "--out", str(tmp_path / "pipe")]
    )
    assert exported.exit_code == 0, exported.stderr + repr(exported.exception)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        "a red circle",
        num_inference_steps=2,
        guidance_scale=0,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    ).images[0]
    assert np.abs(theirs * 255 - image).mean() <= 2.0  # the exported DDIM pipeline gives `dmd sample`'s image


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_progressive_students_start_from_unrounded_weights_under_bf16(tmp_path, tiny_sd, prompts_file):
    """Each round copies its fp32 student from the teacher before the teacher is cast to bf16."""
    from diffusers import UNet2DConditionModel

    out = tmp_path / "run"
    args = [
        "distill",
        *QUICK_PROGRESSIVE,
        "--teacher",
        str(tiny_sd),
        "--prompts",
        str(prompts_file),
        "--method",
        "progressive",
        "--teacher-steps",
        "4",
        "--steps",
        "2",
        "--iterations-per-round",
        "1",
        "--lr",
        "1e-12",
        "--mixed-precision",
        "bf16",
        "--out",
        str(out),
    ]
    assert runner.invoke(app, args).exit_code == 0
    teacher = UNet2DConditionModel.from_pretrained(str(tiny_sd), subfolder="unet").state_dict()
    student = load_file(out / "student.safetensors")
    assert (
        max((student[k] - teacher[k]).abs().max().item() for k in teacher) < 1e-9
    )  # one step of lr 1e-12, not bf16 rounding


def test_progressive_trains_two_accumulated_micro_batches_as_one_batch(tmp_path, tiny_sd, prompts_file):
    """Its iteration draws nothing but the batch's noise, drawn whole: micro-batches of 1 added up
    train the student one batch of 2 trains, up to float rounding."""
    base = ["distill", *QUICK_PROGRESSIVE, "--teacher", str(tiny_sd), "--prompts", str(prompts_file)]
    base += ["--method", "progressive", "--teacher-steps", "4", "--steps", "2", "--iterations-per-round", "3"]
    base += ["--lr", "1e-3", "--warmup-steps", "0"]
    students = {}
    for name, extra in (("whole", []), ("accumulated", ["--batch-size", "1", "--gradient-accumulation-steps", "2"])):
        result = runner.invoke(app, [*base, *extra, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.stderr + repr(result.exception)
        students[name] = load_file(tmp_path / name / "student.safetensors")
    from diffusers import UNet2DConditionModel

    teacher = UNet2DConditionModel.from_pretrained(str(tiny_sd), subfolder="unet").state_dict()
    # AdamW's step is about lr·sign(g): where a gradient is at rounding level its sign may flip, so the
    # two students are compared over all weights, not at the worst one
    moved = sum((students["whole"][k] - teacher[k]).abs().sum().item() for k in teacher)
    apart = sum((students["whole"][k] - students["accumulated"][k]).abs().sum().item() for k in teacher)
    assert moved > 0 and apart < 0.01 * moved, (moved, apart)


def test_progressive_refuses_what_it_does_not_do(tiny_sd, prompts_file):
    base = ["distill", "--teacher", str(tiny_sd), "--prompts", str(prompts_file), "--method", "progressive"]
    for extra, message in (
        (["--teacher-steps", "6", "--steps", "2"], "power of two"),
        (["--teacher-steps", "2048", "--steps", "2"], "--teacher-steps must lie in 2 … 1000"),
        (["--teacher-steps", "4", "--steps", "1", "--lora-rank", "4"], "pass --lora-rank 0"),
        (["--teacher-steps", "4", "--steps", "1", "--parameterization", "eps"], "--parameterization"),
    ):
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code != 0 and message in result.stderr, result.stderr


@pytest.mark.parametrize("damage", ["corrupt shard", "no shards"])
def test_a_damaged_pair_cache_is_one_line_naming_it(tmp_path, damage):
    from dmdcli.data.pairs import MANIFEST_FILE, _load
    from dmdcli.errors import DmdError

    folder = tmp_path / "pairs" / "key"
    folder.mkdir(parents=True)
    shards = [{"file": "pairs-00000.safetensors"}] if damage == "corrupt shard" else []
    (folder / MANIFEST_FILE).write_text(json.dumps({"count": 2, "shards": shards}))
    (folder / "pairs-00000.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(DmdError, match=f"regression pair cache {folder} .*delete {folder} and run again"):
        _load(folder)


# -- regression alone: the SDXL 1-step pre-training stage -----------------------------------------


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_a_regression_only_stage_trains_the_generator_alone_and_resumes_exactly(tmp_path, tiny_sdxl, prompts_file):
    """sdxl-1step-stage1's shape (the reference's train_sd_ode.py): DM and GAN off, the regression on
    every iteration whatever the TTUR ratio, the fake score neither run nor updated; bit-exact resume;
    then the DMD2 stage from it with --init-from."""
    from dmdcli.train.checkpoint import complete_checkpoints

    def run(out, *extra):
        args = [
            "distill",
            *QUICK,
            *("--teacher", str(tiny_sdxl), "--prompts", str(prompts_file), "--out", str(out)),
            *("--steps", "1", "--conditioning-timestep", "399", "--fake-updates-per-gen", "5"),
            *("--dm-weight", "0", "--gan-generator-weight", "0", "--gan-discriminator-weight", "0"),
            *("--regression-weight", "1", "--regression-distance", "mse"),
            *("--pairs", "3", "--pair-steps", "2", "--pairs-dir", str(tmp_path / "pairs")),
            *extra,
        ]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.stderr + repr(result.exception)
        return result

    run(tmp_path / "whole", "--iterations", "4", "--checkpoint-every", "2")
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "iteration" in r and "loss_regression" in r]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]  # the generator on every iteration
    assert all("grad_norm_generator" in r and "loss_denoise" not in r and "grad_norm_fake" not in r for r in records)
    tensors = load_file(complete_checkpoints(tmp_path / "whole")[-1] / "tensors.safetensors")
    teacher = load_file(f"{tiny_sdxl}/unet/diffusion_pytorch_model.safetensors")
    fake = {k.removeprefix("fake_score."): v for k, v in tensors.items() if k.startswith("fake_score.")}
    generator = {k.removeprefix("generator."): v for k, v in tensors.items() if k.startswith("generator.")}
    assert fake.keys() == teacher.keys() and all(torch.equal(fake[k], teacher[k].float()) for k in fake)
    assert any(not torch.equal(generator[k], teacher[k].float()) for k in generator)

    run(tmp_path / "cut", "--iterations", "2", "--checkpoint-every", "2")
    resumed = runner.invoke(
        app, ["distill", "--out", str(tmp_path / "cut"), "--resume", "--iterations", "4", "--quiet"]
    )
    assert resumed.exit_code == 0, resumed.stderr
    whole, cut = (
        load_file(tmp_path / "whole" / "student.safetensors"),
        load_file(tmp_path / "cut" / "student.safetensors"),
    )
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)

    stage2 = runner.invoke(
        app,
        ["distill", *QUICK, "--teacher", str(tiny_sdxl), "--prompts", str(prompts_file), "--steps", "1"]
        + ["--conditioning-timestep", "399", "--iterations", "1", "--init-from", str(tmp_path / "whole")]
        + ["--out", str(tmp_path / "stage2")],
    )
    assert stage2.exit_code == 0, stage2.stderr


def test_dm_weight_zero_needs_a_term_to_train_and_regression_alone_holds_one_optimizer(tiny_sd, prompts_file):
    from dmdcli.errors import UsageError

    base = {"teacher": str(tiny_sd), "prompts": str(prompts_file), "dm_weight": 0.0}
    assert resolve_config("tiny", {**base, "regression_weight": 1.0}).regression_only()
    for extra in ({}, {"regression_weight": 1.0, "regression_iterations": 5}):
        with pytest.raises(UsageError, match="with --dm-weight 0 the generator needs the GAN term"):
            resolve_config("tiny", {**base, **extra})
    stage1 = resolve_config("sdxl-1step-stage1", {"prompts": str(prompts_file)})
    assert stage1.regression_only() and (stage1.lr, stage1.batch_size, stage1.iterations) == (1e-5, 4, 2000)
    assert (stage1.pairs, stage1.pair_steps, stage1.guidance_scale, stage1.conditioning_timestep) == (10000, 50, 8, 399)

    from dmdcli.train.memory import estimate_memory

    spec = inspect_teacher(str(tiny_sd))
    alone = estimate_memory(
        spec, resolve_config("tiny", {**base, "regression_weight": 1.0}), 32, False, device_type="cpu"
    )
    dmd2 = estimate_memory(spec, resolve_config("tiny", {**base, "dm_weight": 1.0}), 32, False, device_type="cpu")
    assert alone.optimizer_states == pytest.approx(dmd2.optimizer_states / 2)  # the generator's moments only
    assert alone.phase.startswith("generator") and alone.peak < dmd2.peak
