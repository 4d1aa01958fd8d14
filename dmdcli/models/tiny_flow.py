"""The tiny flow-matching pipelines of dmdcli.models.tiny: SD3 (CLIP-L, CLIP-G, T5), FLUX.1-dev
(CLIP-L, T5), Chroma (T5) and Qwen-Image (Qwen2.5-VL), random weights, built offline, at the same
32-pixel resolution as the tiny SD / SDXL pipelines. SD3 and FLUX share their CLIP tokenizer; T5's
and Qwen2's tokenizers are made here from a vocabulary.

`python -m dmdcli.models.tiny OUT --layout sd3|flux|chroma|qwen-image` builds them.
"""

from __future__ import annotations

from dmdcli.models.architectures import ARCHITECTURES
from dmdcli.models.clip_bpe import BOS, EOS, bytes_to_unicode
from dmdcli.models.tiny import (
    _MERGE_WORDS,
    _TEXT_HIDDEN,
    _TEXT_PROJECTION,
    TINY_LATENT_SIZE,
    _text_config,
    add_merge_chains,
    make_tiny_tokenizer,
    seeded,
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
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    tokenizer, t5_tokenizer, ids, vae_cfg = _flow_parts(scaling_factor=1.5305, shift_factor=0.0609)

    def clip():
        return CLIPTextModelWithProjection(_text_config(len(tokenizer), **ids, projection_dim=_TEXT_PROJECTION))

    transformer, vae, *encoders, t5 = seeded(
        seed,
        lambda: SD3Transformer2DModel(**sd3_transformer_config()),
        lambda: AutoencoderKL(**vae_cfg),
        clip,
        clip,
        lambda: _tiny_t5(len(t5_tokenizer)),
    )
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


# FLUX.1's scheduler config (Chroma's too): sigmas shifted by the image's token count
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


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
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer, t5_tokenizer, ids, vae_cfg = _flow_parts(scaling_factor=0.3611, shift_factor=0.1159)
    transformer, vae, clip, t5 = seeded(
        seed,
        lambda: FluxTransformer2DModel(**flux_transformer_config()),
        lambda: AutoencoderKL(**vae_cfg),
        lambda: CLIPTextModel(_text_config(len(tokenizer), **ids)),
        lambda: _tiny_t5(len(t5_tokenizer)),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def chroma_transformer_config() -> dict:
    """The tiny ChromaTransformer2DModel: FLUX's tiny blocks without the guidance embedding or CLIP,
    their modulation from a 1-layer approximator of width 16."""
    flux = flux_transformer_config()
    config = {k: v for k, v in flux.items() if k not in ("pooled_projection_dim", "guidance_embeds")}
    return config | dict(approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1)


def build_tiny_chroma_pipeline(seed: int = 0):
    """A tiny ChromaPipeline (fp32, CPU): T5 alone, FLUX's shifted 16-channel VAE and its
    resolution-shifted scheduler."""
    from diffusers import AutoencoderKL, ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    _, t5_tokenizer, _, vae_cfg = _flow_parts(scaling_factor=0.3611, shift_factor=0.1159)
    transformer, vae, t5 = seeded(
        seed,
        lambda: ChromaTransformer2DModel(**chroma_transformer_config()),
        lambda: AutoencoderKL(**vae_cfg),
        lambda: _tiny_t5(len(t5_tokenizer)),
    )
    return ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=vae,
        text_encoder=t5,
        tokenizer=t5_tokenizer,
        transformer=transformer,
    )


# --------------------------------------------------------------------------------------------
# Qwen-Image: an MMDiT on 2x2-packed 16-channel latents, conditioned on Qwen2.5-VL's last states
# --------------------------------------------------------------------------------------------

_QWEN_TEXT_HIDDEN = 64  # 4 heads of 16: head dim / 2 = 8 = mrope section (2, 3, 3), Qwen2.5-VL's 16:24:24
_QWEN_IM_START, _QWEN_IM_END, _QWEN_PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
_QWEN_SPECIALS = (
    _QWEN_PAD,
    _QWEN_IM_START,
    _QWEN_IM_END,
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# The words of QwenImagePipeline's prompt template: merged whole, its system turn and the user
# header are 34 tokens, as with the real tokenizer, so the pipeline's 34-token drop is exact.
_QWEN_TEMPLATE_WORDS = (
    "the",
    "image",
    "by",
    "detailing",
    "color",
    "shape",
    "size",
    "texture",
    "quantity",
    "text",
    "spatial",
    "relationships",
    "of",
    "objects",
    "and",
    "background",
)
_QWEN_LINE_STARTS = ("system", "Describe", "user", "assistant")  # after a newline: no leading space


def qwen_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level Qwen2 BPE: the 256 byte symbols, a merge chain per word (those of the " word"
    forms start at "Ġ", so they apply only at a word's start; the four line starts come last), so
    every listed word is one token; then Qwen's special tokens."""
    tokens = list(bytes_to_unicode().values())
    words = dict.fromkeys(_QWEN_TEMPLATE_WORDS + _MERGE_WORDS)
    merges = add_merge_chains(tokens, [list(w) for w in [*("Ġ" + w for w in words), *_QWEN_LINE_STARTS]])
    tokens += _QWEN_SPECIALS
    return {tok: i for i, tok in enumerate(tokens)}, merges


def make_tiny_qwen_tokenizer():
    """A Qwen2Tokenizer as Qwen-Image's (eos ``<|im_end|>``, pad ``<|endoftext|>``, no unk: every
    byte is a token) built here; no network."""
    from transformers import Qwen2Tokenizer

    vocab, merges = qwen_vocab_and_merges()
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token=_QWEN_IM_END,
        pad_token=_QWEN_PAD,
        extra_special_tokens=list(_QWEN_SPECIALS[1:]),
        model_max_length=131072,
    )


def qwen_image_transformer_config() -> dict:
    """The tiny QwenImageTransformer2DModel: 2 blocks of width 32 (4 heads of 8) on 16-channel
    latents packed 2×2 (64 in, patch 2 out), conditioned on the tiny Qwen2.5-VL's states."""
    return dict(
        patch_size=2,
        in_channels=4 * _SD3_LATENT_CHANNELS,
        out_channels=_SD3_LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=_QWEN_TEXT_HIDDEN,
        guidance_embeds=False,
        axes_dims_rope=(2, 2, 4),
    )


def qwen_image_vae_config() -> dict:
    """The tiny AutoencoderKLQwenImage: Qwen-Image's multipliers and temporal flags (so spatial
    downsampling 8 = 2 ** len(temperal_downsample), as the pipeline assumes) and its latent
    statistics (the class's defaults), on a base width of 8 with one ResNet per level."""
    return dict(
        base_dim=8,
        z_dim=_SD3_LATENT_CHANNELS,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )


def _tiny_qwen_vl(tokenizer):
    """Qwen2.5-VL, 2 text layers of width 64 (grouped-query attention, 2 KV heads, mrope) and a
    1-block vision tower that only has to exist: Qwen-Image reads the text's last hidden states."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    def token_id(token: str) -> int:
        return tokenizer.convert_tokens_to_ids(token)

    ends = dict(bos_token_id=token_id(_QWEN_PAD), eos_token_id=token_id(_QWEN_IM_END))  # as Qwen2.5-VL's
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=_QWEN_TEXT_HIDDEN,
        intermediate_size=2 * _QWEN_TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128000,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[2, 3, 3]),
        **ends,
    )
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=_QWEN_TEXT_HIDDEN,
        fullatt_block_indexes=[0],
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        **ends,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def build_tiny_qwen_image_pipeline(seed: int = 0):
    """A tiny QwenImagePipeline (fp32, CPU): a Qwen2.5-VL text encoder and Qwen2 tokenizer, the
    Qwen-Image VAE's latent statistics and 8× downsampling, Qwen-Image's scheduler config."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    tokenizer = make_tiny_qwen_tokenizer()
    transformer, vae, text_encoder = seeded(
        seed,
        lambda: QwenImageTransformer2DModel(**qwen_image_transformer_config()),
        lambda: AutoencoderKLQwenImage(**qwen_image_vae_config()),
        lambda: _tiny_qwen_vl(tokenizer),
    )
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(ARCHITECTURES["qwen-image"]["scheduler"]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
