"""`dmd distill` end to end on tiny SD- and SDXL-layout teachers built from config dicts."""

import hashlib
import json
import shutil
import tomllib

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from dmdcli.cli import app
from dmdcli.models.teacher import inspect_teacher
from dmdcli.runfiles import read_student_info
from dmdcli.train.distill import Distillation
from dmdcli.train.optim import lr_factor
from dmdcli.train.recipes import resolve_config
from dmdcli.train.ui import SilentUI

runner = CliRunner()
FAST = [
    "--recipe",
    "tiny",
    "--iterations",
    "6",
    "--log-every",
    "2",
    "--sample-every",
    "3",
    "--batch-size",
    "2",
    "--quiet",
]


def folder_digest(folder):
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize(
    "layout,steps,lora,with_data",
    [
        ("sd", 1, False, False),
        ("sd", 4, True, True),
        ("sdxl", 1, True, False),
        ("sdxl", 4, False, True),
    ],
)
def test_distill_cli_writes_a_complete_run(
    request, tmp_path, prompts_file, image_folder, layout, steps, lora, with_data
):
    teacher = request.getfixturevalue(f"tiny_{layout}")
    before = folder_digest(teacher)
    out = tmp_path / "run"
    args = [
        "distill",
        *FAST,
        "--teacher",
        str(teacher),
        "--steps",
        str(steps),
        "--prompts",
        str(prompts_file),
        "--out",
        str(out),
        "--json",
    ]
    if lora:
        args += ["--lora-rank", "4", "--lora-alpha", "2"]
    if with_data:
        args += ["--data", str(image_folder), "--gradient-checkpointing", "--diffusion-gan"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr + repr(result.exception)

    summary = json.loads(result.stdout.strip())  # one JSON line, nothing else on stdout
    assert summary["iterations"] == 6
    assert set(summary["losses"]) == (
        {"loss_dm", "loss_denoise"} | ({"loss_gan_g", "loss_gan_d"} if with_data else set())
    )
    assert all(torch.isfinite(torch.tensor(v)) for v in summary["losses"].values())

    assert (out / "config.toml").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss_denoise" in r]
    assert [r["iteration"] for r in losses] == [2, 4, 6]
    assert all(r["sec_per_iter"] > 0 and r["lr_fake"] > 0 for r in losses)
    grids = [r for r in records if "diversity" in r]
    assert [r["iteration"] for r in grids] == [3, 6] and all(r["diversity_ratio"] > 0 for r in grids)
    assert records[0]["iteration"] == 0 and records[0]["diversity_teacher"] > 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["iter-000003.png", "iter-000006.png", "teacher.png"]

    info = read_student_info(out / "student.safetensors")
    assert info["steps"] == steps and info["kind"] == ("lora" if lora else "full")
    assert info["timesteps"] == ([999, 749, 499, 249] if steps == 4 else [999 if layout == "sd" else 399])
    assert info["conditioning_timestep"] == (None if steps == 4 else (999 if layout == "sd" else 399))
    assert info["teacher"] == str(teacher) and info["layout"] == layout
    weights = load_file(out / "student.safetensors")
    assert all("lora" in k for k in weights) == lora
    if lora:
        assert info["lora_rank"] == 4 and info["lora_alpha"] == 2
    assert folder_digest(teacher) == before  # the teacher's files are untouched


def test_trained_networks_change_and_the_teacher_does_not(tmp_path, tiny_sdxl, prompts_file, image_folder):
    config = resolve_config(
        "tiny",
        {
            "teacher": str(tiny_sdxl),
            "prompts": str(prompts_file),
            "data": str(image_folder),
            "iterations": 3,
            "fake_updates_per_gen": 1,
            "batch_size": 2,
            "out": str(tmp_path / "run"),
            "steps": 2,
            "sample_every": 0,
        },
    )
    run = Distillation(config, SilentUI())
    snapshot = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}  # noqa: E731
    teacher, generator, fake = (
        snapshot(run.teacher.network),
        snapshot(run.nets.generator_unet),
        snapshot(run.nets.fake_unet),
    )
    head = snapshot(run.step.dmd2.discriminator)
    run.run()
    changed = lambda before, m: sum(not torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # noqa: E731
    assert changed(teacher, run.teacher.network) == 0
    assert changed(generator, run.nets.generator_unet) > 0.5 * len(generator)
    assert changed(fake, run.nets.fake_unet) > 0.5 * len(fake)
    assert changed(head, run.step.dmd2.discriminator) == len(head)


def test_data_only_uses_captions_as_prompts_and_caches_latents(tmp_path, tiny_sd, image_folder):
    args = ["distill", *FAST, "--iterations", "2", "--teacher", str(tiny_sd), "--data", str(image_folder)]
    first = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.stderr
    cache = list((image_folder / ".dmd-cache").iterdir())
    assert len(cache) == 1
    stamp = (cache[0] / "manifest.json").stat().st_mtime_ns
    second = runner.invoke(app, [*args, "--out", str(tmp_path / "b")])
    assert second.exit_code == 0, second.stderr
    assert (cache[0] / "manifest.json").stat().st_mtime_ns == stamp  # reused, not re-encoded
    config = (tmp_path / "a" / "config.toml").read_text()
    assert "num_prompts = 8" in config and "gan = true" in config


@pytest.mark.parametrize("from_captions", [True, False])
def test_prompts_from_captions_replaces_the_prompts_file(tmp_path, tiny_sd, prompts_file, image_folder, from_captions):
    """The reference's SDXL 4-step runs: with --data, every prompt is one of its captions (said at the start)."""
    flag = "--prompts-from-captions" if from_captions else "--no-prompts-from-captions"
    args = ["distill", *FAST, "--iterations", "1", "--teacher", str(tiny_sd), "--prompts", str(prompts_file)]
    args += ["--data", str(image_folder), flag, "--out", str(tmp_path / "run")]
    result = runner.invoke(app, [a for a in args if a != "--quiet"])
    assert result.exit_code == 0, result.stderr
    said = "prompts: the 8 captions of --data, not --prompts (3)" in result.stderr
    resolved = tomllib.loads((tmp_path / "run" / "config.toml").read_text())["resolved"]
    assert (said, resolved["num_prompts"]) == ((True, 8) if from_captions else (False, 3))
    assert resolve_config("sdxl-4step-lora", {"prompts": "p.txt"}).prompts_from_captions


def test_zero_gan_weights_take_only_the_captions_of_data(tmp_path, tiny_sd, image_folder):
    """sd15-1step-stage1's "no GAN, even when --data is given": no latents encoded, no head."""
    args = [
        "distill",
        *FAST,
        "--iterations",
        "2",
        "--teacher",
        str(tiny_sd),
        "--data",
        str(image_folder),
        "--json",
        "--gan-generator-weight",
        "0",
        "--gan-discriminator-weight",
        "0",
        "--out",
        str(tmp_path / "run"),
    ]
    result = runner.invoke(app, [a for a in args if a != "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert "both GAN weights are 0: --data serves only for its 8 captions" in result.stderr
    assert not (image_folder / ".dmd-cache").exists()  # nothing VAE-encoded
    assert set(json.loads(result.stdout)["losses"]) == {"loss_dm", "loss_denoise"}
    resolved = tomllib.loads((tmp_path / "run" / "config.toml").read_text())["resolved"]
    assert (resolved["num_prompts"], resolved["gan"]) == (8, False)


def test_without_data_the_run_says_the_gan_is_off_and_names_long_prompts(tmp_path, tiny_sd, prompts_file):
    args = [
        "distill",
        "--recipe",
        "tiny",
        "--iterations",
        "1",
        "--teacher",
        str(tiny_sd),
        "--prompts",
        str(prompts_file),
        "--out",
        str(tmp_path / "run"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert "GAN term is off" in result.stderr and "longer than" not in result.stderr
    assert result.stdout == ""  # without --json nothing goes to stdout

    long = " ".join(["a red circle beside a blue square"] * 12)  # 84 words: over CLIP's 77 tokens
    prompts_file.write_text(prompts_file.read_text() + long + "\n" + long + "\n")
    result = runner.invoke(app, args[:-1] + [str(tmp_path / "run2")])
    assert result.exit_code == 0, result.stderr
    assert "note: 1 of 4 prompts are longer than the text encoder's 77 tokens" in " ".join(result.stderr.split())


def test_same_seed_same_student(tmp_path, tiny_sd, prompts_file):
    outs = []
    for name in ("a", "b"):
        result = runner.invoke(
            app,
            [
                "distill",
                *FAST,
                "--teacher",
                str(tiny_sd),
                "--prompts",
                str(prompts_file),
                "--out",
                str(tmp_path / name),
            ],
        )
        assert result.exit_code == 0, result.stderr
        outs.append(load_file(tmp_path / name / "student.safetensors"))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_gradient_accumulation_runs_and_records_the_batch_of_each_update(tmp_path, tiny_sd, prompts_file):
    out = tmp_path / "run"
    args = ["distill", *FAST, "--teacher", str(tiny_sd), "--prompts", str(prompts_file), "--out", str(out)]
    result = runner.invoke(app, [*args, "--batch-size", "1", "--gradient-accumulation-steps", "3"])
    assert result.exit_code == 0, result.stderr
    resolved = tomllib.loads((out / "config.toml").read_text())["resolved"]
    assert (resolved["gradient_accumulation_steps"], resolved["global_batch"]) == (3, 3)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_dm" in m for m in metrics) and any("loss_denoise" in m for m in metrics)

    # a global batch that the micro-batches cannot make: one line, no run folder
    result = runner.invoke(app, [*args[:-1], str(tmp_path / "other"), "--global-batch", "3"])
    assert result.exit_code == 2, result.stderr
    assert "--global-batch 3 is not a multiple of --batch-size 2 × 1 process(es) = 2" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "other").exists()


def test_the_command_lines_batch_of_an_update_replaces_the_recipes_other_way_of_saying_it(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('extends = "tiny"\ngradient_accumulation_steps = 4\n')
    overrides = {"teacher": "x", "prompts": "p.txt"}
    config = resolve_config(str(recipe), {**overrides, "global_batch": 8})
    assert (config.global_batch, config.gradient_accumulation_steps) == (8, 1)
    recipe.write_text('extends = "tiny"\nglobal_batch = 16\n')
    config = resolve_config(str(recipe), {**overrides, "gradient_accumulation_steps": 2})
    assert (config.global_batch, config.gradient_accumulation_steps) == (None, 2)
    assert resolve_config(str(recipe), overrides).global_batch == 16


def test_a_student_trains_on_a_ladder_of_its_own(tmp_path, tiny_sd, prompts_file):
    out = tmp_path / "run"
    args = ["distill", *FAST, "--teacher", str(tiny_sd), "--prompts", str(prompts_file), "--out", str(out)]
    result = runner.invoke(app, [*args, "--student-timesteps", "999, 599, 199", "--json"])  # --steps 3 from it
    assert result.exit_code == 0, result.stderr
    info = read_student_info(out / "student.safetensors")
    assert (info["steps"], info["timesteps"], info["conditioning_timestep"]) == (3, [999, 599, 199], None)
    # a recipe's conditioning timestep (shapes-flow's 999) gives way to the ladder, which a 1-step student is told
    one = tmp_path / "one"
    result = runner.invoke(app, [*args[:-1], str(one), "--student-timesteps", "599", "--conditioning-timestep", "399"])
    assert result.exit_code == 0, result.stderr
    info = read_student_info(one / "student.safetensors")
    assert (info["steps"], info["timesteps"], info["conditioning_timestep"]) == (1, [599], 599)


def test_recipe_values_are_overridden_by_options_and_unknown_keys_are_listed(tmp_path):
    config = resolve_config("sdxl-4step-lora", {"lr": 1e-3, "prompts": "p.txt"})
    assert config.lr == 1e-3 and config.lora_rank == 64 and config.lora_alpha == 8 and config.steps == 4
    bad = tmp_path / "bad.toml"
    bad.write_text('teacher = "sdxl"\nlearning_rate = 1e-4\n')
    result = runner.invoke(app, ["distill", "--recipe", str(bad), "--prompts", "p.txt"])
    assert result.exit_code == 2
    assert (
        "unknown key(s) learning_rate" in result.stderr
        and "valid keys:" in result.stderr
        and "lora_rank" in result.stderr
    )


def test_a_recipe_can_hold_values_for_one_step_count(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        'teacher = "sdxl"\nprompts = "p.txt"\nsteps = 4\nlr = 5e-5\nwarmup_steps = 7\n\n[per_steps.1]\nlr = 1e-4\n'
        'conditioning_timestep = 399\n'
    )
    four, one = resolve_config(str(recipe), {}), resolve_config(str(recipe), {"steps": 1})
    assert (four.lr, four.conditioning_timestep) == (5e-5, None)
    assert (one.lr, one.conditioning_timestep, one.warmup_steps) == (1e-4, 399, 7)  # the rest: the recipe's
    assert resolve_config(str(recipe), {"steps": 1, "lr": 3e-5}).lr == 3e-5  # the command line still wins
    # The built-in shapes recipe: half the LR for its default 4 steps, TTUR 2 for 1 step (README,
    # Benchmark); DMD (v1)'s preset (fake score every iteration) still wins over the recipe's TTUR.
    shapes4, shapes1 = resolve_config("shapes", {}), resolve_config("shapes", {"steps": 1})
    assert (shapes4.lr, shapes4.fake_updates_per_gen, shapes1.lr, shapes1.fake_updates_per_gen) == (5e-5, 5, 1e-4, 2)
    assert (shapes4.ema_decay, shapes1.ema_decay) == (0.95, 0.0)  # measured at 4 steps only
    assert resolve_config("shapes", {"steps": 1, "method": "dmd"}).fake_updates_per_gen == 1

    recipe.write_text('steps = 4\n[per_steps.1]\nlearning_rate = 1e-4\n')
    result = runner.invoke(app, ["distill", "--recipe", str(recipe), "--teacher", "sdxl", "--prompts", "p.txt"])
    assert result.exit_code == 2 and "[per_steps.1]: unknown key(s) learning_rate" in result.stderr, result.stderr
    recipe.write_text('steps = 4\n[per_steps]\nlr = 1e-4\n')
    result = runner.invoke(app, ["distill", "--recipe", str(recipe), "--teacher", "sdxl", "--prompts", "p.txt"])
    assert result.exit_code == 2 and "tables named by a step count" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "layout,args,recipe",
    [
        ("sdxl", ["--steps", "4"], "sdxl-4step"),
        ("sdxl", ["--steps", "2", "--lora-rank", "8"], "sdxl-4step-lora"),
        ("sdxl", [], "sdxl-1step"),
        ("sd", ["--steps", "4"], None),
    ],
)
def test_a_teacher_without_a_recipe_gets_its_layouts_reference_values(request, prompts_file, layout, args, recipe):
    teacher = str(request.getfixturevalue(f"tiny_{layout}"))
    result = runner.invoke(
        app, ["distill", "--teacher", teacher, "--prompts", str(prompts_file), "--dry-run", "--json", *args]
    )
    assert result.exit_code == 0, result.stderr
    config = json.loads(result.stdout)["config"]
    given = {
        "teacher": teacher,
        "prompts": str(prompts_file),
        "steps": int(args[1]) if args else None,
        "lora_rank": int(args[3]) if len(args) > 2 else None,
    }
    expected = resolve_config(recipe, {k: v for k, v in given.items() if v is not None}).to_dict()
    assert config == expected
    if recipe:  # SDXL: CFG 8, TTUR 5, GAN 5e-3 (not SD1.5's 1.75, 10, 1e-3), and the run says which recipe
        assert (config["guidance_scale"], config["fake_updates_per_gen"], config["gan_generator_weight"]) == (
            8.0,
            5,
            5e-3,
        )
        assert f"recipe {recipe}: chosen for an SDXL teacher, with the reference's values" in result.stderr
    else:
        assert config["guidance_scale"] == 1.75 and "recipe" not in result.stderr


def test_lr_schedules_warm_up_then_hold_or_decay_to_zero():
    warmup, steps = 4, 20
    for shape in ("constant", "cosine", "linear"):
        ramp = [lr_factor(n, warmup, steps, shape) for n in range(warmup)]
        assert ramp == [0.25, 0.5, 0.75, 1.0], shape  # the first update already learns
    after = {
        shape: [lr_factor(n, warmup, steps, shape) for n in range(warmup, steps)]
        for shape in ("constant", "cosine", "linear")
    }
    assert after["constant"] == [1.0] * (steps - warmup)
    for shape in ("cosine", "linear"):
        decay = after[shape]
        assert decay[0] == 1.0 and all(a > b for a, b in zip(decay, decay[1:])) and 0 < decay[-1] < 0.1, shape
        assert lr_factor(steps, warmup, steps, shape) == pytest.approx(0.0, abs=1e-12)  # reaches 0 just after the run
    half = warmup + (steps - warmup) // 2
    assert lr_factor(half, warmup, steps, "cosine") == pytest.approx(0.5)
    assert lr_factor(half, warmup, steps, "linear") == pytest.approx(0.5)
    assert lr_factor(steps + 5, warmup, steps, "cosine") == pytest.approx(0.0, abs=1e-12)  # a shortened run stays at 0


@pytest.mark.parametrize(
    "args,message",
    [
        (["--teacher", "/nonexistent/teacher", "--prompts", "p.txt"], "teacher not found"),
        (["--teacher", "sdxl", "--steps", "0", "--prompts", "p.txt"], "--steps must lie in 1 … 1000"),
        (["--teacher", "sdxl", "--steps", "2000", "--prompts", "p.txt"], "--steps must lie in 1 … 1000"),
        (["--prompts", "p.txt"], "--prompts/--data without --teacher"),  # a forgotten --teacher, not the shapes teacher
        (["--teacher", "sdxl"], "no prompts"),
        (["--recipe", "no-such-recipe"], "unknown recipe"),
        (
            ["--teacher", "sdxl", "--prompts", "p.txt", "--lr-schedule", "step"],
            "--lr-schedule must be one of constant, cosine, linear",
        ),
        (
            ["--teacher", "sd15", "--prompts", "p.txt", "--method", "progressive", "--init-from", "runs/a"],
            "drop --init-from",
        ),
        (
            ["--teacher", "sd15", "--prompts", "p.txt", "--diffusion-gan-max-timestep", "0"],
            "--diffusion-gan-max-timestep must lie in 1 … 1000",
        ),
        (
            ["--teacher", "sd15", "--prompts", "p.txt", "--diffusion-gan-max-timestep", "1001"],
            "--diffusion-gan-max-timestep must lie in 1 … 1000",
        ),
        (["--teacher", "sd15", "--prompts", "p.txt", "--warmup-steps", "-1"], "--warmup-steps must be ≥ 0"),
        (
            ["--teacher", "sd15", "--prompts", "p.txt", "--lr-schedule", "cosine", "--iterations", "500"],
            "--lr-schedule cosine decays after the warm-up",
        ),
        (["--teacher", "sd15", "--prompts", "p.txt", "--seed", "-1"], "--seed must lie in 0 … 2147483647"),
        (["--teacher", "sd15", "--prompts", "p.txt", "--seed", str(2**32)], "--seed must lie in 0 … 2147483647"),
        (
            ["--teacher", "sd15", "--prompts", "p.txt", "--lora-rank", "4", "--lora-alpha", "0"],
            "--lora-alpha must be positive",
        ),
        # An option the method does not read (progressive once ran 4 rounds × 1000 iterations here)
        (
            ["--teacher", "sd15", "--prompts", "p.txt", "--method", "progressive", "--steps", "4", "--iterations", "4"],
            "--method progressive does not read --iterations (read by --method dmd2 and dmd); "
            "it reads --iterations-per-round",
        ),
        (
            ["--teacher", "sd15", "--prompts", "p.txt", "--method", "dmd", "--diffusion-gan"],
            "--method dmd does not read --diffusion-gan (read by --method dmd2)",
        ),
        (
            ["--teacher", "sd15", "--prompts", "p.txt", "--teacher-steps", "8"],
            "--method dmd2 does not read --teacher-steps",
        ),
        (
            ["--teacher", "sd15", "--prompts", "p.txt", "--gan-same-noise", "--no-diffusion-gan"],
            "--gan-same-noise draws the diffusion GAN's noise once for real and fake latents: it needs --diffusion-gan",
        ),
        (
            ["--teacher", "sd15", "--prompts", "p.txt", "--student-timesteps", "999,x"],
            "--student-timesteps '999,x': not a comma list of whole numbers",
        ),
        (
            ["--teacher", "sd15", "--prompts", "p.txt", "--student-timesteps", "499,999"],
            "--student-timesteps '499,999': need decreasing timesteps in [0, 999]",
        ),
        (
            ["--teacher", "sd15", "--prompts", "p.txt", "--student-timesteps", "999,499", "--steps", "3"],
            "--student-timesteps '999,499' gives 2 step(s) but --steps is 3",
        ),
        (
            ["--teacher", "sd15", "--prompts", "p.txt", "--gradient-accumulation-steps", "0"],
            "--gradient-accumulation-steps must be at least 1",
        ),
        (
            ["--teacher", "sd15", "--prompts", "p.txt", "--global-batch", "8", "--gradient-accumulation-steps", "2"],
            "give --global-batch or --gradient-accumulation-steps, not both",
        ),
        (
            ["--teacher", "sd15", "--prompts", "p.txt", "--dry-run", "--global-batch", "3"],
            "--global-batch 3 is not a multiple of --batch-size 2",
        ),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(args, message):
    result = runner.invoke(app, ["distill", *args])
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_mistyped_teacher_folder_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teachers").mkdir()
    result = runner.invoke(app, ["distill", "--teacher", "teachers/typo", "--prompts", "p.txt", "--dry-run"])
    assert result.exit_code == 2 and "teacher not found: teachers/typo" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "line,message",
    [
        ('iterations = "five"', "iterations = 'five' is not a whole number"),
        ('steps = 4.5', "steps = 4.5 is not a whole number"),
        ('lr = "1e-4"', "lr = '1e-4' is not a number"),
        ('shared_base = 1', "shared_base = 1 is not true or false"),
    ],
)
def test_a_recipe_value_of_the_wrong_type_is_one_line(tmp_path, line, message):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'teacher = "sdxl"\nprompts = "p.txt"\n{line}\n')
    for args in (["--recipe", str(recipe)], ["--recipe", str(recipe), "--dry-run"]):
        result = runner.invoke(app, ["distill", *args])
        assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    recipe.write_text(f'teacher = "sdxl"\n[per_steps.4]\n{line}\n')
    result = runner.invoke(app, ["distill", "--recipe", str(recipe), "--steps", "4", "--prompts", "p.txt"])
    assert result.exit_code == 2 and "[per_steps.4]" in result.stderr and message in result.stderr, result.stderr


def test_out_must_be_a_run_or_a_new_folder(tmp_path, tiny_sd, prompts_file):
    args = ["distill", *FAST, "--iterations", "1", "--teacher", str(tiny_sd), "--prompts", str(prompts_file)]
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    result = runner.invoke(app, [*args, "--out", str(victim), "--overwrite"])
    assert result.exit_code == 2 and "is a file" in result.stderr and victim.read_text() == "keep me"
    result = runner.invoke(app, [*args, "--out", str(victim / "run")])
    assert result.exit_code == 2 and "which is a file" in result.stderr and victim.read_text() == "keep me"
    data = tmp_path / "data"
    data.mkdir()
    (data / "0.txt").write_text("a caption")
    result = runner.invoke(app, [*args, "--out", str(data), "--overwrite"])
    assert (
        result.exit_code == 2
        and "not a dmd run" in result.stderr
        and sorted(p.name for p in data.iterdir()) == ["0.txt"]
    )

    # --overwrite replaces a run with everything made from its student (exports, evaluations) and
    # by the run (a progressive run's rounds).
    run = tmp_path / "run"
    assert runner.invoke(app, [*args, "--out", str(run)]).exit_code == 0
    for old in (
        run / "export" / "unet.safetensors",
        run / "eval-shapes-2000.json",
        run / "eval-shapes-2000" / "0.png",
        run / "eval-shapes-2000-grid.png",
        run / "rounds" / "round-1-2step.safetensors",
    ):
        old.parent.mkdir(parents=True, exist_ok=True)
        old.write_text("from the old student")
    (run / "notes.md").write_text("mine")
    (run / "eval-notes.txt").write_text("mine too")
    assert runner.invoke(app, [*args, "--out", str(run), "--overwrite"]).exit_code == 0
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints",
        "config.toml",
        "eval-notes.txt",
        "metrics.jsonl",
        "notes.md",
        "samples",
        "student.safetensors",
    ]


def test_a_run_made_with_relative_paths_works_from_anywhere(tmp_path, tiny_sd, prompts_file, monkeypatch):
    import shutil

    here = tmp_path / "here"
    here.mkdir()
    shutil.copytree(tiny_sd, here / "teacher")
    shutil.copy(prompts_file, here / "prompts.txt")
    monkeypatch.chdir(here)
    args = [*FAST, "--iterations", "2", "--checkpoint-every", "1", "--teacher", "teacher", "--prompts", "prompts.txt"]
    assert runner.invoke(app, ["distill", *args, "--out", "run"]).exit_code == 0
    config = (here / "run" / "config.toml").read_text()
    assert f'teacher = "{here / "teacher"}"' in config and f'prompts = "{here / "prompts.txt"}"' in config
    assert read_student_info(here / "run" / "student.safetensors")["teacher"] == str(here / "teacher")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = runner.invoke(app, ["sample", "--model", "../here/run", "--prompt", "a", "--out", "images", "--quiet"])
    assert result.exit_code == 0 and len(list((elsewhere / "images").iterdir())) == 1, result.stderr
    result = runner.invoke(app, ["distill", "--out", "../here/run", "--resume", "--iterations", "3", "--quiet"])
    assert result.exit_code == 0, result.stderr


def test_a_failed_start_leaves_no_run_folder_and_a_run_is_not_overwritten(tmp_path, tiny_sd, prompts_file):
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["distill", "--teacher", str(tiny_sd), "--prompts", str(tmp_path / "missing.txt"), "--out", str(out)]
    )
    assert result.exit_code == 2 and "prompts file not found" in result.stderr
    assert not out.exists()
    args = [
        "distill",
        *FAST,
        "--iterations",
        "1",
        "--teacher",
        str(tiny_sd),
        "--prompts",
        str(prompts_file),
        "--out",
        str(out),
    ]
    assert runner.invoke(app, args).exit_code == 0
    student = (out / "student.safetensors").read_bytes()
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already holds a run" in again.stderr
    assert (out / "student.safetensors").read_bytes() == student


def test_v_prediction_teacher_distills(tmp_path, prompts_file):
    from dmdcli.models.tiny import tiny_pipeline_cached

    teacher = tiny_pipeline_cached("sd", "v_prediction")
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["distill", *FAST, "--teacher", str(teacher), "--prompts", str(prompts_file), "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.stderr
    assert read_student_info(out / "student.safetensors")["prediction_type"] == "v_prediction"
    assert all(torch.isfinite(torch.tensor(v)) for v in json.loads(result.stdout)["losses"].values())


def test_a_replaced_vae_is_not_served_the_old_latents(tmp_path, tiny_sd):
    from dmdcli.models.pipeline import load_teacher

    folder = shutil.copytree(tiny_sd, tmp_path / "teacher")
    teacher = load_teacher(inspect_teacher(str(folder)), torch.device("cpu"), torch.float32, 32)
    before = teacher.latent_cache_id
    weights = next((folder / "vae").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b" ")  # another VAE file in the same folder
    after = teacher.latent_cache_id
    assert after != before
    (folder / "unet" / "config.json").write_text((folder / "unet" / "config.json").read_text() + " ")
    assert teacher.latent_cache_id == after  # the UNet does not encode images


def test_teacher_detection(tiny_sd, tiny_sdxl, tmp_path):
    assert inspect_teacher(str(tiny_sd)).layout == "sd"
    spec = inspect_teacher(str(tiny_sdxl))
    assert spec.layout == "sdxl" and spec.prediction_type == "epsilon" and spec.native_resolution == 32
    not_pipeline = tmp_path / "folder"
    not_pipeline.mkdir()
    result = runner.invoke(app, ["distill", "--teacher", str(not_pipeline), "--prompts", "p.txt"])
    assert result.exit_code == 2 and "not a diffusers pipeline folder" in result.stderr
    (not_pipeline / "model_index.json").write_text(
        json.dumps({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]})
    )
    result = runner.invoke(app, ["distill", "--teacher", str(not_pipeline), "--prompts", "p.txt"])
    assert result.exit_code == 1 and "unsupported pipeline FluxPipeline" in result.stderr
    # A pipeline missing a config file, or with one that is not JSON: one line, not a default schedule.
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_sd, damaged)
    (damaged / "scheduler" / "scheduler_config.json").unlink()
    result = runner.invoke(app, ["distill", "--teacher", str(damaged), "--prompts", "p.txt", "--dry-run"])
    assert result.exit_code == 1 and "scheduler/scheduler_config.json is missing" in result.stderr, result.stderr
    (damaged / "scheduler" / "scheduler_config.json").write_text("{not json")
    result = runner.invoke(app, ["distill", "--teacher", str(damaged), "--prompts", "p.txt", "--dry-run"])
    assert result.exit_code == 1 and "cannot read" in result.stderr and "Traceback" not in result.stderr, result.stderr
    # An SD-layout pipeline on an EDM schedule with normalized latents (Playground v2.5's way) would
    # train on DDPM's default betas and unnormalized latents: refused, one reason each.
    from diffusers import EDMDPMSolverMultistepScheduler

    EDMDPMSolverMultistepScheduler().save_pretrained(damaged / "scheduler")
    result = runner.invoke(app, ["distill", "--teacher", str(damaged), "--prompts", "p.txt", "--dry-run"])
    assert result.exit_code == 1 and "unsupported scheduler EDMDPMSolverMultistepScheduler" in result.stderr, (
        result.stderr
    )
    shutil.copy(tiny_sd / "scheduler" / "scheduler_config.json", damaged / "scheduler")
    vae = json.loads((damaged / "vae" / "config.json").read_text())
    (damaged / "vae" / "config.json").write_text(
        json.dumps({**vae, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4})
    )
    result = runner.invoke(app, ["distill", "--teacher", str(damaged), "--prompts", "p.txt", "--dry-run"])
    assert result.exit_code == 1 and "its latents are normalized (latents_mean, latents_std)" in result.stderr, (
        result.stderr
    )


def test_lora_weights_that_do_not_fit_name_their_keys(tiny_sd):
    from diffusers import UNet2DConditionModel

    from dmdcli.models.lora import GENERATOR_ADAPTER, add_generator_lora, load_lora_state_dict, lora_state_dict
    from dmdcli.models.sd import UNET_LORA_TARGETS

    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd), subfolder="unet")
    add_generator_lora(unet, 4, 4, UNET_LORA_TARGETS)
    state = lora_state_dict(unet)
    load_lora_state_dict(unet, state)  # its own weights fit
    dropped = sorted(state)[0]
    with pytest.raises(
        ValueError, match="missing keys: " + dropped.split(".lora_")[0]
    ):  # named with the adapter's name
        load_lora_state_dict(unet, {k: v for k, v in state.items() if k != dropped})
    with pytest.raises(ValueError, match="unexpected keys: extra.lora_A"):
        load_lora_state_dict(unet, {**state, "extra.lora_A.weight": torch.zeros(1)})
    # The reference's LoraConfig init (peft's default): B zero, A Kaiming-uniform within 1/sqrt(fan_in)
    # (a gaussian A of std 1/rank, peft's other choice, spreads past that bound).
    linears = [m for m in unet.modules() if hasattr(m, "lora_A") and isinstance(m.base_layer, torch.nn.Linear)]
    assert linears and all(not m.lora_B[GENERATOR_ADAPTER].weight.any() for m in linears)
    assert all(m.lora_A[GENERATOR_ADAPTER].weight.abs().max() <= m.in_features**-0.5 for m in linears)


