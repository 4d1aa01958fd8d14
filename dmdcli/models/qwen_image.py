"""The Qwen-Image family: a flow-matching MMDiT (QwenImageTransformer2DModel) read by Qwen2.5-VL.

The transformer predicts the velocity v = ε − x0 on sigmas shifted by the image's token count (an
exponential time shift, as FLUX's), from 2×2-patch tokens of a 16-channel VAE's latents (Wan's
VAE, AutoencoderKLQwenImage: a video VAE, run here on one frame, whose latents are normalized
per channel by a mean and std). A prompt is Qwen2.5-VL's last hidden state over the pipeline's
chat template, less the template's first tokens; prompts differ in length, so each is padded with
zeros to `max_sequence_length` positions and a mask marks its own ("encoder_hidden_states_mask").

The real score uses CFG with the negative prompt " " (the model card's). QwenImagePipeline also
rescales the guided prediction to the conditional one's norm, per token; that is a sampling
trick of the pipeline, not part of the score DMD2 matches, and is not applied (DMD2's CFG is plain).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from dmdcli.core.denoiser import Cond
from dmdcli.models.families import Family, NetworkShape, register
from dmdcli.models.pipeline import PipelineTeacher, from_pretrained
from dmdcli.models.transformer import (
    ATTENTION_LORA_TARGETS,
    PackedDenoiser,
    not_flow_matching,
    pack_latents,
    unpack_latents,
)

if TYPE_CHECKING:
    from dmdcli.models.teacher import TeacherSpec

# QwenImagePipeline's default max_sequence_length: the prompt positions after the template's drop.
PROMPT_TOKENS = 512
NEGATIVE_PROMPT = " "  # the model card's negative prompt ("if you do not have a concept to remove")
TRUE_CFG_SCALE = 4.0  # the model card's (and QwenImagePipeline's default) CFG scale
QWEN_IMAGE = "Qwen/Qwen-Image"

# Attention (both streams) and both streams' MLPs (Qwen-Image's names for the feed-forwards).
QWEN_IMAGE_LORA_TARGETS = (
    *ATTENTION_LORA_TARGETS,
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)


class QwenImageTeacher(PipelineTeacher):
    """A QwenImagePipeline's frozen parts. Prompts are encoded by the pipeline's own encode_prompt
    (its template, the drop of the template's tokens, the mask), on a pipeline holding only the
    tokenizer and the text encoder."""

    network_class = "QwenImageTransformer2DModel"
    vae_class = "AutoencoderKLQwenImage"

    def load_text_encoders(self, allow_pickle: bool) -> tuple[list, list[nn.Module]]:
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        tokenizer = from_pretrained(AutoTokenizer, self.spec, "tokenizer", True)
        encoder = from_pretrained(Qwen2_5_VLForConditionalGeneration, self.spec, "text_encoder", allow_pickle)
        return [tokenizer], [encoder]

    @property
    def prompt_tokens(self) -> int:
        return self.spec.text_tokens(PROMPT_TOKENS)  # a recorded max_sequence_length, else the pipeline's

    def _encoder_pipeline(self):
        """Made per call, not kept: a kept one would hold the text encoder after it is released."""
        from diffusers import QwenImagePipeline

        (tokenizer,), (encoder,) = self.tokenizers, self.text_encoders
        return QwenImagePipeline(scheduler=None, vae=None, text_encoder=encoder, tokenizer=tokenizer, transformer=None)

    def token_limits(self) -> list[tuple[object, int]]:
        """A prompt's own tokens: the positions kept, less the template's end (after the prompt)."""
        pipe = self._encoder_pipeline()
        template = len(self.tokenizers[0](pipe.prompt_template_encode.format("")).input_ids)
        return [(self.tokenizers[0], self.prompt_tokens - (template - pipe.prompt_template_encode_start_idx))]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """QwenImagePipeline.encode_prompt's states and mask, zero-padded to `prompt_tokens` positions
        (the pipeline pads to the batch's longest prompt: a fixed length lets the prompt cache and
        CFG batch them; the mask keeps the padding out of attention)."""
        self.check_encoders()
        states, mask = self._encoder_pipeline().encode_prompt(
            prompts, device=self.device, max_sequence_length=self.prompt_tokens
        )
        if mask is None:  # the pipeline's "every position is a prompt token"
            mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
        pad = self.prompt_tokens - states.shape[1]
        return {
            "encoder_hidden_states": self.as_read(nn.functional.pad(states, (0, 0, 0, pad))),
            "encoder_hidden_states_mask": nn.functional.pad(mask, (0, pad)).float(),
        }

    @torch.no_grad()
    def empty_cond(self) -> Cond:
        return self.encode_prompts([NEGATIVE_PROMPT])

    @staticmethod
    def conditioning_shapes(network_config: dict, spec: TeacherSpec) -> dict[str, tuple[int, ...]]:
        tokens = spec.text_tokens(PROMPT_TOKENS)
        return {
            "encoder_hidden_states": (tokens, network_config["joint_attention_dim"]),
            "encoder_hidden_states_mask": (tokens,),
        }

    # -- Wan's VAE: video latents [B, C, frames, h, w], here one frame --------------------------

    @staticmethod
    def vae_scale_factor(vae_config: dict) -> int:
        return 2 ** len(vae_config.get("temperal_downsample", [False, True, True]))  # as QwenImagePipeline

    def latent_normalization(self) -> tuple[Tensor, Tensor]:
        """Per channel: latents = (z − mean) / std, as the pipeline computes them (scale = 1 / std)."""
        config = self.vae.config
        mean = torch.tensor(config["latents_mean"]).view(1, -1, 1, 1).to(self.device)
        return mean, 1.0 / torch.tensor(config["latents_std"]).view(1, -1, 1, 1).to(self.device)

    def vae_sample(self, images: Tensor, generator: torch.Generator) -> Tensor:
        return super().vae_sample(images[:, :, None], generator)[:, :, 0]

    def vae_decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z[:, :, None]).sample[:, :, 0]


class QwenImageDenoiser(PackedDenoiser):
    """A QwenImageTransformer2DModel, as QwenImagePipeline calls it: packed latents, the timestep σ,
    the image's token grid (img_shapes) for its RoPE, the text states and their mask.

    `cond` holds "encoder_hidden_states" [B, L, D] and "encoder_hidden_states_mask" [B, L]; the
    text is cut to the batch's longest prompt first, as the pipeline pads it (the padding is masked
    out, so this only saves work), and the mask is dropped when nothing is padding, as there."""

    def _call(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        dtype, (b, _, h, w) = self.transformer.dtype, x_t.shape
        text, mask = _cut_to_longest(cond["encoder_hidden_states"], cond["encoder_hidden_states_mask"])
        out = self.transformer(
            hidden_states=pack_latents(x_t).to(dtype),
            encoder_hidden_states=text.to(dtype),
            encoder_hidden_states_mask=mask,
            timestep=(self.schedule.network_timestep(t.to(x_t.device)) / 1000).to(dtype),
            img_shapes=[(1, h // 2, w // 2)] * b,
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)


def _cut_to_longest(text: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
    """(text [B, n], its mask or None when it masks nothing), n the positions up to the last one any
    prompt uses. On the meta device (the memory estimate), which has no values: all positions, unmasked."""
    if text.device.type == "meta":
        return text, None
    lengths = mask.sum(dim=1).long().tolist()  # one host sync: each prompt's mask is a prefix of ones
    n = max(*lengths, 1)
    return text[:, :n], None if min(lengths) == n else mask[:, :n].bool()


def qwen_image_guidance(scale: float | None) -> dict[str, Any]:
    """QwenImagePipeline's CFG ("true CFG": its guidance_scale is for guidance-distilled models) runs
    only with a negative prompt; None: the model card's scale 4 with " "."""
    scale = TRUE_CFG_SCALE if scale is None else scale
    return {"true_cfg_scale": scale, "negative_prompt": NEGATIVE_PROMPT} if scale > 1 else {"true_cfg_scale": 1}


