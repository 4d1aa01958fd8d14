"""The built-in shapes world: data determinism, captions, the feature network, the shipped teacher."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dmdcli.shapes import features_path, flow_teacher_path, teacher_path, world
from dmdcli.shapes.features import (
    alignment,
    attribute_accuracy,
    fd_shapes,
    frechet_distance,
    sample_teacher,
)

# ----------------------------------------------------------------------------- the world


def test_same_seed_same_scenes_images_and_captions():
    a, b = world.scenes(11, 40), world.scenes(11, 40)
    assert a == b
    assert np.array_equal(world.render_array(a), world.render_array(b))
    assert [world.caption(s) for s in a] == [world.caption(s) for s in b]
    assert world.scenes(11, 10, start=30) == a[30:]  # scene i never depends on how many are drawn
    other = world.scenes(12, 40)
    assert [world.caption(s) for s in other] != [world.caption(s) for s in a]
    assert not np.array_equal(world.render_array(other), world.render_array(a))


def test_scenes_cover_every_attribute():
    objects = [o for s in world.scenes(0, 400) for o in s.objects]
    assert {o.shape for o in objects} == set(world.SHAPES)
    assert {o.color for o in objects} == set(world.COLORS)
    assert {o.size for o in objects} == set(world.SIZES)
    assert {o.position for o in objects} == set(world.POSITIONS)
    assert {s.background for s in world.scenes(0, 400)} == set(world.BACKGROUNDS)
    assert {len(s.objects) for s in world.scenes(0, 400)} == {1, 2}


def test_written_folder_is_deterministic_and_readable_as_data(tmp_path):
    from dmdcli.data.images import scan_image_folder
    from dmdcli.data.prompts import read_prompts

    one = world.write_dataset(tmp_path / "one", 6, seed=3)
    two = world.write_dataset(tmp_path / "two", 6, seed=3)
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir()) and len(names) == 12
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes()
    scan = scan_image_folder(one)
    expected = [world.caption(s) for s in world.scenes(3, 6)]
    assert [caption for _, caption in scan.items] == expected and not scan.skipped
    meta = scan_image_folder(world.write_dataset(tmp_path / "meta", 6, seed=3, metadata=True))
    assert [caption for _, caption in meta.items] == expected
    assert read_prompts(world.write_prompts(tmp_path / "prompts.txt", 6, seed=3)) == expected


def test_caption_round_trip():
    for scene in world.scenes(5, 300):
        text = world.caption(scene)
        assert world.parse_caption(text).attributes() == scene.attributes()
        assert world.parse_caption(text.upper() + ".").attributes() == scene.attributes()
        assert world.scene_from_labels(world.scene_labels(scene)).attributes() == scene.attributes()
    swapped = "a large blue square at the bottom right and a small red circle at the top left on a gray background"
    parsed = world.parse_caption(swapped)
    assert [o.position for o in parsed.objects] == ["top left", "bottom right"]
    for bad in [
        "a red circle",
        "a small red circle at the top left",
        "a small red circle at the top left and a large red circle at the top left on a white background",
    ]:
        with pytest.raises(ValueError):
            world.parse_caption(bad)


def test_every_caption_word_is_one_token():
    from dmdcli.shapes.tokenizer import make_shapes_tokenizer

    tokenizer = make_shapes_tokenizer()
    for word in world.iter_vocabulary():
        assert len(tokenizer(word).input_ids) == 3, word  # <bos> word <eos>
    text = world.caption(world.scenes(0, 1)[0])
    assert len(tokenizer(text).input_ids) == len(text.split()) + 2
    assert len(tokenizer("an unknown zebra!").input_ids) > 3  # other text still tokenizes
    longest = max((world.caption(s) for s in world.scenes(0, 2000)), key=lambda c: len(c.split()))
    assert len(tokenizer(longest).input_ids) <= tokenizer.model_max_length


# ----------------------------------------------------------------------------- feature network


def test_feature_net_reads_fresh_scenes():
    assert features_path().is_file()
    fresh = world.scenes(424242, 500)
    acc = attribute_accuracy(world.render_array(fresh), fresh)
    for name in ("background", "shape", "color", "size"):
        assert acc[name] >= 0.95, acc
    assert alignment(world.render_array(fresh), [world.caption(s) for s in fresh]) >= 0.95


def test_frechet_distance_closed_form():
    # N(0, 1) vs N(1, 4): 1² + 1 + 4 − 2·√4 = 2
    assert frechet_distance(np.zeros(1), np.eye(1), np.ones(1), 4 * np.eye(1)) == pytest.approx(2.0)


def test_fd_shapes_separates_distributions():
    base = world.render_array(world.scenes(31, 600))
    same = world.render_array(world.scenes(32, 600))  # same distribution, other images
    only_circles = [
        dataclasses.replace(s, objects=tuple(dataclasses.replace(o, shape="circle") for o in s.objects))
        for s in world.scenes(33, 600)
    ]
    shifted = world.render_array(only_circles)
    assert fd_shapes(base, base) < 1e-6
    assert fd_shapes(base, shifted) > 3 * fd_shapes(base, same)


# ----------------------------------------------------------------------------- the shipped teacher


def test_shapes_alias_is_an_sd_epsilon_teacher():
    from dmdcli.models.teacher import inspect_teacher, resolve_teacher

    assert resolve_teacher("shapes") == str(teacher_path())
    spec = inspect_teacher("shapes")
    assert spec.layout == "sd" and spec.pipeline_class == "StableDiffusionPipeline"
    assert spec.prediction_type == "epsilon" and spec.native_resolution == world.RESOLUTION
    weights = [p for p in teacher_path().rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in weights) and not any(p.suffix == ".bin" for p in weights)
    shipped = sum(p.stat().st_size for p in [features_path(), *teacher_path().rglob("*")] if p.is_file())
    assert shipped <= 25 * 2**20


def test_shapes_flow_alias_is_an_sd3_flow_teacher_without_t5():
    from dmdcli.models.teacher import inspect_teacher, resolve_teacher

    assert resolve_teacher("shapes-flow") == str(flow_teacher_path())
    spec = inspect_teacher("shapes-flow")
    read = (spec.layout, spec.pipeline_class, spec.prediction_type, spec.native_resolution, spec.max_sequence_length)
    assert read == ("sd3", "StableDiffusion3Pipeline", "flow", world.RESOLUTION, 0)
    weights = [p for p in flow_teacher_path().rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in weights) and not any(p.suffix == ".bin" for p in weights)
    assert sum(p.stat().st_size for p in weights) <= 20 * 2**20


@pytest.mark.parametrize("folder", [teacher_path, flow_teacher_path], ids=["shapes", "shapes-flow"])
def test_shipped_teacher_draws_its_prompts(folder):
    """Alignment ≥ 90% at 25 steps with CFG on 48 prompts of a seed the teacher never saw, sampled
    by the teacher's own diffusers pipeline."""
    captions = [world.caption(s) for s in world.scenes(4242, 48)]
    images = sample_teacher(folder(), captions, steps=25, guidance_scale=4.0, seed=0)
    assert images.shape == (48, world.RESOLUTION, world.RESOLUTION, 3)
    assert alignment(images, captions) >= 0.90


