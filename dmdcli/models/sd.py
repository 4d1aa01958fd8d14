"""The Stable Diffusion families: SD (1.x, 2.x: one CLIP text encoder) and SDXL (two, pooled embeds, time ids).

Both are diffusers UNet2DConditionModel pipelines behind UNetDenoiser, loaded and conditioned by
the teachers below. They differ in their reference values (DMD2): SDXL's 1-step generator is told
t = 399 (SD1.5's: 999), and an SDXL teacher without --recipe gets the reference's SDXL recipe,
where an SD teacher's values are the code defaults.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from dmdcli.core.denoiser import Cond
from dmdcli.models.families import Family, NetworkShape, register
from dmdcli.models.pipeline import PipelineTeacher, from_pretrained, has_component, names_network
from dmdcli.models.unet import UNetDenoiser

if TYPE_CHECKING:
    from dmdcli.models.teacher import TeacherSpec

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
# The DMD2 reference's SDXL LoRA targets: attention, feed-forward, resnet convs, resampling
# convs and the time-embedding projections.
UNET_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)


class SDTeacher(PipelineTeacher):
    """An SD 1.x / 2.x pipeline: one CLIP text encoder, whose last hidden state conditions the UNet."""

    def load_text_encoders(self, allow_pickle: bool) -> tuple[list, list[nn.Module]]:
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = from_pretrained(CLIPTokenizer, self.spec, "tokenizer", True)
        return [tokenizer], [from_pretrained(CLIPTextModel, self.spec, "text_encoder", allow_pickle)]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """The last hidden state of the CLIP encoder, as StableDiffusionPipeline computes it."""
        self.check_encoders()
        (tokenizer,), (encoder,) = self.tokenizers, self.text_encoders
        return {"encoder_hidden_states": self.as_read(encoder(self._token_ids(tokenizer, prompts))[0])}

    @staticmethod
    def conditioning_shapes(network_config: dict, spec: TeacherSpec) -> dict[str, tuple[int, ...]]:
        return {"encoder_hidden_states": (77, network_config["cross_attention_dim"])}

    @torch.no_grad()
    def empty_cond(self) -> Cond:
        """The empty prompt encoded, as the SD pipelines do for CFG."""
        return self.encode_prompts([""])


class SDXLTeacher(SDTeacher):
    """An SDXL pipeline: two CLIP text encoders, pooled embeds and the micro-conditioning time ids.

    resolution: the training resolution; the time ids are (R, R, 0, 0, R, R)."""

    def load_text_encoders(self, allow_pickle: bool) -> tuple[list, list[nn.Module]]:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        tokenizers, encoders = super().load_text_encoders(allow_pickle)
        tokenizers.append(from_pretrained(CLIPTokenizer, self.spec, "tokenizer_2", True))
        encoders.append(from_pretrained(CLIPTextModelWithProjection, self.spec, "text_encoder_2", allow_pickle))
        return tokenizers, encoders

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """As StableDiffusionXLPipeline: the penultimate hidden states of both encoders concatenated,
        the second encoder's pooled projection, and the time ids."""
        self.check_encoders()
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            out = encoder(self._token_ids(tokenizer, prompts), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]
        return {
            "encoder_hidden_states": self.as_read(torch.cat(hidden, dim=-1)),
            "text_embeds": self.as_read(pooled),
            "time_ids": self.time_ids(len(prompts)),
        }

    @staticmethod
    def conditioning_shapes(network_config: dict, spec: TeacherSpec) -> dict[str, tuple[int, ...]]:
        pooled = network_config["projection_class_embeddings_input_dim"] - 6 * network_config["addition_time_embed_dim"]
        return {**SDTeacher.conditioning_shapes(network_config, spec), "text_embeds": (pooled,), "time_ids": (6,)}

    def time_ids(self, batch: int) -> Tensor:
        """SDXL micro-conditioning (original size, crop top-left, target size), fixed square."""
        r = float(self.resolution)
        return torch.tensor([[r, r, 0.0, 0.0, r, r]], device=self.device).expand(batch, 6)

    @torch.no_grad()
    def empty_cond(self) -> Cond:
        """Zeros, as the SDXL pipeline does for an empty negative prompt and the DMD2 reference does,
        unless the teacher's pipeline sets force_zeros_for_empty_prompt false: then the empty prompt
        encoded, as that pipeline does."""
        cond = self.encode_prompts([""])
        if self.spec.force_zeros_for_empty_prompt:
            cond["encoder_hidden_states"] = torch.zeros_like(cond["encoder_hidden_states"])
            cond["text_embeds"] = torch.zeros_like(cond["text_embeds"])
        return cond


