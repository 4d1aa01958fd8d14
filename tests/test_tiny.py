"""Tiny random-weight SD / SDXL pipelines: build, save, reload offline, sample."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import string

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dmdcli.errors import UsageError
from dmdcli.models import tiny
from dmdcli.models.tiny import make_tiny_pipeline, tiny_pipeline_cached

# diffusers' EulerDiscreteScheduler.__init__ trips a numpy 2 DeprecationWarning (library side).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

EXPECTED_CLASS = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box two OpenMP
    threads make a 2-step sample ~100x slower (5 s instead of 0.05 s). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load(path):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(path, local_files_only=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One build per (layout, prediction type) for this module."""
    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(layout, prediction_type="epsilon"):
        key = (layout, prediction_type)
        if key not in cache:
            out = root / f"{layout}-{prediction_type}"
            cache[key] = make_tiny_pipeline(out, layout, prediction_type)
        return cache[key]

    return get


@pytest.mark.parametrize("layout", ["sd", "sdxl"])
def test_roundtrip_and_sample(built, layout, capfd):
    path = built(layout)
    assert (path / "model_index.json").is_file()
    assert list(path.glob("unet/*.safetensors")), "weights must be saved as safetensors"
    assert not list(path.rglob("*.bin"))

    capfd.readouterr()
    pipe = _load(path)
    err = capfd.readouterr().err.lower()
    for phrase in ("expected types", "not expected", "were not found", "missing", "unexpected"):
        assert phrase not in err, f"loading warned: {err}"

    assert type(pipe).__name__ == EXPECTED_CLASS[layout]
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.scheduler.config.num_train_timesteps == 1000
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    assert pipe.unet.config.cross_attention_dim == (64 if layout == "sdxl" else 32)
    if layout == "sdxl":
        assert pipe.unet.config.addition_embed_type == "text_time"
        proj = pipe.text_encoder_2.config.projection_dim
        assert pipe.unet.config.projection_class_embeddings_input_dim == (
            6 * pipe.unet.config.addition_time_embed_dim + proj
        )
    else:
        assert pipe.safety_checker is None

    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a red circle",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 32, 32, 3)
    assert np.isfinite(out).all()


def test_v_prediction(built):
    path = built("sd", "v_prediction")
    cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["prediction_type"] == "v_prediction"
    pipe = _load(path)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_same_seed_same_weights(built, tmp_path):
    first = built("sd")
    again = make_tiny_pipeline(tmp_path / "again", "sd", seed=0)
    other = make_tiny_pipeline(tmp_path / "other", "sd", seed=1)
    unet_file = "unet/diffusion_pytorch_model.safetensors"
    a, b, c = (load_file(str(p / unet_file)) for p in (first, again, other))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (first / unet_file).read_bytes() == (again / unet_file).read_bytes()
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_rng_state_untouched(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_tiny_pipeline("sd")
    assert torch.equal(torch.rand(3), expected)


def test_tokenizer(built):
    from transformers import CLIPTokenizer

    path = built("sdxl")
    for sub in ("tokenizer", "tokenizer_2"):
        assert (path / sub / "vocab.json").is_file() and (path / sub / "merges.txt").is_file()
        tok = CLIPTokenizer.from_pretrained(path / sub, local_files_only=True)
        assert tok.model_max_length == 77
        ids = tok("a red circle", padding="max_length", max_length=77, truncation=True).input_ids
        assert len(ids) == 77
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        for prompt in (string.printable, "A Photo Of 3 DOGS!!", "", "x" * 500, "héllo wörld"):
            enc = tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
            assert len(enc) == 77
            assert tok.unk_token_id not in enc[1 : enc.index(tok.eos_token_id)]


def test_cached_and_cli(tmp_path, capsys):
    p1 = tiny_pipeline_cached("sd")
    assert tiny_pipeline_cached("sd") == p1
    assert (p1 / "model_index.json").is_file()

    argv = [str(tmp_path / "cli"), "--layout", "sd", "--prediction-type", "v_prediction"]
    argv += ["--seed", "3"]
    assert tiny.main(argv) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert (tmp_path / "cli" / "unet" / "config.json").is_file()

    with pytest.raises(UsageError):
        make_tiny_pipeline(tmp_path / "bad", layout="sdxl-turbo")
    with pytest.raises(UsageError):
        tiny_pipeline_cached("sd", prediction_type="sample")


QWEN_TEMPLATE_PREFIX = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial"
    " relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
)


def test_qwen_image_roundtrip_and_sample(tiny_qwen_image, capfd):
    """The saved tiny Qwen-Image loads as a QwenImagePipeline, its tokenizer drops exactly the
    template's 34-token prefix, and true CFG on two prompts of different lengths (so the text
    attention mask has padding) samples the same image as one prompt alone."""
    from transformers import AutoTokenizer

    from dmdcli.models.tiny_flow import make_tiny_qwen_tokenizer

    capfd.readouterr()
    pipe = _load(tiny_qwen_image)
    err = capfd.readouterr().err.lower()
    for phrase in ("expected types", "not expected", "were not found", "missing", "unexpected"):
        assert phrase not in err, f"loading warned: {err}"
    assert type(pipe).__name__ == "QwenImagePipeline"
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.z_dim == 16 and len(pipe.vae.config.latents_std) == 16
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder.config.text_config.hidden_size
    assert pipe.scheduler.config.time_shift_type == "exponential" and pipe.scheduler.config.shift_terminal == 0.02

    tok = AutoTokenizer.from_pretrained(tiny_qwen_image / "tokenizer", local_files_only=True)
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert len(tok(QWEN_TEMPLATE_PREFIX).input_ids) == pipe.prompt_template_encode_start_idx == 34
    text = pipe.prompt_template_encode.format("a red circle")
    assert tok.convert_ids_to_tokens(tok(text).input_ids[34:])[:3] == ["a", "Ġred", "Ġcircle"]
    for prompt in (text, string.printable, "héllo wörld"):
        assert tok(prompt).input_ids == make_tiny_qwen_tokenizer()(prompt).input_ids

    pipe.set_progress_bar_config(disable=True)

    def sample(prompt, negative_prompt, pipe=pipe):
        generator = torch.Generator().manual_seed(0)
        kwargs = dict(num_inference_steps=2, height=32, width=32, true_cfg_scale=4.0, output_type="np")
        return pipe(prompt, negative_prompt=negative_prompt, generator=generator, **kwargs).images

    one = sample("a red circle", " ")
    assert one.shape == (1, 32, 32, 3) and np.isfinite(one).all()
    np.testing.assert_array_equal(sample("a red circle", " "), one)
    built = tiny.build_tiny_pipeline("qwen-image")  # the saved folder is this pipeline, bit for bit
    built.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(sample("a red circle", " ", built), one)
    two = sample(["a red circle", "a small green triangle on white"], [" ", "a black square"])
    assert two.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(two[0], one[0], atol=1e-5)
    assert np.abs(two[1] - two[0]).max() > 1e-4
