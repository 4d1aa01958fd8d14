"""The Z-Image family: a single-stream flow-matching transformer (ZImageTransformer2DModel) read by Qwen3.

The base model (Tongyi-MAI/Z-Image, undistilled: 28 to 50 steps with CFG) is the one to distill;
Z-Image-Turbo is already an 8-step DMD student of it (nothing in its config files tells the two
apart, so it is not refused: distilling it again gains nothing). ZImagePipeline's conventions,
kept here so that the engine sees the same interface as every family's:

- the network is told 1 − σ (its time runs from noise at 0 to data at 1) and predicts x0 − ε, the
  negated velocity: the adapter gives it 1 − σ and returns minus its output (v = ε − x0);
- it takes lists: each image [C, 1, h, w] (a frame axis) and each prompt's own tokens only (no
  padding), which it patchifies 2×2 and joins into one sequence per image, image tokens first;
- its CFG reads `pos + s·(pos − neg)`: the usual scale w is 1 + s (`z_image_guidance`).

A prompt is Qwen3's second-to-last hidden state over its chat template (thinking on, as the
pipeline asks), the template's and the prompt's tokens only; prompts differ in length, so each is
padded with zeros to 512 positions and a mask marks its own (cut back to its tokens per forward).
The schedule is the scheduler config's static shift (6 for the base model).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from dmdcli.core.denoiser import Cond
from dmdcli.models.families import Family, NetworkShape, register
from dmdcli.models.pipeline import PipelineTeacher, chat_template_limit, from_pretrained
from dmdcli.models.transformer import TransformerDenoiser, not_flow_matching

if TYPE_CHECKING:
    from dmdcli.models.teacher import TeacherSpec

PROMPT_TOKENS = 512  # ZImagePipeline's max_sequence_length
Z_IMAGE = "Tongyi-MAI/Z-Image"

# Attention and the SwiGLU feed-forward of every block (the refiners' too).
Z_IMAGE_LORA_TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
Z_IMAGE_LORA_TARGETS += ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


class ZImageTeacher(PipelineTeacher):
    """A ZImagePipeline's frozen parts; prompts through the pipeline's own encoding, on a pipeline
    holding only the tokenizer and the text encoder."""

    network_class = "ZImageTransformer2DModel"

    def load_text_encoders(self, allow_pickle: bool) -> tuple[list, list[nn.Module]]:
        from transformers import AutoTokenizer, Qwen3Model

        tokenizer = from_pretrained(AutoTokenizer, self.spec, "tokenizer", True)
        return [tokenizer], [from_pretrained(Qwen3Model, self.spec, "text_encoder", allow_pickle)]

    @property
    def prompt_tokens(self) -> int:
        return self.spec.text_tokens(PROMPT_TOKENS)

    def _encoder_pipeline(self):
        """Made per call, not kept: a kept one would hold the text encoder after it is released."""
        from diffusers import ZImagePipeline

        (tokenizer,), (encoder,) = self.tokenizers, self.text_encoders
        return ZImagePipeline(scheduler=None, vae=None, text_encoder=encoder, tokenizer=tokenizer, transformer=None)

    def token_limits(self) -> list[tuple[object, int]]:
        """A prompt's own tokens: the positions read, less the chat template's around it."""
        (tokenizer,) = self.tokenizers
        return [(tokenizer, chat_template_limit(tokenizer, self.prompt_tokens, enable_thinking=True))]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """The pipeline's per-prompt states (its own tokens only), zero-padded to `prompt_tokens`
        positions with a mask (a fixed length lets the prompt cache and CFG batch them)."""
        self.check_encoders()
        # (a copy: the pipeline writes the templated prompts into the list it is given)
        states = self._encoder_pipeline()._encode_prompt(
            list(prompts), device=self.device, max_sequence_length=self.prompt_tokens
        )
        lengths = torch.tensor([len(s) for s in states], device=self.device)
        padded = torch.stack([nn.functional.pad(s, (0, 0, 0, self.prompt_tokens - len(s))) for s in states])
        mask = torch.arange(self.prompt_tokens, device=self.device)[None] < lengths[:, None]
        return {"encoder_hidden_states": self.as_read(padded), "encoder_hidden_states_mask": mask.float()}

    @torch.no_grad()
    def empty_cond(self) -> Cond:
        """The empty prompt encoded: ZImagePipeline's negative prompt for CFG."""
        return self.encode_prompts([""])

    @staticmethod
    def conditioning_shapes(network_config: dict, spec: TeacherSpec) -> dict[str, tuple[int, ...]]:
        tokens = spec.text_tokens(PROMPT_TOKENS)
        return {
            "encoder_hidden_states": (tokens, network_config.get("cap_feat_dim", 2560)),
            "encoder_hidden_states_mask": (tokens,),
        }