# ----------------------------------------------------------------------------- teacher training


def test_teacher_training_resumes_bit_exactly(tmp_path):
    """Stopped after 2 iterations and started again = run straight to 4; other settings refused."""

    from dmdcli.shapes import train_teacher

    small = [
        "--num-scenes",
        "48",
        "--vae-iterations",
        "2",
        "--vae-batch-size",
        "4",
        "--text-iterations",
        "2",
        "--batch-size",
        "4",
        "--checkpoint-every",
        "2",
    ]
    assert_training_resumes(train_teacher.main, tmp_path, small, "unet")


def assert_training_resumes(main, tmp_path, small: list[str], network: str) -> None:
    """A teacher training script stopped after 2 iterations and started again gives the weights
    of a run straight to 4; a resumed run with other settings is refused."""
    from safetensors.torch import load_file

    main([str(tmp_path / "straight"), *small, "--iterations", "4"])
    main([str(tmp_path / "resumed"), *small, "--iterations", "2"])
    main([str(tmp_path / "resumed"), *small, "--iterations", "4"])
    weights = f"{network}/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "straight" / weights), load_file(tmp_path / "resumed" / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="--lr 0.5"):
        main([str(tmp_path / "resumed"), *small, "--iterations", "6", "--lr", "0.5"])


def test_flow_teacher_training_resumes_bit_exactly_and_reads_what_dmd_gives_it(tmp_path):
    """Stopped after 2 iterations and started again = run straight to 4. The pipeline it writes is
    an SD3 one without T5 recorded at 0 T5 positions, and `--teacher` folders of it load."""

    from dmdcli.models.teacher import inspect_teacher
    from dmdcli.shapes import train_flow_teacher

    small = ["--num-scenes", "48", "--batch-size", "4", "--checkpoint-every", "2", "--width", "64", "--depth", "2"]
    assert_training_resumes(train_flow_teacher.main, tmp_path, small, "transformer")

    spec = inspect_teacher(str(tmp_path / "straight"))
    read = (spec.family, spec.prediction_type, spec.max_sequence_length, spec.native_resolution)
    assert read == ("sd3", "flow", 0, 32)
    assert spec.absent_required == {"text_encoder_3": None, "tokenizer_3": None}
