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
