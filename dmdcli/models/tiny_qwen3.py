"""The tiny pipelines of dmdcli.models.tiny whose text encoder is Qwen3, random weights, built
offline at 32 pixels, with the Qwen2 tokenizer of the tiny Qwen-Image pipeline and a Qwen3 chat
template:

- FLUX.2 [klein] (Flux2KleinPipeline): a 2-block Flux2Transformer2DModel on 16 patchified
  channels, a tiny AutoencoderKLFlux2 (4 latent channels, 2×2 patches, batch-norm statistics drawn
  at random so that normalizing them matters), Qwen3 deep enough for the pipeline's layers 9, 18, 27;
- Z-Image (ZImagePipeline): a ZImageTransformer2DModel of 2 layers (and a refiner layer each for
  the image and the text) on 16-channel latents, the tiny SD VAE with FLUX.1's 16 channels and
  latent shift and scale, a 2-layer Qwen3Model.

`python -m dmdcli.models.tiny OUT --layout flux2|z-image` builds them.
"""

from __future__ import annotations

from dmdcli.models.architectures import ARCHITECTURES
from dmdcli.models.tiny import seeded
from dmdcli.models.tiny_flow import _QWEN_IM_END, _QWEN_PAD, make_tiny_qwen_tokenizer

_TEXT_WIDTH = 16  # Qwen3's hidden size; the transformer reads three layers' states side by side
_TEXT_LAYERS = 27  # the deepest layer the pipeline reads (hidden_states[27])
_LATENT_CHANNELS = 4  # the VAE's; the transformer sees 2×2 patches of them: 16 channels
# Qwen3's chat template for one user turn, with add_generation_prompt and enable_thinking=False
# (what Flux2KleinPipeline asks for): the same text as the real template's for that case.
QWEN3_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def make_tiny_qwen3_tokenizer():
    """The tiny Qwen2 tokenizer with Qwen3's chat template (FLUX.2 [klein] tokenizes prompts through it)."""
    tokenizer = make_tiny_qwen_tokenizer()
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def flux2_transformer_config() -> dict:
    """One double-stream and one single-stream block of width 16 (2 heads of 8) on 16 channels."""
    return dict(
        patch_size=1,
        in_channels=4 * _LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=3 * _TEXT_WIDTH,
        timestep_guidance_channels=16,
        axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=False,
    )


def flux2_vae_config() -> dict:
    """8× downsampling (four levels) of width 8, one ResNet per level, 4 latent channels."""
    return dict(
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=_LATENT_CHANNELS,
        norm_num_groups=4,
    )


def _tiny_qwen3(tokenizer, layers: int, causal_lm: bool = True):
    """Qwen3 of width 16 (2 heads of 8, one KV head): FLUX.2's is a Qwen3ForCausalLM, Z-Image's a Qwen3Model."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_WIDTH,
        intermediate_size=2 * _TEXT_WIDTH,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.convert_tokens_to_ids(_QWEN_PAD),
        eos_token_id=tokenizer.convert_tokens_to_ids(_QWEN_IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(_QWEN_PAD),
    )
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config)


def _flux2_vae():
    """The tiny FLUX.2 VAE with batch-norm statistics drawn here (fresh ones are the identity)."""
    import torch
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(**flux2_vae_config())
    vae.bn.running_mean.copy_(0.5 * torch.randn(vae.bn.num_features))
    vae.bn.running_var.copy_(torch.rand(vae.bn.num_features) + 0.5)
    return vae


def build_tiny_flux2_pipeline(seed: int = 0):
    """A tiny Flux2KleinPipeline (fp32, CPU), base (not step-distilled), FLUX.2 [klein]'s scheduler config."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

    tokenizer = make_tiny_qwen3_tokenizer()
    transformer, vae, text_encoder = seeded(
        seed,
        lambda: Flux2Transformer2DModel(**flux2_transformer_config()),
        _flux2_vae,
        lambda: _tiny_qwen3(tokenizer, _TEXT_LAYERS),
    )
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(ARCHITECTURES["flux2-klein-4b"]["scheduler"]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=False,
    )


def z_image_transformer_config() -> dict:
    """2 layers of width 32 (4 heads of 8; RoPE axes 2 + 2 + 4), a refiner layer for the image and
    one for the text, on the tiny VAE's 16 channels, reading the tiny Qwen3's 16-wide states."""
    return dict(
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=4,
        n_kv_heads=4,
        cap_feat_dim=_TEXT_WIDTH,
        axes_dims=[2, 2, 4],
        axes_lens=[64, 32, 32],
    )


def build_tiny_z_image_pipeline(seed: int = 0):
    """A tiny ZImagePipeline (fp32, CPU) with the base Z-Image's scheduler config (a static shift of 6)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    from dmdcli.models.tiny_flow import _flow_parts

    tokenizer = make_tiny_qwen3_tokenizer()
    vae_config = _flow_parts(scaling_factor=0.3611, shift_factor=0.1159)[3]  # FLUX.1's VAE, as Z-Image's
    transformer, vae, text_encoder = seeded(
        seed,
        lambda: ZImageTransformer2DModel(**z_image_transformer_config()),
        lambda: AutoencoderKL(**vae_config),
        lambda: _tiny_qwen3(tokenizer, 2, causal_lm=False),
    )
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(ARCHITECTURES["z-image"]["scheduler"]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
