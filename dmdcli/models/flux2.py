"""The FLUX.2 families: a flow-matching transformer (Flux2Transformer2DModel) read by an LLM.

Two kinds of teacher share the transformer, the latents and the schedule:
- FLUX.2 [klein] base (Flux2KleinPipeline, Qwen3): undistilled, it samples in 50 steps with CFG
  (guidance scale 4, the empty prompt as the negative one). Its step-distilled models
  (`is_distilled`) are refused.
- FLUX.2 [dev] (Flux2Pipeline, Mistral Small 3.1 behind a PixtralProcessor): guidance-distilled,
  like FLUX.1-dev: told the guidance strength through its guidance embedding (the pipeline's
  guidance_scale, 4), it takes no CFG, so its real score is the teacher told --embedded-guidance.

The transformer predicts the velocity v = ε − x0 on sigmas shifted by the image's token count,
with μ from the pipelines' own fit (`compute_empirical_mu`), which also depends on the number of
sampling steps: the schedule here is the one the pipelines sample the teacher on at their default
50 steps, the same μ for every timestep of the run (an exported student's scheduler gets it as a
static shift, since the pipeline would compute another μ from the student's few steps).

Latents: FLUX.2's VAE (AutoencoderKLFlux2) has 32 channels; the pipelines turn each 2×2 patch
into 128 channels and normalize those by the VAE's batch-norm statistics. The engine handles
those normalized 128-channel latents [B, 128, H/16, W/16] (the grid the transformer sees, one token
per position: no packing here, and the VAE's factor is 16), so per-channel normalization is a
shift and a scale as for every family. A prompt is the LLM's hidden states after three layers
([klein]'s Qwen3: 9, 18, 27; [dev]'s Mistral: 10, 20, 30), stacked along the width, over the
pipeline's chat template, padded to 512 positions (the padding is not masked: the pipelines give
the transformer every position).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from dmdcli.core.denoiser import Cond
from dmdcli.models.families import Family, NetworkShape, register
from dmdcli.models.pipeline import PipelineTeacher, added_tokens, chat_template_limit, from_pretrained, names_network
from dmdcli.models.transformer import ATTENTION_LORA_TARGETS, TransformerDenoiser, not_flow_matching

if TYPE_CHECKING:
    from dmdcli.models.teacher import TeacherSpec

PROMPT_TOKENS = 512  # the FLUX.2 pipelines' max_sequence_length
DEFAULT_STEPS = 50  # their num_inference_steps: the step count μ is computed for
KLEIN_4B = "black-forest-labs/FLUX.2-klein-base-4B"
KLEIN_9B = "black-forest-labs/FLUX.2-klein-base-9B"
FLUX2_DEV = "black-forest-labs/FLUX.2-dev"

# Attention of both streams, both streams' feed-forwards, and the single blocks' fused projections
# in (attention's q, k, v and the MLP's input) and out. The single blocks' out is named by index, as
# diffusers' FLUX.2 LoRA scripts name it: the double blocks' to_out is a ModuleList peft cannot wrap,
# and a suffix would match it too (48: FLUX.2 [dev]'s single blocks; [klein] has 20 or 24).
FLUX2_LORA_TARGETS = (
    *ATTENTION_LORA_TARGETS,
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
    "attn.to_qkv_mlp_proj",
    *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(48)),
)


def _pipeline():
    """Flux2KleinPipeline: its static latent helpers are Flux2Pipeline's too (diffusers copies them)."""
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline


class Flux2Teacher(PipelineTeacher):
    """A Flux2KleinPipeline's frozen parts: prompts through the pipeline's own Qwen3 encoding (its
    chat template and layers), latents in the patchified, batch-normalized space it denoises in."""

    network_class = "Flux2Transformer2DModel"
    vae_class = "AutoencoderKLFlux2"

    def load_text_encoders(self, allow_pickle: bool) -> tuple[list, list[nn.Module]]:
        from transformers import AutoTokenizer, Qwen3ForCausalLM

        tokenizer = from_pretrained(AutoTokenizer, self.spec, "tokenizer", True)
        return [tokenizer], [from_pretrained(Qwen3ForCausalLM, self.spec, "text_encoder", allow_pickle)]

    @property
    def prompt_tokens(self) -> int:
        return self.spec.text_tokens(PROMPT_TOKENS)

    def token_limits(self) -> list[tuple[object, int]]:
        """A prompt's own tokens: the positions read, less the chat template's around it."""
        (tokenizer,) = self.tokenizers
        return [(tokenizer, chat_template_limit(tokenizer, self.prompt_tokens, enable_thinking=False))]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        self.check_encoders()
        (tokenizer,), (encoder,) = self.tokenizers, self.text_encoders
        states = _pipeline()._get_qwen3_prompt_embeds(
            encoder, tokenizer, prompts, device=self.device, max_sequence_length=self.prompt_tokens
        )
        return {"encoder_hidden_states": self.as_read(states)}

    @torch.no_grad()
    def empty_cond(self) -> Cond:
        """The empty prompt encoded: Flux2KleinPipeline's negative prompt for CFG."""
        return self.encode_prompts([""])

    @staticmethod
    def conditioning_shapes(network_config: dict, spec: TeacherSpec) -> dict[str, tuple[int, ...]]:
        return {"encoder_hidden_states": (spec.text_tokens(PROMPT_TOKENS), network_config["joint_attention_dim"])}

    # -- the VAE's latents as the pipeline denoises them: 2×2 patches, batch-normalized ----------

    @staticmethod
    def vae_scale_factor(vae_config: dict) -> int:
        """The VAE's 8 (as the pipeline computes it) times its 2×2 patch."""
        patch = vae_config.get("patch_size", [2, 2])[0]
        return 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1) * patch

    def latent_normalization(self) -> tuple[Tensor, Tensor]:
        """Per patchified channel: latents = (z − mean) / std with the VAE's batch-norm running
        statistics (std = √(var + eps)), as the pipeline computes them (scale = 1 / std)."""
        bn, eps = self.vae.bn, self.vae.config.batch_norm_eps
        mean = bn.running_mean.view(1, -1, 1, 1).float().to(self.device)
        return mean, 1.0 / torch.sqrt(bn.running_var.view(1, -1, 1, 1).float() + eps).to(self.device)

    def vae_sample(self, images: Tensor, generator: torch.Generator) -> Tensor:
        return _pipeline()._patchify_latents(super().vae_sample(images, generator))

    def vae_decode(self, z: Tensor) -> Tensor:
        return super().vae_decode(_pipeline()._unpatchify_latents(z))


