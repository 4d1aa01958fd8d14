"""Teacher families: a family registered from outside the runtime is recognised, resolved and given
its defaults by the same lookups that serve SD, SDXL and the built-in teacher."""

import json

import pytest
import torch

from dmdcli.errors import DmdError
from dmdcli.models import families
from dmdcli.models.config_only import write_config_only_pipeline
from dmdcli.models.families import EvalSet, Family
from dmdcli.models.sd import SDTeacher, unet_shape
from dmdcli.models.teacher import inspect_teacher, local_teacher_folder, resolve_teacher, teacher_family
from dmdcli.models.unet import UNetDenoiser
from dmdcli.train.recipes import absolute_paths, choose_recipe


def unet_denoiser(unet, schedule):
    return UNetDenoiser(unet)


def _fake_pipeline(folder):
    """An SD1.5-shaped config-only pipeline whose UNet is of a class no built-in family knows."""
    write_config_only_pipeline(folder, "sd15")
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["fake_library", "FakeUNet"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture
def registered():
    """Register families for one test, as a module of FAMILY_MODULES would on import."""
    added = []

    def register(family):
        families.families()  # the built-in ones first, as at run time
        added.append(families.register(family).name)
        return family

    yield register
    for name in added:
        families.REGISTRY.pop(name)


def test_an_unsupported_pipeline_is_told_what_every_family_distills(tmp_path):
    recognising = [f for f in families.families() if f.recognises]
    assert all(f.distills for f in recognising), "a family that recognises pipelines must say which"
    with pytest.raises(DmdError) as refused:
        inspect_teacher(str(_fake_pipeline(tmp_path / "fake-teacher")))
    message = str(refused.value)
    assert all(f.distills in message for f in recognising)
    assert "StableDiffusionXLPipeline" in message and "\n" not in message


def test_a_family_registered_outside_the_runtime_is_recognised_and_gets_its_defaults(registered, tmp_path):
    teacher = _fake_pipeline(tmp_path / "fake-teacher")
    with pytest.raises(DmdError, match="unsupported pipeline"):  # unknown until a family claims it
        inspect_teacher(str(teacher))
    fake = registered(
        Family(
            name="fake",
            layout="sd",
            teacher=SDTeacher,
            denoiser=unet_denoiser,
            network_shape=unet_shape,
            conditioning_timestep=500,
            recognises=lambda index: index.get("unet", [None, None])[1] == "FakeUNet",
            aliases={"fake-1": "someone/fake-model-1"},
            recipe=lambda steps, lora_rank: "tiny" if steps == 1 else None,
            data={"fake-images": lambda: str(tmp_path / "images")},
        )
    )
    spec = inspect_teacher(str(teacher))
    assert (spec.family, spec.layout) == ("fake", "sd")  # read from its config files
    assert teacher_family(str(teacher)) is fake and teacher_family("fake-1") is fake
    assert resolve_teacher("fake-1") == "someone/fake-model-1" and local_teacher_folder("fake-1") is None
    assert families.teacher_aliases()["fake-1"] == "someone/fake-model-1"
    # Its recipe default, announced as a choice made for the teacher; none for 4 steps.
    announced = ("tiny", "recipe tiny: chosen for a fake teacher (--recipe to choose another)")
    assert choose_recipe(None, "fake-1", 1, None, True, False) == announced
    assert choose_recipe(None, str(teacher), None, None, True, False) == announced
    assert choose_recipe(None, "fake-1", 4, None, True, False) == (None, None)
    assert families.get_family(spec.family).denoiser is unet_denoiser
    assert families.get_family(spec.family).conditioning_timestep == 500
    # Its data set is a name, resolved to its folder, and not made into a path.
    assert families.resolve_data("fake-images") == str(tmp_path / "images")
    assert families.resolve_data("fake-images-2") == "fake-images-2"
    assert absolute_paths({"data": "fake-images"})["data"] == "fake-images"


def test_a_built_in_teacher_is_known_by_its_name_and_its_folder(registered, tmp_path):
    teacher = write_config_only_pipeline(tmp_path / "world", "sd15")
    world = registered(
        Family(
            name="world",
            layout="sd",
            teacher=SDTeacher,
            denoiser=unet_denoiser,
            network_shape=unet_shape,
            conditioning_timestep=999,
            builtin_teacher=lambda: str(teacher),
            recipe=lambda steps, lora_rank: "tiny",
            eval_set=EvalSet("world-set", "somewhere:benchmark", "scores the world"),
        )
    )
    assert resolve_teacher("world") == str(teacher) and families.named_family("world") is world
    assert choose_recipe(None, "world", None, None, False, False) == ("tiny", None)  # its own run: not announced
    assert families.default_eval_set(str(teacher)) == world.eval_set
    assert families.default_eval_set(str(tmp_path)) is None
    assert inspect_teacher("world").family == "sd"  # its folder's config files: an SD pipeline
    assert "world-set" in {s.name for s in families.eval_sets()}


def test_the_built_in_families():
    names = ["sd", "sdxl", "sd3", "flux", "chroma", "flux2", "flux2-dev", "qwen-image", "z-image", "shapes"]
    assert [f.name for f in families.families()][: len(names)] == names
    default = families.default_family()
    assert choose_recipe(None, None, None, None, False, False) == (default.recipe(1, None), None)
    assert teacher_family("sd21").name == "sd" and teacher_family("stabilityai/sdxl").name == "sdxl"
    assert teacher_family("sd3.5-large").name == "sd3" and teacher_family("flux-dev").name == "flux"
    assert teacher_family("qwen-image").name == "qwen-image"
    assert choose_recipe(None, "qwen-image", 4, None, False, False)[0] == "qwen-image"
    assert teacher_family("flux2-klein-9b").name == "flux2"
    assert choose_recipe(None, "flux2-klein-4b", 1, None, False, False)[0] == "flux2-klein"
    assert teacher_family("flux2-dev").name == "flux2-dev"
    assert teacher_family("chroma").name == "chroma"
    assert choose_recipe(None, "chroma", 1, None, False, False)[0] == "chroma"
    assert choose_recipe(None, "flux2-dev", 4, None, False, False)[0] == "flux2-dev"
    assert teacher_family("z-image").name == "z-image"
    assert choose_recipe(None, "z-image", 4, None, False, False)[0] == "z-image"
    recipe, note = choose_recipe(None, "sdxl", 4, 8, False, False)
    assert recipe == "sdxl-4step-lora" and note.startswith("recipe sdxl-4step-lora: chosen for an SDXL teacher")
    assert choose_recipe(None, "sdxl", None, None, False, False)[0] == "sdxl-1step"
    assert choose_recipe(None, "sd15", 4, None, False, False) == (None, None)
    assert {f.name: f.conditioning_timestep for f in families.families()}["sdxl"] == 399
    assert resolve_teacher(default.name) == default.builtin_teacher()
    assert families.default_eval_set(default.builtin_teacher()) == default.eval_set


@pytest.mark.parametrize("layout", ["sd3", "flux", "chroma", "qwen-image", "flux2", "flux2-dev", "z-image"])
def test_gradient_checkpointing_changes_no_prediction(layout):
    """Every transformer family's adapter gives a CFG batch of prompts of three lengths the same
    prediction when its network runs under gradient checkpointing (a trained copy's forward) as
    without: diffusers' Chroma once dropped its text mask there (dmdcli/models/chroma.py)."""
    from dmdcli.core.denoiser import cat_cond
    from dmdcli.models.pipeline import load_teacher
    from dmdcli.models.tiny import tiny_pipeline_cached
    from dmdcli.train.config import DistillConfig

    spec = inspect_teacher(str(tiny_pipeline_cached(layout)))
    teacher = load_teacher(spec, torch.device("cpu"), torch.float32, 32)
    family = families.get_family(spec.family)
    denoiser = family.denoiser(teacher.network, spec.schedule(32), **family.denoiser_kwargs(DistillConfig))
    prompts = ["a red circle", "a large blue square at the top left"]
    cond = cat_cond(teacher.encode_prompts(prompts), teacher.empty_cond())
    side = 32 // spec.vae_scale_factor
    x = torch.randn(3, spec.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 500, 20])
    plain = denoiser(x, t, cond)
    teacher.network.enable_gradient_checkpointing()
    with torch.enable_grad():
        checkpointed = denoiser(x.clone().requires_grad_(), t, cond)
    torch.testing.assert_close(checkpointed, plain, atol=2e-5, rtol=1e-4)