def _qwen_image_pipeline(index: dict[str, Any]) -> bool:
    """QwenImagePipeline itself: the Edit, ControlNet and img2img pipelines share its transformer class."""
    return index.get("_class_name") == "QwenImagePipeline" and (index.get("transformer") or [None, None])[1] == (
        "QwenImageTransformer2DModel"
    )


def _unsupported(
    index: dict[str, Any], transformer: dict[str, Any], vae: dict[str, Any], scheduler: dict[str, Any]
) -> str | None:
    changed = [
        k for k in ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope") if transformer.get(k)
    ]
    if changed:
        return (
            f"unsupported Qwen-Image transformer with {', '.join(changed)}: dmd distills the text-to-image Qwen-Image"
        )
    return not_flow_matching(scheduler, "a Qwen-Image transformer")


def qwen_image_shape(config: dict[str, Any]) -> NetworkShape:
    """Tokens are 2×2 patches of 16-channel latents (in_channels 64); the native size is the
    pipeline's default, 128 latents (1024 pixels)."""
    return NetworkShape(native_latent_side=128, latent_channels=int(config.get("in_channels", 64)) // 4, downsample=2)


QWEN = register(
    Family(
        name="qwen-image",
        distills="Qwen-Image (QwenImagePipeline)",
        layout="qwen-image",
        teacher=QwenImageTeacher,
        denoiser=QwenImageDenoiser,
        network_shape=qwen_image_shape,
        conditioning_timestep=999,  # σ = 1: the pure noise a 1-step student starts from
        network="transformer",
        lora_targets=QWEN_IMAGE_LORA_TARGETS,
        denoiser_options=("gan_feature_block",),
        pipeline_guidance=qwen_image_guidance,
        unsupported=_unsupported,
        recognises=_qwen_image_pipeline,
        aliases={"qwen-image": QWEN_IMAGE},
        recipe=lambda steps, lora_rank: "qwen-image",
        title="a Qwen-Image teacher",
    )
)