@pytest.mark.parametrize("shared", [True, False])
def test_lora_layouts(tmp_path, tiny_sdxl, prompts_file, image_folder, shared):
    config = resolve_config(
        "tiny",
        {
            "teacher": str(tiny_sdxl),
            "prompts": str(prompts_file),
            "data": str(image_folder),
            "iterations": 2,
            "fake_updates_per_gen": 1,
            "batch_size": 2,
            "out": str(tmp_path / "run"),
            "lora_rank": 4,
            "fake_lora_rank": 2,
            "shared_base": shared,
            "teacher_grid_steps": 0,
        },
    )
    run = Distillation(config, SilentUI())
    teacher_ids = {id(p) for p in run.teacher.network.parameters()}
    frozen = lambda m: [p for p in m.parameters() if not p.requires_grad]  # noqa: E731
    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    if shared:  # one set of base weights: the frozen parameters of all three trees are the teacher's
        assert all(id(p) in teacher_ids for p in frozen(run.nets.generator_unet) + frozen(run.nets.fake_unet))
        assert all("lora" in n for n, p in run.nets.fake_unet.named_parameters() if p.requires_grad)
        ranks = {p.shape[0] for n, p in run.nets.fake_unet.named_parameters() if "lora_A" in n}
        assert ranks == {2}
    else:  # the reference layout: a full trainable fake score and the generator on its own copy
        assert not any(id(p) in teacher_ids for p in run.nets.fake_unet.parameters())
        assert len(trainable(run.nets.fake_unet)) == len(list(run.teacher.network.parameters()))
    teacher_before = {k: v.clone() for k, v in run.teacher.network.state_dict().items()}
    lora_before = {
        id(p): p.detach().clone() for p in trainable(run.nets.generator_unet) + trainable(run.nets.fake_unet)
    }
    run.run()
    assert all(torch.equal(v, run.teacher.network.state_dict()[k]) for k, v in teacher_before.items())
    moved = [
        p
        for p in trainable(run.nets.generator_unet) + trainable(run.nets.fake_unet)
        if not torch.equal(p, lora_before[id(p)])
    ]
    assert len(moved) > 0.5 * len(lora_before)
    # The teacher's forward is that of a fresh copy from disk: no adapter leaks into it.
    from diffusers import UNet2DConditionModel

    from dmdcli.models.unet import UNetDenoiser

    fresh = UNetDenoiser(UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet"))
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    cond = run.encode(["a red circle"])  # the run's prompts are cached and its text encoders released
    assert torch.equal(run.step.dmd2.real_score(x, t, cond), fresh(x, t, cond))


def bf16_lora_config(teacher, prompts_file, image_folder, out, shared: bool):
    """Two iterations of a rank-4 LoRA run under bf16 mixed precision (the layout a GPU run uses)."""
    values = {"teacher": str(teacher), "prompts": str(prompts_file), "data": str(image_folder), "out": str(out)}
    values |= {"iterations": 2, "fake_updates_per_gen": 1, "batch_size": 2, "steps": 2, "lora_rank": 4}
    values |= {"shared_base": shared, "mixed_precision": "bf16", "teacher_grid_steps": 0, "sample_every": 0}
    return resolve_config("tiny", values)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.usefixtures("fresh_accelerator_state")
def test_bf16_keeps_frozen_weights_in_bf16_and_trained_weights_in_fp32(
    tmp_path, tiny_sd, prompts_file, image_folder, shared
):
    """--mixed-precision bf16 on the CPU runs the layout a GPU run uses: the frozen teacher (and a
    shared LoRA base) in bf16 under autocast, every trained weight, its AdamW state and the saved
    student in fp32, the VAE in fp32."""
    run = Distillation(bf16_lora_config(tiny_sd, prompts_file, image_folder, tmp_path / "run", shared), SilentUI())
    assert run.accelerator.mixed_precision == "bf16"
    assert {p.dtype for p in run.teacher.network.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in run.teacher.vae.parameters()} == {torch.float32}
    nets = run.nets
    trained = nets.generator_params + nets.fake_params
    assert {p.dtype for p in trained} == {torch.float32}
    frozen = [p for m in (nets.generator_unet, nets.fake_unet) for p in m.parameters() if not p.requires_grad]
    # Shared base: the frozen weights under both adapters are the teacher's bf16 ones. Reference
    # layout: the generator's LoRA sits on its own fp32 copy (the fake score is trained whole).
    assert {p.dtype for p in frozen} == {torch.bfloat16 if shared else torch.float32}
    before = [p.detach().clone() for p in trained]
    run.run()
    assert sum(not torch.equal(b, p) for b, p in zip(before, trained)) > 0.5 * len(trained)
    losses = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    values = [v for r in losses for k, v in r.items() if k.startswith("loss_")]
    assert values and all(torch.isfinite(torch.tensor(values)))
    assert {v.dtype for v in load_file(tmp_path / "run" / "student.safetensors").values()} == {torch.float32}
    checkpoint = next((tmp_path / "run" / "checkpoints").iterdir()) / "tensors.safetensors"
    assert {v.dtype for k, v in load_file(checkpoint).items() if not k.startswith("rng")} == {torch.float32}


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_a_shared_base_is_read_in_bf16_and_trains_the_student_of_one_read_in_fp32_and_cast(
    tmp_path, tiny_sd, prompts_file, image_folder, monkeypatch
):
    """Shared-base LoRA never trains the teacher's network in fp32, so the network is read in the
    frozen dtype (bf16) straight onto the device, not in fp32 on the host first; the student is
    bit for bit the one of a network read in fp32 and cast after."""
    from accelerate.state import AcceleratorState

    import dmdcli.models.pipeline as pipeline
    from dmdcli.train.layouts import SharedBaseLora

    reads, read = [], pipeline.from_pretrained

    def spy(cls, spec, subfolder, allow_pickle, **kwargs):
        reads.append((subfolder, kwargs.get("torch_dtype")))
        return read(cls, spec, subfolder, allow_pickle, **kwargs)

    monkeypatch.setattr(pipeline, "from_pretrained", spy)
    students = {}
    for lean in (True, False):
        monkeypatch.setattr(SharedBaseLora, "frozen_network", lean)
        AcceleratorState._reset_state()
        reads.clear()
        config = bf16_lora_config(tiny_sd, prompts_file, image_folder, tmp_path / f"run-{lean}", shared=True)
        Distillation(config, SilentUI()).run()
        assert ("unet", torch.bfloat16 if lean else None) in reads
        students[lean] = load_file(tmp_path / f"run-{lean}" / "student.safetensors")
    lean, cast = students[True], students[False]
    assert lean.keys() == cast.keys() and all(torch.equal(lean[k], cast[k]) for k in lean)


def test_regression_pairs_of_a_bf16_network_are_keyed_apart_from_those_of_an_fp32_one():
    from dmdcli.data.pairs import pair_key_inputs

    common = ({"teacher": "t"}, ["a"], 0, 25, 3.0, 32, 8, "bf16")
    fp32, bf16 = pair_key_inputs(*common), pair_key_inputs(*common, "bfloat16")
    assert "weights_dtype" not in fp32  # as the key was before it named the weights: their caches are found
    assert bf16 == fp32 | {"weights_dtype": "bfloat16"}


def test_a_second_stage_recipe_without_init_from_says_it_starts_from_the_teacher(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the dry run estimates from the bundled SD1.5 configs
    alone = runner.invoke(app, ["distill", "--recipe", "sd15-1step", "--prompts", "p.txt", "--dry-run"])
    assert alone.exit_code == 0 and "second stage of sd15-1step-stage1; without --init-from" in alone.stderr, (
        alone.stderr
    )
    first = runner.invoke(app, ["distill", "--recipe", "sd15-1step-stage1", "--prompts", "p.txt", "--dry-run"])
    assert first.exit_code == 0 and "second stage" not in first.stderr


def test_the_config_is_its_sections_and_help_lists_each_section_as_a_panel():
    """DistillConfig's fields are the SECTIONS' fields in their order, and `--help` shows each
    command-line field in its section's panel: an option added to a section needs no CLI edit."""
    from dataclasses import fields

    from dmdcli.train.config import COMMAND_LINE, FIELD_NAMES, SECTIONS

    assert FIELD_NAMES == [f.name for section in SECTIONS.values() for f in fields(section)]
    text = runner.invoke(app, ["distill", "--help"], env={"COLUMNS": "400"}).stdout
    panels = {title: text.index(f"─ {title} ─") for title in SECTIONS}
    assert list(panels.values()) == sorted(panels.values())  # the sections' order
    ends = [*list(panels.values())[1:], len(text)]
    for (title, start), end in zip(panels.items(), ends):
        for f in fields(SECTIONS[title]):
            flag = "--" + f.name.replace("_", "-") + " "
            assert (flag in text[start:end]) == (f.name in COMMAND_LINE), (title, f.name)


def test_each_option_is_defined_once_in_the_config_and_its_help_shows_the_default():
    """The help of `dmd distill` is made from DistillConfig's fields (and the objective's, which it
    extends): every field but the recipe-only ones is an option whose help line states the default."""
    from dataclasses import fields

    from dmdcli.core.dmd2 import DMD2Config
    from dmdcli.train.config import DistillConfig, option_help

    recipe_only = {
        "min_timestep_frac",
        "max_timestep_frac",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "fused_optimizer",
    }
    text = " ".join(runner.invoke(app, ["distill", "--help"], env={"COLUMNS": "400"}).stdout.split())
    for f in fields(DistillConfig):
        flag = "--" + f.name.replace("_", "-")
        assert (flag in text) != (f.name in recipe_only), f.name
        if f.name not in recipe_only:
            assert " ".join(option_help(f.name).split()) in text, f.name
    assert "(default 1e-5)" in option_help("lr") and "(default on)" in option_help("shared_base")
    objective = {f.name: f.default for f in fields(DMD2Config)}
    assert {f.name: f.default for f in fields(DistillConfig) if f.name in objective} == objective
