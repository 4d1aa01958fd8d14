"""The tiny flow-matching pipelines of dmdcli.models.tiny: SD3 (CLIP-L, CLIP-G, T5) and FLUX.1-dev
(CLIP-L, T5), random weights, built offline, at the same 32-pixel resolution and with the same
CLIP tokenizer as the tiny SD / SDXL pipelines; T5's tokenizer is made here from a vocabulary.

`python -m dmdcli.models.tiny OUT --layout sd3|flux` builds them.
"""

from __future__ import annotations

from dmdcli.models.clip_bpe import BOS, EOS
from dmdcli.models.tiny import (
    _MERGE_WORDS,
    _TEXT_HIDDEN,
    _TEXT_PROJECTION,
    TINY_LATENT_SIZE,
    _text_config,
    make_tiny_tokenizer,
    vae_config,
)

# --------------------------------------------------------------------------------------------
# SD3: a flow-matching transformer with CLIP-L, CLIP-G and T5
# --------------------------------------------------------------------------------------------

_T5_HIDDEN = 2 * _TEXT_HIDDEN  # the joint attention width: the two CLIPs' states side by side fit it exactly
_SD3_LATENT_CHANNELS = 16


def make_tiny_t5_tokenizer():
    """A T5 (Unigram) tokenizer built here from a vocabulary of the merge words and single
    characters, so any ASCII prompt tokenizes; no network, no sentencepiece file."""
    import string

    from transformers import T5TokenizerFast

    words = [("▁" + w, -1.0) for w in _MERGE_WORDS]
    chars = [(c, -5.0) for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), *words, *chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def _flow_parts(scaling_factor: float, shift_factor: float):
    """What the tiny flow pipelines share: the CLIP and T5 tokenizers, CLIP's special ids, and a
    16-channel VAE config that shifts and scales its latents as the family's VAE does."""
    tokenizer = make_tiny_tokenizer()
    ids = dict(bos_id=tokenizer.convert_tokens_to_ids(BOS), eos_id=tokenizer.convert_tokens_to_ids(EOS))
    vae = vae_config("sd") | dict(
        latent_channels=_SD3_LATENT_CHANNELS, scaling_factor=scaling_factor, shift_factor=shift_factor
    )
    return tokenizer, make_tiny_t5_tokenizer(), ids, vae


def sd3_transformer_config() -> dict:
    """The tiny SD3Transformer2DModel: 2 joint blocks of width 32 on 16×16×16 latents, patch 2."""
    return dict(
        sample_size=TINY_LATENT_SIZE,
        patch_size=2,
        in_channels=_SD3_LATENT_CHANNELS,
        out_channels=_SD3_LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=_T5_HIDDEN,
        caption_projection_dim=32,  # = heads × head dim, as in every SD3
        pooled_projection_dim=2 * _TEXT_PROJECTION,
        pos_embed_max_size=TINY_LATENT_SIZE,
    )


def build_tiny_sd3_pipeline(seed: int = 0):
    """A tiny StableDiffusion3Pipeline (fp32, CPU): its VAE shifts and scales 16-channel latents
    as SD3's does, its scheduler is SD3's (FlowMatchEulerDiscreteScheduler, shift 3)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    tokenizer, t5_tokenizer, ids, vae_cfg = _flow_parts(scaling_factor=1.5305, shift_factor=0.0609)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**sd3_transformer_config())
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**vae_cfg)
        encoders = []
        for i in range(2):
            torch.manual_seed(seed + 2 + i)
            config = _text_config(len(tokenizer), **ids, projection_dim=_TEXT_PROJECTION)
            encoders.append(CLIPTextModelWithProjection(config))
        torch.manual_seed(seed + 4)
        t5 = _tiny_t5(len(t5_tokenizer))
    for module in (transformer, vae, t5, *encoders):
        module.eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=make_tiny_tokenizer(),
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    )


def _tiny_t5(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=_T5_HIDDEN,
        d_kv=16,
        d_ff=2 * _T5_HIDDEN,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


def flux_transformer_config() -> dict:
    """The tiny FluxTransformer2DModel: one double-stream and one single-stream block of width 32,
    with the guidance embedding of FLUX.1-dev, on 16-channel latents packed 2×2 (64 in)."""
    return dict(
        patch_size=1,
        in_channels=4 * _SD3_LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=_T5_HIDDEN,
        pooled_projection_dim=_TEXT_HIDDEN,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )


def build_tiny_flux_pipeline(seed: int = 0):
    """A tiny FluxPipeline (fp32, CPU): CLIP and T5 encoders, a shifted 16-channel VAE, FLUX's
    resolution-shifted FlowMatchEulerDiscreteScheduler."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer, t5_tokenizer, ids, vae_cfg = _flow_parts(scaling_factor=0.3611, shift_factor=0.1159)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**flux_transformer_config())
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**vae_cfg)
        torch.manual_seed(seed + 2)
        clip = CLIPTextModel(_text_config(len(tokenizer), **ids))
        torch.manual_seed(seed + 3)
        t5 = _tiny_t5(len(t5_tokenizer))
    for module in (transformer, vae, clip, t5):
        module.eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