class ZImageDenoiser(TransformerDenoiser):
    """A ZImageTransformer2DModel, as ZImagePipeline calls it (see the module's docstring).

    `cond` holds "encoder_hidden_states" [B, L, D] and "encoder_hidden_states_mask" [B, L]."""

    patch = 2

    @property
    def blocks(self) -> list[nn.Module]:
        """The main layers (after the image and text refiners), on the joint sequence."""
        return list(self.transformer.layers)

    @staticmethod
    def image_tokens(block_output, count: int) -> Tensor:
        """Each image's joint sequence starts with its own tokens (then its padding, then the text)."""
        return block_output[:, :count]

    def _call(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        dtype = self.transformer.dtype
        time = (1000 - self.schedule.network_timestep(t.to(x_t.device)).float()) / 1000  # 1 − σ
        out = self.transformer(
            list(x_t.to(dtype).unsqueeze(2).unbind(0)),
            time,
            _captions(cond["encoder_hidden_states"].to(dtype), cond["encoder_hidden_states_mask"]),
            return_dict=False,
        )[0]
        return -torch.stack(out).squeeze(2)


def _captions(text: Tensor, mask: Tensor) -> list[Tensor]:
    """Each prompt's own positions [n_i, D], as the pipeline hands them: its mask's leading ones (one
    host sync for the batch). On the meta device (the memory estimate), which has no values: every
    position."""
    if text.device.type == "meta":
        return list(text.unbind(0))
    return [row[:n] for row, n in zip(text, mask.sum(dim=1).long().tolist())]


def z_image_guidance(scale: float | None) -> dict[str, Any]:
    """ZImagePipeline's guidance_scale s runs pos + s·(pos − neg), the usual scale w = 1 + s; None:
    its default (5, w = 6); ≤ 1: no CFG (s = 0)."""
    return {} if scale is None else {"guidance_scale": max(scale - 1.0, 0.0)}


def _z_image_pipeline(index: dict[str, Any]) -> bool:
    """ZImagePipeline itself (its Omni, img2img, inpaint and ControlNet pipelines are others)."""
    return index.get("_class_name") == "ZImagePipeline" and (index.get("transformer") or [None, None])[1] == (
        "ZImageTransformer2DModel"
    )


def _unsupported(
    index: dict[str, Any], transformer: dict[str, Any], vae: dict[str, Any], scheduler: dict[str, Any]
) -> str | None:
    if list(transformer.get("all_patch_size", [2])) != [2] or list(transformer.get("all_f_patch_size", [1])) != [1]:
        return "unsupported Z-Image transformer with other patch sizes than 2×2: dmd distills the text-to-image Z-Image"
    return not_flow_matching(scheduler, "a Z-Image transformer")


def z_image_shape(config: dict[str, Any]) -> NetworkShape:
    """2×2 patches of 16-channel latents; its config names no native size, so the VAE's (1024) stands for it."""
    return NetworkShape(native_latent_side=None, latent_channels=int(config.get("in_channels", 16)), downsample=2)


Z = register(
    Family(
        name="z-image",
        distills="Z-Image (ZImagePipeline)",
        layout="z-image",
        teacher=ZImageTeacher,
        denoiser=ZImageDenoiser,
        network_shape=z_image_shape,
        conditioning_timestep=999,  # σ = 1: the pure noise a 1-step student starts from
        network="transformer",
        lora_targets=Z_IMAGE_LORA_TARGETS,
        denoiser_options=("gan_feature_block",),
        pipeline_guidance=z_image_guidance,
        tiny_autoencoder="madebyollin/taef1",  # FLUX.1's VAE
        unsupported=_unsupported,
        recognises=_z_image_pipeline,
        aliases={"z-image": Z_IMAGE},
        recipe=lambda steps, lora_rank: "z-image",
        title="a Z-Image teacher",
    )
)
