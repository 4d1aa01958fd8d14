"""Tiny, random-weight but genuine diffusers text-to-image pipelines, built offline.

These stand in for Stable Diffusion 1.5 / SDXL teachers in the test suite and in the README demo,
before real weights are on disk. Every component is a real diffusers / transformers class
(UNet2DConditionModel, AutoencoderKL, CLIPTextModel[WithProjection], CLIPTokenizer), only tiny:

- resolution 32: the 2-level VAE (block_out_channels (32, 64)) halves it to a 4x16x16 latent;
- UNet block_out_channels (32, 64), one ResNet per down block, cross-attention only in the
  lower-resolution block (like diffusers' own fast tests), mid block at 64 channels;
- CLIP text encoders with hidden size 32, 2 layers, 77 positions;
- a byte-level CLIP BPE tokenizer written by this module (every byte is a token, so any
  prompt tokenizes), with a handful of whole-word merges.

The scheduler config mirrors SD1.5 / SDXL's training schedule (1000 steps, scaled_linear,
beta 0.00085 to 0.012) on an EulerDiscreteScheduler, which accepts explicit ``timesteps=``.

The same seed gives byte-identical weights. Nothing is downloaded.

Command line (developer helper)::

    python -m dmdcli.models.tiny OUT_DIR [--layout sd|sdxl|sd3|flux|chroma|flux2|flux2-dev|qwen-image|z-image]
        [--prediction-type epsilon|v_prediction] [--seed N]
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import sys
import tempfile
import threading
from pathlib import Path

from dmdcli.errors import UsageError
from dmdcli.models.clip_bpe import BOS, EOS, byte_symbols, clip_tokenizer, write_tokenizer_files

LAYOUTS = ("sd", "sdxl", "sd3", "flux", "chroma", "flux2", "flux2-dev", "qwen-image", "z-image")
# built by dmdcli.models.tiny_flow (FLUX.2 [klein] and Z-Image, read by Qwen3: tiny_qwen3; FLUX.2
# [dev], read by Mistral: tiny_mistral)
_FLOW_LAYOUTS = ("sd3", "flux", "chroma", "flux2", "flux2-dev", "qwen-image", "z-image")
PREDICTION_TYPES = ("epsilon", "v_prediction")

#: Pixel resolution the tiny pipelines are made for (the UNet's default sample size times 2).
TINY_RESOLUTION = 32
#: Spatial downsampling of the tiny VAE: 2 ** (len(block_out_channels) - 1).
TINY_VAE_SCALE_FACTOR = 2
TINY_LATENT_SIZE = TINY_RESOLUTION // TINY_VAE_SCALE_FACTOR  # 16
TINY_LATENT_CHANNELS = 4
MAX_TOKEN_LENGTH = 77

_TEXT_HIDDEN = 32
_TEXT_PROJECTION = 32
_ADDITION_TIME_EMBED_DIM = 8

# A few whole-word merges so that common demo prompts are not all single characters.
_MERGE_WORDS = (
    "a",
    "an",
    "the",
    "of",
    "and",
    "with",
    "on",
    "in",
    "photo",
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "circle",
    "square",
    "triangle",
    "cat",
    "dog",
    "small",
    "big",
)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def _tiny_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style vocab: 256 byte symbols, the same with ``</w>``, merges, then the two specials."""
    tokens = byte_symbols()
    merges = add_merge_chains(tokens, [[*word[:-1], word[-1] + "</w>"] for word in _MERGE_WORDS])
    tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def add_merge_chains(tokens: list[str], words: list[list[str]]) -> list[tuple[str, str]]:
    """The BPE merges that make each word (its symbols) one token, left to right; each merged
    token not yet in `tokens` is appended to it."""
    known = set(tokens)
    merges: list[tuple[str, str]] = []
    for parts in words:
        left = parts[0]
        for right in parts[1:]:
            merged = left + right
            if merged not in known:
                merges.append((left, right))
                tokens.append(merged)
                known.add(merged)
            left = merged
    return merges


