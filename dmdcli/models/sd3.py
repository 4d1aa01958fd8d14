"""The Stable Diffusion 3 family (SD3-medium, SD3.5-medium / large): a flow-matching transformer.

An SD3Transformer2DModel predicts the velocity v = ε − x0 on the teacher's shifted sigmas
(FlowMatchEulerDiscreteScheduler, s = 3), conditioned on three text encoders: CLIP-L and CLIP-G
(penultimate hidden states and pooled projections) and T5 (its last hidden state). The real score
uses classifier-free guidance with the empty prompt encoded, as StableDiffusion3Pipeline does.

A pipeline without T5 (text_encoder_3 and tokenizer_3 null, as diffusers documents for saving
memory) gets zeros in T5's place, as StableDiffusion3Pipeline gives it: `max_sequence_length`
positions of them, 256 unless the pipeline records another (TeacherSpec.max_sequence_length).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dmdcli.core.denoiser import Cond
from dmdcli.models.families import Family, NetworkShape, register
from dmdcli.models.pipeline import PipelineTeacher, from_pretrained, names_network
from dmdcli.models.transformer import TRANSFORMER_LORA_TARGETS, SD3Denoiser, not_flow_matching

if TYPE_CHECKING:
    from dmdcli.models.teacher import TeacherSpec

# StableDiffusion3Pipeline's default T5 length (max_sequence_length).
T5_TOKENS = 256


class SD3Teacher(PipelineTeacher):
    """An SD3 pipeline: CLIP-L, CLIP-G and T5, as StableDiffusion3Pipeline.encode_prompt combines them."""

    network_class = "SD3Transformer2DModel"

    @property
    def has_t5(self) -> bool:
        return "text_encoder_3" not in self.spec.absent

    @property
    def t5_tokens(self) -> int:
        """The T5 positions of a prompt (StableDiffusion3Pipeline's max_sequence_length)."""
        return self.spec.text_tokens(T5_TOKENS)

    def load_text_encoders(self, allow_pickle: bool) -> tuple[list, list[nn.Module]]:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        folders = ("tokenizer", "tokenizer_2", "tokenizer_3") if self.has_t5 else ("tokenizer", "tokenizer_2")
        tokenizers = [from_pretrained(AutoTokenizer, self.spec, f, True) for f in folders]
        encoders = [
            from_pretrained(CLIPTextModelWithProjection, self.spec, f, allow_pickle)
            for f in ("text_encoder", "text_encoder_2")
        ]
        if self.has_t5:
            encoders.append(from_pretrained(T5EncoderModel, self.spec, "text_encoder_3", allow_pickle))
        return tokenizers, encoders

    def token_limits(self) -> list[tuple[object, int]]:
        clip = self.tokenizers[0]
        return [(clip, clip.model_max_length)] + ([(self.tokenizers[2], self.t5_tokens)] if self.has_t5 else [])

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """The two CLIPs' penultimate states concatenated and zero-padded to T5's width, followed
        by T5's states along the sequence; the CLIPs' pooled projections concatenated."""
        self.check_encoders()
        hidden, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers[:2], self.text_encoders[:2]):
            out = encoder(self._token_ids(tokenizer, prompts), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        if self.has_t5:
            t5_states = self.text_encoders[2](self._token_ids(self.tokenizers[2], prompts, self.t5_tokens))[0]
        else:  # zeros of the transformer's width, as the pipeline's
            width = self.network_config["joint_attention_dim"]  # (the network itself is read after the prompts)
            t5_states = hidden[0].new_zeros(len(prompts), self.t5_tokens, width)
        clip_states = torch.cat(hidden, dim=-1)
        clip_states = nn.functional.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        return {
            "encoder_hidden_states": self.as_read(torch.cat([clip_states, t5_states], dim=-2)),
            "pooled_projections": self.as_read(torch.cat(pooled, dim=-1)),
        }

    @staticmethod
    def conditioning_shapes(network_config: dict, spec: TeacherSpec) -> dict[str, tuple[int, ...]]:
        return {
            "encoder_hidden_states": (77 + spec.text_tokens(T5_TOKENS), network_config["joint_attention_dim"]),
            "pooled_projections": (network_config["pooled_projection_dim"],),
        }

    @torch.no_grad()
    def empty_cond(self) -> Cond:
        """The empty prompt encoded, as StableDiffusion3Pipeline's default negative prompt."""
        return self.encode_prompts([""])


def _sd3_pipeline(index: dict[str, Any]) -> bool:
    return names_network(
        index, "transformer", "SD3Transformer2DModel", ("vae", "scheduler", "text_encoder", "text_encoder_2")
    )


def _unsupported(
    index: dict[str, Any], transformer: dict[str, Any], vae: dict[str, Any], scheduler: dict[str, Any]
) -> str | None:
    if reason := not_flow_matching(scheduler, "an SD3 transformer"):
        return reason
    if vae.get("latents_mean") is not None:
        return "unsupported VAE: its latents are normalized by a mean and std, which dmd does not apply"
    return None


def transformer_shape(config: dict[str, Any]) -> NetworkShape:
    return NetworkShape(
        native_latent_side=int(config.get("sample_size", 128)),
        latent_channels=int(config.get("in_channels", 16)),
        downsample=int(config.get("patch_size", 2)),
    )


SD3 = register(
    Family(
        name="sd3",
        distills="SD3 / SD3.5 (StableDiffusion3Pipeline)",
        layout="sd3",
        teacher=SD3Teacher,
        denoiser=SD3Denoiser,
        network_shape=transformer_shape,
        # σ_999 = 1: the pure noise a 1-step student starts from (a flow teacher was trained up to it)
        conditioning_timestep=999,
        network="transformer",
        lora_targets=TRANSFORMER_LORA_TARGETS,
        denoiser_options=("gan_feature_block",),
        tiny_autoencoder="madebyollin/taesd3",
        unsupported=_unsupported,
        recognises=_sd3_pipeline,
        aliases={
            "sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
            "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
            "sd3.5-large": "stabilityai/stable-diffusion-3.5-large",
        },
        recipe=lambda steps, lora_rank: "sd3",  # the GAN with --data; no reference values to follow
        title="an SD3 teacher",
    )
)
