"""`dmd distill` with no arguments distills the built-in shapes teacher (the README's main job)."""

import json

import pytest
from typer.testing import CliRunner

from dmdcli.cli import app
from dmdcli.shapes import data as shapes_data
from dmdcli.shapes import teacher_path

pytestmark = pytest.mark.skipif(not (teacher_path() / "model_index.json").is_file(), reason="shapes teacher not built")


def test_no_arguments_runs_the_shapes_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("DMD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(shapes_data, "DATA_IMAGES", 64)  # the full recipe renders 2048 scenes
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        app, ["distill", "--iterations", "2", "--batch-size", "2", "--teacher-grid-steps", "2", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["iterations"] == 2 and set(summary["losses"]) == {
        "loss_dm",
        "loss_gan_g",
        "loss_denoise",
        "loss_gan_d",
    }
    config = (tmp_path / summary["out"] / "config.toml").read_text()
    assert 'teacher = "shapes"' in config and 'data = "shapes"' in config
    assert "next: dmd sample" in result.stderr
    hint = result.stderr[result.stderr.index("next:") :]  # a prompt the world knows, and its own benchmark
    assert '--prompt "a large red circle at the top left' in hint and "--fid" not in hint
    rendered = list((tmp_path / "cache" / "shapes").iterdir())
    assert len(rendered) == 1 and len(list(rendered[0].glob("*.png"))) == 64


def test_the_flow_teacher_distills_with_its_recipe_and_scores_on_the_shapes_set(tmp_path, monkeypatch):
    """`--teacher shapes-flow` alone: its recipe (the shapes data, a GAN), then `dmd eval` with the
    shapes world's own set by default."""
    monkeypatch.setenv("DMD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(shapes_data, "DATA_IMAGES", 64)
    monkeypatch.chdir(tmp_path)
    args = ["distill", "--teacher", "shapes-flow", "--steps", "1", "--iterations", "2", "--batch-size", "2"]
    result = CliRunner().invoke(app, [*args, "--teacher-grid-steps", "2", "--out", "run", "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert "loss_gan_g" in summary["losses"]
    config = (tmp_path / "run" / "config.toml").read_text()
    assert 'teacher = "shapes-flow"' in config and 'prediction_type = "flow"' in config
    assert "conditioning_timestep = 999" in config  # a flow student starts from pure noise
    scored = CliRunner().invoke(app, ["eval", "--model", "run", "--num-samples", "16", "--out", "eval", "--json"])
    assert scored.exit_code == 0, scored.stderr
    metrics = json.loads(scored.stdout.splitlines()[-1])["metrics"]
    assert 0 <= metrics["alignment"] <= 1 and metrics["fd_shapes"] > 0