def write_tiny_tokenizer_files(folder: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of the tiny byte-level CLIP BPE into ``folder``."""
    return write_tokenizer_files(folder, *_tiny_vocab_and_merges())


def make_tiny_tokenizer():
    """A CLIPTokenizer (model_max_length 77, pad = ``<|endoftext|>``) built here; no network."""
    return clip_tokenizer(*_tiny_vocab_and_merges(), model_max_length=MAX_TOKEN_LENGTH)


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------


def _scheduler(prediction_type: str):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        interpolation_type="linear",
        timestep_spacing="leading",
        steps_offset=1,
        use_karras_sigmas=False,
    )


def _text_config(vocab_size: int, bos_id: int, eos_id: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=4 * _TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKEN_LENGTH,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
        kwargs["hidden_act"] = "gelu"  # SDXL's OpenCLIP bigG encoder uses gelu
    return CLIPTextConfig(**kwargs)


def unet_config(layout: str) -> dict:
    """The tiny UNet2DConditionModel config for ``layout`` ("sd" or "sdxl")."""
    cfg = dict(
        sample_size=TINY_LATENT_SIZE,
        in_channels=TINY_LATENT_CHANNELS,
        out_channels=TINY_LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        norm_num_groups=32,
        cross_attention_dim=_TEXT_HIDDEN,
    )
    if layout == "sdxl":
        cfg.update(
            cross_attention_dim=_TEXT_HIDDEN + _TEXT_HIDDEN,  # penultimate states of both encoders
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=_ADDITION_TIME_EMBED_DIM,
            # 6 micro-conditioning numbers (original size, crop, target size) + pooled text_embeds
            projection_class_embeddings_input_dim=6 * _ADDITION_TIME_EMBED_DIM + _TEXT_PROJECTION,
        )
    return cfg


def vae_config(layout: str) -> dict:
    """The tiny AutoencoderKL config (2 levels: 32 px -> 16x16x4 latent)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=TINY_LATENT_CHANNELS,
        norm_num_groups=32,
        sample_size=TINY_RESOLUTION,
        scaling_factor=0.13025 if layout == "sdxl" else 0.18215,
    )


