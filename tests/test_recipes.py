"""Recipes: `extends` (a variant states only what differs), and every built-in recipe loads."""

import re

import pytest
from typer.testing import CliRunner

from dmdcli.cli import app
from dmdcli.errors import UsageError
from dmdcli.train.recipes import list_recipes, load_recipe, recipe_continues, resolve_config

runner = CliRunner()


def test_a_recipe_extends_another_and_its_own_keys_win(tmp_path):
    (tmp_path / "base.toml").write_text(
        'teacher = "sdxl"\nsteps = 4\nlr = 5e-7\nbatch_size = 2\n[per_steps.1]\nlr = 1e-6\nfake_updates_per_gen = 2\n'
    )
    (tmp_path / "variant.toml").write_text(
        'extends = "base.toml"\nlr = 5e-5\nlora_rank = 64\n[per_steps.1]\nlr = 1e-4\n'
    )
    values = load_recipe(str(tmp_path / "variant.toml"))
    assert values == {
        "teacher": "sdxl",
        "steps": 4,
        "lr": 5e-5,
        "batch_size": 2,
        "lora_rank": 64,
        "per_steps": {1: {"lr": 1e-4, "fake_updates_per_gen": 2}},  # merged key by key
    }
    one = resolve_config(str(tmp_path / "variant.toml"), {"steps": 1, "prompts": "p.txt"})
    assert (one.lr, one.fake_updates_per_gen, one.lora_rank) == (1e-4, 2, 64)
    assert resolve_config(str(tmp_path / "variant.toml"), {"lr": 3e-5, "prompts": "p.txt"}).lr == 3e-5


def test_extends_follows_a_chain_of_files_and_built_in_names(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.toml").write_text('extends = "sdxl-4step-lora"\nbatch_size = 1\n')
    (tmp_path / "b.toml").write_text('extends = "sub/a.toml"\niterations = 10\n')  # relative to b.toml, not the cwd
    values = load_recipe(str(tmp_path / "b.toml"))
    assert values == {**load_recipe("sdxl-4step-lora"), "batch_size": 1, "iterations": 10}
    assert (values["lora_rank"], values["lr"], values["steps"]) == (64, 5e-5, 4)  # sdxl-4step-lora's over sdxl-4step's


def test_a_variant_of_a_second_stage_is_a_second_stage_too(tmp_path):
    (tmp_path / "r.toml").write_text('extends = "sd15-1step"\nbatch_size = 4\n')
    assert recipe_continues(str(tmp_path / "r.toml")) == "sd15-1step-stage1"
    assert recipe_continues("sd15-1step-stage1") is None


@pytest.mark.parametrize(
    "files,message",
    [
        ({"a.toml": 'extends = "a.toml"\n'}, "recipes extend each other in a cycle: {0}/a.toml → {0}/a.toml"),
        (
            {"a.toml": 'extends = "b.toml"\n', "b.toml": 'extends = "a.toml"\nsteps = 2\n'},
            "recipes extend each other in a cycle: {0}/a.toml → {0}/b.toml → {0}/a.toml",
        ),
        ({"a.toml": 'extends = "sdxl-4stp"\n'}, "recipe {0}/a.toml, extends = 'sdxl-4stp': unknown recipe 'sdxl-4stp'"),
        (
            {"a.toml": 'extends = "gone.toml"\n'},
            "recipe {0}/a.toml, extends = 'gone.toml': recipe file not found: {0}/gone.toml",
        ),
        ({"a.toml": "extends = 4\n"}, "recipe {0}/a.toml: extends = 4 is not a recipe name or path"),
        ({"a.toml": 'extends = "b.toml"\n', "b.toml": "learning_rate = 1\n"}, "recipe {0}/b.toml: unknown key(s)"),
    ],
)
def test_a_cycle_a_missing_base_or_a_bad_base_is_one_usage_line(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    expected = message.format(tmp_path)
    with pytest.raises(UsageError, match="^" + re.escape(expected)):
        load_recipe(str(tmp_path / "a.toml"))
    result = runner.invoke(app, ["distill", "--recipe", str(tmp_path / "a.toml"), "--prompts", "p.txt", "--dry-run"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert expected in " ".join(result.stderr.split()) and "Traceback" not in result.stderr


@pytest.mark.parametrize("name", list_recipes())
def test_every_built_in_recipe_loads_and_resolves(name):
    values = load_recipe(name)
    assert "extends" not in values and "description" not in values
    given = {"prompts": "p.txt"} if "teacher" in values else {"prompts": "p.txt", "teacher": "sd15"}
    assert resolve_config(name, given).teacher


# What each built-in variant changes in the recipe it extends, exactly.
VARIANTS = {
    "sdxl-4step-lora": ("sdxl-4step", {"lr": 5e-5, "lora_rank": 64, "lora_alpha": 8.0}),
    "sdxl-4step-fsdp": ("sdxl-4step", {"fsdp": True}),
    "flux-dev-fsdp": ("flux-dev", {"fsdp": True, "lora_rank": 0, "lr": 1e-5}),
    "sd15-1step": (
        "sd15-1step-stage1",
        {
            "gan_generator_weight": 1e-3,
            "gan_discriminator_weight": 1e-2,
            "diffusion_gan": True,
            "diffusion_gan_max_timestep": 1000,
            "lr": 5e-7,
            "iterations": 2000,
        },
    ),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_built_in_variants_are_their_base_and_their_own_keys(variant):
    base, differences = VARIANTS[variant]
    assert load_recipe(variant) == {**load_recipe(base), **differences}


def test_the_code_defaults_are_the_reference_sd15_stage_1():
    """An SD teacher without --recipe runs the code defaults: they must be one published run (the
    reference's SD1.5 stage 1: DM alone, lr 1e-5, CFG 1.75, TTUR 10), not a mix; only the run's
    length and size differ. A GAN, when weighted on, is the diffusion GAN up to t = 1000."""
    from dmdcli.models.families import get_family
    from dmdcli.train.config import DistillConfig

    defaults = DistillConfig()
    budget = {"teacher", "resolution", "batch_size", "iterations", "mixed_precision", "gradient_checkpointing"}
    stage1 = load_recipe("sd15-1step-stage1")
    budget.add("conditioning_timestep")  # None: the family's, checked below
    differ = {k: (getattr(defaults, k), v) for k, v in stage1.items() if k not in budget and getattr(defaults, k) != v}
    assert not differ and get_family("sd").conditioning_timestep == stage1["conditioning_timestep"]
    assert not defaults.gan_term() and (defaults.diffusion_gan, defaults.diffusion_gan_max_timestep) == (True, 1000)
    assert get_family("sd").recipe(1, None) is None  # the defaults themselves