def _unet_pipeline(index: dict[str, Any], encoders: int) -> bool:
    """Whether model_index.json describes a UNet2DConditionModel pipeline with `encoders` CLIP text encoders."""
    complete = names_network(index, "unet", "UNet2DConditionModel", ("vae", "text_encoder", "scheduler"))
    return complete and (2 if has_component(index, "text_encoder_2") else 1) == encoders


def unet_shape(config: dict[str, Any]) -> NetworkShape:
    return NetworkShape(
        native_latent_side=int(config.get("sample_size", 64)),
        latent_channels=int(config.get("in_channels", 4)),
        downsample=2 ** (len(config.get("down_block_types", [0] * 4)) - 1),
    )


def _unsupported(
    index: dict[str, Any], unet: dict[str, Any], vae: dict[str, Any], scheduler: dict[str, Any]
) -> str | None:
    """What the schedule math and the VAE code would get silently wrong for a UNet teacher: one
    trained on an EDM or flow-matching schedule (DDPMScheduler.from_config would fill in its default
    linear betas), and a VAE whose latents are normalized by a mean/std or shift (Playground v2.5)."""
    name = scheduler.get("_class_name", "?")
    discrete = "beta_schedule" in scheduler or scheduler.get("trained_betas") is not None
    if not discrete or "EDM" in name or "FlowMatch" in name:
        return (
            f"unsupported scheduler {name}: dmd distills UNet teachers trained on a discrete DDPM schedule "
            "(betas); EDM-trained UNets are not supported"
        )
    normalized = [k for k in ("latents_mean", "latents_std", "shift_factor") if vae.get(k) is not None]
    if normalized:
        return f"unsupported VAE: its latents are normalized ({', '.join(normalized)}), which dmd does not apply"
    return None


def _sdxl_unsupported(
    index: dict[str, Any], unet: dict[str, Any], vae: dict[str, Any], scheduler: dict[str, Any]
) -> str | None:
    if unet.get("addition_embed_type") != "text_time":
        return "unsupported SDXL-like pipeline: its UNet takes no text_time conditioning"
    return _unsupported(index, unet, vae, scheduler)


def _unet_denoiser(unet: nn.Module, schedule) -> UNetDenoiser:
    return UNetDenoiser(unet)  # a UNet takes the timestep index itself


def sdxl_recipe(steps: int, lora_rank: int | None) -> str:
    """The reference's SDXL values: CFG 8, TTUR 5, GAN 5e-3, 1024², the LR of full or LoRA training."""
    if steps == 1:
        return "sdxl-1step"
    return "sdxl-4step-lora" if lora_rank else "sdxl-4step"


# What SD and SDXL share: a UNet, behind UNetDenoiser, with the reference's LoRA targets.
UNET = dict(denoiser=_unet_denoiser, network_shape=unet_shape, lora_targets=UNET_LORA_TARGETS)
SD = register(
    Family(
        name="sd",
        distills="Stable Diffusion 1.x / 2.x (StableDiffusionPipeline)",
        layout="sd",
        teacher=SDTeacher,
        conditioning_timestep=999,
        unsupported=_unsupported,
        **UNET,
        tiny_autoencoder="madebyollin/taesd",
        recognises=lambda index: _unet_pipeline(index, encoders=1),
        aliases={
            "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "sd21": "stabilityai/stable-diffusion-2-1",
        },
    )
)
SDXL = register(
    Family(
        name="sdxl",
        distills="SDXL (StableDiffusionXLPipeline)",
        layout="sdxl",
        teacher=SDXLTeacher,
        conditioning_timestep=399,
        unsupported=_sdxl_unsupported,
        **UNET,
        tiny_autoencoder="madebyollin/taesdxl",  # the reference's 1-step pre-training decodes with it
        recognises=lambda index: _unet_pipeline(index, encoders=2),
        aliases={"sdxl": SDXL_BASE, "stabilityai/sdxl": SDXL_BASE},  # the second: what users type from our examples
        recipe=sdxl_recipe,
        title="an SDXL teacher, with the reference's values",
    )
)