def _check(layout: str, prediction_type: str) -> None:
    if layout not in LAYOUTS:
        raise UsageError(f"unknown tiny layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout in _FLOW_LAYOUTS:
        if prediction_type not in ("epsilon", "flow"):  # "epsilon": the command line's default
            raise UsageError(f"a tiny {layout} pipeline is flow matching: it takes no --prediction-type")
        return
    if prediction_type not in PREDICTION_TYPES:
        choices = ", ".join(PREDICTION_TYPES)
        raise UsageError(f"unknown prediction type {prediction_type!r}; choose one of {choices}")


def seeded(seed: int, *makers) -> list:
    """Each maker's module, made after torch.manual_seed(seed + i) (each reproducible on its own),
    in eval mode; the caller's RNG untouched."""
    import torch

    modules = []
    with torch.random.fork_rng(devices=[]):
        for i, make in enumerate(makers):
            torch.manual_seed(seed + i)
            modules.append(make().eval())
    return modules


def build_tiny_pipeline(layout: str = "sd", prediction_type: str = "epsilon", seed: int = 0):
    """Build the tiny pipeline in memory (fp32, CPU), leaving the caller's RNG state untouched."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    _check(layout, prediction_type)
    if layout in _FLOW_LAYOUTS:
        from dmdcli.models import tiny_flow, tiny_mistral, tiny_qwen3  # the flow transformers: their own modules

        build = {
            "sd3": tiny_flow.build_tiny_sd3_pipeline,
            "flux": tiny_flow.build_tiny_flux_pipeline,
            "chroma": tiny_flow.build_tiny_chroma_pipeline,
            "flux2": tiny_qwen3.build_tiny_flux2_pipeline,
            "flux2-dev": tiny_mistral.build_tiny_flux2_dev_pipeline,
            "z-image": tiny_qwen3.build_tiny_z_image_pipeline,
            "qwen-image": tiny_flow.build_tiny_qwen_image_pipeline,
        }[layout]
        return build(seed)
    tokenizer = make_tiny_tokenizer()
    vocab_size = len(tokenizer)
    bos_id = tokenizer.convert_tokens_to_ids(BOS)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)

    with torch.random.fork_rng(devices=[]):
        # One fixed seed per component so that each is reproducible on its own.
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config(layout))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**vae_config(layout))
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(_text_config(vocab_size, bos_id, eos_id))
        if layout == "sdxl":
            torch.manual_seed(seed + 3)
            text_encoder_2 = CLIPTextModelWithProjection(
                _text_config(vocab_size, bos_id, eos_id, projection_dim=_TEXT_PROJECTION)
            )
    for module in [unet, vae, text_encoder] + ([text_encoder_2] if layout == "sdxl" else []):
        module.eval()
    scheduler = _scheduler(prediction_type)

    if layout == "sd":
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=make_tiny_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def make_tiny_pipeline(
    out_dir: str | Path, layout: str = "sd", prediction_type: str = "epsilon", seed: int = 0
) -> Path:
    """Build a tiny random-weight SD, SDXL, SD3, FLUX, Chroma, FLUX.2 ([klein] or [dev]), Qwen-Image or Z-Image
    pipeline (`layout`) and save it to ``out_dir``.

    Saved with safetensors; ``DiffusionPipeline.from_pretrained(out_dir, local_files_only=True)``
    loads it back. Native resolution 32 (latent 4x16x16; Qwen-Image's, 8× down: 16x4x4). Returns
    ``out_dir`` as a Path.
    """
    _check(layout, prediction_type)
    out = Path(out_dir)
    pipe = build_tiny_pipeline(layout, prediction_type, seed)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    if layout in ("qwen-image", "flux2", "z-image"):  # their Qwen2 BPE files, as the real checkpoints ship them
        from dmdcli.models.tiny_flow import qwen_vocab_and_merges

        write_tokenizer_files(out / "tokenizer", *qwen_vocab_and_merges())
        return out
    if layout == "flux2-dev":  # a processor: its tokenizer.json holds the added special tokens
        return out
    # transformers 5 saves only tokenizer.json; keep the BPE files too, so that the folder also
    # loads with transformers 4's slow CLIPTokenizer (and looks like a real SD checkpoint).
    for sub in ("tokenizer", "tokenizer_2"):
        if (out / sub).is_dir() and not (out / sub / "vocab.json").is_file():
            write_tiny_tokenizer_files(out / sub)
    return out


# --------------------------------------------------------------------------------------------
# Process-wide cache (for tests: one build per layout / prediction type per process)
# --------------------------------------------------------------------------------------------

_CACHE_LOCK = threading.Lock()
_CACHE: dict[tuple[str, str], Path] = {}
_CACHE_ROOT: Path | None = None


def _cache_root() -> Path:
    global _CACHE_ROOT
    if _CACHE_ROOT is None or not _CACHE_ROOT.is_dir():
        _CACHE_ROOT = Path(tempfile.mkdtemp(prefix="dmd-tiny-"))
        atexit.register(shutil.rmtree, str(_CACHE_ROOT), True)
    return _CACHE_ROOT


def tiny_pipeline_cached(layout: str, prediction_type: str = "epsilon") -> Path:
    """Path of a tiny pipeline (seed 0) built once per process into a temp folder.

    Callers must treat the folder as read-only; it is removed when the process exits.
    """
    _check(layout, prediction_type)
    key = (layout, prediction_type)
    with _CACHE_LOCK:
        path = _CACHE.get(key)
        if path is None or not (path / "model_index.json").is_file():
            out = _cache_root() / (layout if layout in _FLOW_LAYOUTS else f"{layout}-{prediction_type}")
            path = make_tiny_pipeline(out, layout, prediction_type, seed=0)
            _CACHE[key] = path
        return path


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dmdcli.models.tiny",
        description="Write a tiny random-weight diffusers text-to-image pipeline (resolution 32).",
    )
    parser.add_argument("out_dir", help="folder to write the pipeline into")
    parser.add_argument("--layout", choices=LAYOUTS, default="sd")
    parser.add_argument("--prediction-type", choices=PREDICTION_TYPES, default="epsilon")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = make_tiny_pipeline(args.out_dir, args.layout, args.prediction_type, args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