class Flux2DevTeacher(Flux2Teacher):
    """A Flux2Pipeline (FLUX.2 [dev]): prompts through the pipeline's own Mistral encoding (its
    system message and chat template, layers 10, 20, 30); latents as [klein]'s.

    The 24B encoder runs in bf16 in training too (96 GB in fp32; BFL's and diffusers' code run it
    in bf16), so its prompts are encoded as the pipeline samples them, not more exactly."""

    training_encoder_dtype = torch.bfloat16

    def load_text_encoders(self, allow_pickle: bool) -> tuple[list, list[nn.Module]]:
        from transformers import Mistral3ForConditionalGeneration, PixtralProcessor

        processor = from_pretrained(PixtralProcessor, self.spec, "tokenizer", True)  # the class model_index names
        # read in its own dtype straight onto the device, a shard at a time: not 48 GB of host memory (96 in fp32)
        placed = {"torch_dtype": self.encoder_dtype, "device_map": {"": self.device}}
        encoder = from_pretrained(Mistral3ForConditionalGeneration, self.spec, "text_encoder", allow_pickle, **placed)
        return [processor], [encoder]

    def token_limits(self) -> list[tuple[object, int]]:
        """A prompt's own tokens: the positions read, less those of the system message and template."""
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        (processor,) = self.tokenizers
        around = processor.apply_chat_template(format_input([""], SYSTEM_MESSAGE), tokenize=True, return_dict=True)
        limit = self.prompt_tokens - len(around["input_ids"][0]) + added_tokens(processor.tokenizer)
        return [(processor.tokenizer, limit)]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        from diffusers import Flux2Pipeline

        self.check_encoders()
        (processor,), (encoder,) = self.tokenizers, self.text_encoders
        # diffusers passes the processor its padding options as plain keyword arguments, which
        # transformers 5 still applies but warns about on every call: once per batch of prompts here
        processing = logging.getLogger("transformers.processing_utils")
        level = processing.level
        processing.setLevel(logging.ERROR)
        try:
            states = Flux2Pipeline._get_mistral_3_small_prompt_embeds(
                encoder, processor, prompts, device=self.device, max_sequence_length=self.prompt_tokens
            )
        finally:
            processing.setLevel(level)
        return {"encoder_hidden_states": self.as_read(states)}

    @torch.no_grad()
    def empty_cond(self) -> Cond:
        """The empty prompt encoded (CFG's negative prompt; DMD2 on FLUX.2 [dev] runs none)."""
        return self.encode_prompts([""])


def _positions(t: int, h: int, w: int, length: int, device: torch.device) -> Tensor:
    """The pipeline's 4-D position ids (T, H, W, L) of a grid, one row per token [t·h·w·length, 4]."""
    axes = (torch.arange(n, device=device) for n in (t, h, w, length))
    return torch.cartesian_prod(*axes)


