"""The options several commands share are declared once (dmdcli/cli/options.py), each command's
help still saying what the option does there; --resume's rules live with the configuration."""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import dmdcli.cli
from dmdcli.cli import app
from dmdcli.errors import UsageError
from dmdcli.train.recipes import resolve_config, second_stage_note
from dmdcli.train.resume import resumed_values

runner = CliRunner()
SHARED = (
    "--model", "--device", "--dtype", "--allow-pickle", "--seed", "--steps", "--guidance-scale", "--resolution",
    "--batch-size", "--overwrite", "--json", "--quiet",
)  # fmt: skip


def test_shared_options_are_declared_in_one_module():
    cli = Path(dmdcli.cli.__file__).parent
    for module in cli.glob("*.py"):
        if module.name != "options.py":
            declared = set(re.findall(r'"(--[a-z-]+)"', module.read_text())) & set(SHARED)
            assert not declared, f"{module.name} declares {declared} again; use dmdcli.cli.options"


def _help(command: str) -> str:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "400"})  # one line per option
    assert result.exit_code == 0
    return " ".join(result.stdout.split())


@pytest.mark.parametrize(
    "command,sentences",
    [
        ("distill", ["--json Print one JSON summary line on stdout at the end.", "-q No progress or messages"]),
        (
            "sample",
            ["--device <str> cuda, cuda:1, cpu, mps, or auto. [default: auto]", "Allow weights stored as pickle"],
        ),
        ("eval", ["or auto (generation and features).", "hub id); repeat to compare.", "messages or table on"]),
        ("export", ["--dtype <str> Weights' precision: fp32, fp16 or bf16. [default: fp32]", "Allow teacher weights"]),
    ],
)
def test_each_command_says_what_a_shared_option_does_there(command, sentences):
    text = _help(command)
    for sentence in sentences:
        assert sentence in text, sentence


def test_sample_and_eval_limit_steps_to_the_schedules_timesteps():
    for command in ("sample", "eval"):
        assert "--steps <int range> [1<=x<=1000]" in _help(command)
        result = runner.invoke(app, [command, "--model", "m", "--steps", "1001"])
        assert result.exit_code == 2 and "less than or equal to 1000" in result.stderr, result.stderr


def test_resume_takes_the_run_folders_values_and_nothing_that_would_choose_others(tmp_path):
    with pytest.raises(UsageError, match="^--resume needs --out RUN"):
        resumed_values(None, False, None, None)
    for overwrite, recipe, init_from in ((True, None, None), (False, "tiny", None), (False, None, "runs/a")):
        with pytest.raises(UsageError, match="drop --overwrite/--recipe/--init-from"):
            resumed_values(str(tmp_path), overwrite, recipe, init_from)
    with pytest.raises(UsageError, match="nothing to resume"):
        resumed_values(str(tmp_path), False, None, None)
    (tmp_path / "config.toml").write_text('teacher = "sdxl"\nsteps = 4\nresolved = { layout = "sdxl" }\n')
    # a key added since (fused_optimizer) goes on as the run had it: torch's default AdamW
    assert resumed_values(str(tmp_path), False, None, None) == {"teacher": "sdxl", "steps": 4, "fused_optimizer": False}


def test_only_a_second_stage_without_init_from_is_told_it_starts_from_the_teacher(tmp_path):
    alone = resolve_config("sd15-1step", {"prompts": "p.txt"})
    assert second_stage_note("sd15-1step", alone).startswith("note: recipe sd15-1step is the second stage of")
    chained = resolve_config("sd15-1step", {"prompts": "p.txt", "init_from": str(tmp_path)})
    assert second_stage_note("sd15-1step", chained) is None
    assert second_stage_note("sd15-1step-stage1", alone) is None and second_stage_note(None, alone) is None
