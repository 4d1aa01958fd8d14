"""The FLUX.1-dev family: a guidance-distilled flow-matching transformer.

A FluxTransformer2DModel predicts the velocity v = ε − x0 on sigmas shifted by the image's token
count (FlowMatchEulerDiscreteScheduler with use_dynamic_shifting), conditioned on T5's states and
CLIP-L's pooled output. FLUX.1-dev was distilled from a CFG teacher into one that is told the
guidance strength (its guidance embedding): the real score is the teacher told
--embedded-guidance with no CFG, and the generator and the fake score are told the same.
FLUX.1-schnell, already a few-step timestep-distilled model without that embedding, is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dmdcli.core.denoiser import Cond
from dmdcli.models.families import Family, NetworkShape, register
from dmdcli.models.pipeline import PipelineTeacher, from_pretrained, names_network
from dmdcli.models.transformer import TRANSFORMER_LORA_TARGETS, FluxDenoiser, not_flow_matching

if TYPE_CHECKING:
    from dmdcli.models.teacher import TeacherSpec

# FluxPipeline's default T5 length (max_sequence_length; FLUX.1-schnell's is 256).
T5_TOKENS = 512
FLUX_DEV = "black-forest-labs/FLUX.1-dev"


class FluxTeacher(PipelineTeacher):
    """A FLUX pipeline: CLIP-L's pooled output and T5's last hidden state, as FluxPipeline.encode_prompt."""

    network_class = "FluxTransformer2DModel"

    def load_text_encoders(self, allow_pickle: bool) -> tuple[list, list[nn.Module]]:
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        tokenizers = [from_pretrained(AutoTokenizer, self.spec, f, True) for f in ("tokenizer", "tokenizer_2")]
        clip = from_pretrained(CLIPTextModel, self.spec, "text_encoder", allow_pickle)
        return tokenizers, [clip, from_pretrained(T5EncoderModel, self.spec, "text_encoder_2", allow_pickle)]

    def token_limits(self) -> list[tuple[object, int]]:
        clip, t5 = self.tokenizers
        return [(clip, clip.model_max_length), (t5, self.spec.text_tokens(T5_TOKENS))]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        self.check_encoders()
        (clip_tokenizer, t5_tokenizer), (clip, t5) = self.tokenizers, self.text_encoders
        pooled = clip(self._token_ids(clip_tokenizer, prompts)).pooler_output
        states = t5(self._token_ids(t5_tokenizer, prompts, self.spec.text_tokens(T5_TOKENS)))[0]
        return {"encoder_hidden_states": self.as_read(states), "pooled_projections": self.as_read(pooled)}

    @torch.no_grad()
    def empty_cond(self) -> Cond:
        """The empty prompt encoded (what FluxPipeline's true CFG would use; DMD2 on FLUX runs none)."""
        return self.encode_prompts([""])

    @staticmethod
    def conditioning_shapes(network_config: dict, spec: TeacherSpec) -> dict[str, tuple[int, ...]]:
        return {
            "encoder_hidden_states": (spec.text_tokens(T5_TOKENS), network_config["joint_attention_dim"]),
            "pooled_projections": (network_config["pooled_projection_dim"],),
        }


def _flux_pipeline(index: dict[str, Any]) -> bool:
    return names_network(
        index, "transformer", "FluxTransformer2DModel", ("vae", "scheduler", "text_encoder", "text_encoder_2")
    )


def _unsupported(
    index: dict[str, Any], transformer: dict[str, Any], vae: dict[str, Any], scheduler: dict[str, Any]
) -> str | None:
    if not transformer.get("guidance_embeds", False):
        return (
            "unsupported FLUX transformer without a guidance embedding (FLUX.1-schnell): it is already a few-step "
            "timestep-distilled model with no guidance to distill; dmd distills guidance-distilled FLUX.1-dev"
        )
    return not_flow_matching(scheduler, "a FLUX transformer")


def flux_shape(config: dict[str, Any]) -> NetworkShape:
    """FLUX packs 2×2 latent patches into tokens (in_channels = 4 × the latent channels); its config
    names no native size, so the VAE's (FLUX.1-dev: 1024) stands for it."""
    return NetworkShape(native_latent_side=None, latent_channels=int(config.get("in_channels", 64)) // 4, downsample=2)


def flux_recipe(steps: int, lora_rank: int | None) -> str:
    """No CFG on the real score (--guidance-scale 1): the teacher is told the guidance instead."""
    return "flux-dev"


FLUX = register(
    Family(
        name="flux",
        distills="FLUX.1-dev (FluxPipeline)",
        layout="flux",
        teacher=FluxTeacher,
        denoiser=FluxDenoiser,
        network_shape=flux_shape,
        conditioning_timestep=999,  # σ = 1: the pure noise a 1-step student starts from
        network="transformer",
        lora_targets=TRANSFORMER_LORA_TARGETS,
        denoiser_options=("embedded_guidance", "gan_feature_block"),
        classifier_free_guidance=False,
        tiny_autoencoder="madebyollin/taef1",
        unsupported=_unsupported,
        recognises=_flux_pipeline,
        aliases={"flux-dev": FLUX_DEV},
        recipe=flux_recipe,
        title="a FLUX.1-dev teacher (guidance-distilled: no CFG)",
    )
)