class Flux2Denoiser(TransformerDenoiser):
    """A Flux2Transformer2DModel, as the FLUX.2 pipelines call it: one token per latent position
    (the latents are already 2×2 patches), 4-D position ids for the image grid and the text, the
    timestep σ (the model scales it by 1000 itself), and the guidance a guidance-distilled
    transformer ([dev]) is told, `embedded_guidance` (None: [klein], which has no such embedding).

    `cond` holds "encoder_hidden_states" [B, L, D] (the LLM's stacked states)."""

    patch = 1

    def __init__(
        self,
        transformer: nn.Module,
        schedule,
        gan_feature_block: int | None = None,
        embedded_guidance: float | None = None,
    ):
        super().__init__(transformer, schedule, gan_feature_block)
        self.embedded_guidance = embedded_guidance

    def draw_noise(self, like: Tensor, draw: Callable[[tuple[int, ...]], Tensor]) -> Tensor:
        """The pipeline's scheduler draws each step's noise as tokens [h·w, C]: drawn so, then put on the grid."""
        c, h, w = like.shape[1:]
        return draw((h * w, c)).transpose(1, 2).reshape(-1, c, h, w)

    def _call(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        dtype, (b, c, h, w) = self.transformer.dtype, x_t.shape
        text = cond["encoder_hidden_states"]
        out = self.transformer(
            hidden_states=x_t.flatten(2).transpose(1, 2).to(dtype),
            encoder_hidden_states=text.to(dtype),
            timestep=(self.schedule.network_timestep(t.to(x_t.device)) / 1000).to(dtype),
            img_ids=_positions(1, h, w, 1, x_t.device),
            txt_ids=_positions(1, 1, 1, text.shape[1], x_t.device),
            guidance=None if self.embedded_guidance is None else x_t.new_full((b,), self.embedded_guidance),
            return_dict=False,
        )[0]
        return out.transpose(1, 2).reshape(b, c, h, w)


def flux2_time_shift(image_seq_len: int) -> float:
    """μ of the teacher's schedule for `image_seq_len` tokens: the pipeline's at its default 50 steps."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    return compute_empirical_mu(image_seq_len, DEFAULT_STEPS)


def _recognises(pipeline: str) -> Callable[[dict[str, Any]], bool]:
    """Whether a model_index.json is a `pipeline` (the two FLUX.2 pipelines name the same components)."""

    def recognises(index: dict[str, Any]) -> bool:
        return index.get("_class_name") == pipeline and names_network(
            index, "transformer", "Flux2Transformer2DModel", ("vae", "scheduler", "text_encoder")
        )

    return recognises


def _unsupported_klein(
    index: dict[str, Any], transformer: dict[str, Any], vae: dict[str, Any], scheduler: dict[str, Any]
) -> str | None:
    if index.get("is_distilled"):
        return (
            "unsupported FLUX.2 [klein] step-distilled model: it already samples in a few steps without CFG; "
            "dmd distills the base models (FLUX.2-klein-base-4B / -9B)"
        )
    if transformer.get("guidance_embeds") or transformer.get("patch_size", 1) != 1:
        return "unsupported FLUX.2 [klein] transformer with a guidance embedding or patches: [klein] base has neither"
    return not_flow_matching(scheduler, "a FLUX.2 transformer")


def _unsupported_dev(
    index: dict[str, Any], transformer: dict[str, Any], vae: dict[str, Any], scheduler: dict[str, Any]
) -> str | None:
    if not transformer.get("guidance_embeds", True) or transformer.get("patch_size", 1) != 1:
        return (
            "unsupported Flux2Pipeline transformer without a guidance embedding or with patches: dmd distills "
            "guidance-distilled FLUX.2 [dev]"
        )
    return not_flow_matching(scheduler, "a FLUX.2 transformer")


def flux2_shape(config: dict[str, Any]) -> NetworkShape:
    """One token per position of the 128-channel patchified latents; the native size is the
    pipelines' default, 1024 pixels (64 positions of 16)."""
    return NetworkShape(native_latent_side=64, latent_channels=int(config.get("in_channels", 128)), downsample=1)


FLUX2 = register(
    Family(
        name="flux2",
        distills="FLUX.2 [klein] base (Flux2KleinPipeline)",
        layout="flux2",
        teacher=Flux2Teacher,
        denoiser=Flux2Denoiser,
        network_shape=flux2_shape,
        conditioning_timestep=999,  # σ = 1: the pure noise a 1-step student starts from
        network="transformer",
        lora_targets=FLUX2_LORA_TARGETS,
        denoiser_options=("gan_feature_block",),
        time_shift=flux2_time_shift,
        unsupported=_unsupported_klein,
        recognises=_recognises("Flux2KleinPipeline"),
        aliases={"flux2-klein-4b": KLEIN_4B, "flux2-klein-9b": KLEIN_9B},
        recipe=lambda steps, lora_rank: "flux2-klein",
        title="a FLUX.2 [klein] teacher",
    )
)

FLUX2_DEV_FAMILY = register(
    Family(
        name="flux2-dev",
        distills="FLUX.2 [dev] (Flux2Pipeline)",
        layout="flux2-dev",
        teacher=Flux2DevTeacher,
        denoiser=Flux2Denoiser,
        network_shape=flux2_shape,
        conditioning_timestep=999,
        network="transformer",
        lora_targets=FLUX2_LORA_TARGETS,
        denoiser_options=("embedded_guidance", "gan_feature_block"),
        classifier_free_guidance=False,
        time_shift=flux2_time_shift,
        unsupported=_unsupported_dev,
        recognises=_recognises("Flux2Pipeline"),
        aliases={"flux2-dev": FLUX2_DEV},
        recipe=lambda steps, lora_rank: "flux2-dev",
        title="a FLUX.2 [dev] teacher (guidance-distilled: no CFG)",
    )
)
