"""The tiny FLUX.2 [dev] pipeline of dmdcli.models.tiny (Flux2Pipeline), random weights, built
offline at 32 pixels: the tiny FLUX.2 transformer of tiny_qwen3 with a guidance embedding, its
tiny VAE, and a Mistral3ForConditionalGeneration (Mistral Small 3.1's class: a Mistral text model
of width 16, 30 layers deep for the pipeline's layers 10, 20, 30, and a 1-layer Pixtral vision
tower the pipeline never runs) behind a PixtralProcessor. The processor's tokenizer is the tiny
Qwen2 BPE one with Pixtral's image tokens and Mistral's control tokens added, and a chat template
of Mistral's form for a system message and a user turn.

`python -m dmdcli.models.tiny OUT --layout flux2-dev` builds it.
"""

from __future__ import annotations

from dmdcli.models.architectures import ARCHITECTURES
from dmdcli.models.tiny import seeded
from dmdcli.models.tiny_flow import _QWEN_PAD, make_tiny_qwen_tokenizer
from dmdcli.models.tiny_qwen3 import _TEXT_WIDTH, _flux2_vae, flux2_transformer_config

_TEXT_LAYERS = 30  # the deepest layer Flux2Pipeline reads (hidden_states[30])
_IMAGE_TOKENS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")  # what PixtralProcessor looks up
_CONTROL_TOKENS = ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]")  # the chat template's
# Mistral Small 3.1's template for a system message and a user turn, each content a list of text parts
# (as Flux2Pipeline formats them), without the BOS the tiny tokenizer does not have.
MISTRAL_CHAT_TEMPLATE = (
    "{% for m in messages %}{% set text = m['content'] if m['content'] is string else m['content'][0]['text'] %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]{% else %}[INST]{{ text }}[/INST]"
    "{% endif %}{% endfor %}"
)


def make_tiny_pixtral_processor():
    """A PixtralProcessor over the tiny Qwen2 tokenizer with Pixtral's and Mistral's special tokens."""
    from transformers import PixtralImageProcessor, PixtralProcessor

    tokenizer = make_tiny_qwen_tokenizer()
    tokenizer.add_tokens([*_IMAGE_TOKENS, *_CONTROL_TOKENS], special_tokens=True)
    return PixtralProcessor(
        image_processor=PixtralImageProcessor(patch_size=4),
        tokenizer=tokenizer,
        patch_size=4,
        chat_template=MISTRAL_CHAT_TEMPLATE,
    )


def _tiny_mistral3(tokenizer):
    """Mistral3ForConditionalGeneration: a Mistral text model of width 16 (2 heads of 8, one KV head)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    text = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_WIDTH,
        intermediate_size=2 * _TEXT_WIDTH,
        num_hidden_layers=_TEXT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.convert_tokens_to_ids(_QWEN_PAD),
    )
    vision = PixtralVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8, patch_size=4
    )
    config = Mistral3Config(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("[IMG]")
    )
    return Mistral3ForConditionalGeneration(config)


def build_tiny_flux2_dev_pipeline(seed: int = 0):
    """A tiny Flux2Pipeline (fp32, CPU) with FLUX.2 [dev]'s scheduler config."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel

    processor = make_tiny_pixtral_processor()
    transformer, vae, text_encoder = seeded(
        seed,
        lambda: Flux2Transformer2DModel(**{**flux2_transformer_config(), "guidance_embeds": True}),
        _flux2_vae,
        lambda: _tiny_mistral3(processor.tokenizer),
    )
    return Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(ARCHITECTURES["flux2-dev"]["scheduler"]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=processor,
        transformer=transformer,
    )
