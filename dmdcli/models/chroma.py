"""The Chroma family: FLUX.1-schnell's transformer retrained undistilled (ChromaTransformer2DModel), read by T5.

Chroma1-HD (lodestones/Chroma1-HD, 8.9B, Apache 2.0) samples in ~40 steps with CFG (the model
card's scale 3 against its negative prompt). Its transformer is FLUX's without the guidance
embedding and CLIP's pooled vector (a small "approximator" network of the timestep modulates its
blocks), on FLUX.1's VAE, 2×2 packing, position ids and resolution-shifted sigmas.

Text: T5's last hidden state over 512 positions, the encoder run with its padding masked; the
transformer reads each prompt's tokens and the first padding token, every later position masked
out, as Chroma was trained. ChromaPipeline (diffusers 0.42) hands the transformer that mask as
floats 0/1, which attention adds to its logits instead of masking with them (diffusers #12116,
#13619), so there the padding is read. The adapter reads no padding (ChromaDenoiser); the exports'
snippets and `dmd sample` of the teacher pipeline hand the pipeline a mask of 1 where a token is
read and -200 elsewhere, which the transformer's outer product of the mask with itself turns into
a bias of -200 on every padding key for every read query: no weight left (e^-200), no fully masked
row (which some attention kernels answer with NaN), and 40,000 where a padding query meets a
padding key, which fits fp16 (-10⁴ would not: its square overflows, and every output is NaN).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from dmdcli.core.denoiser import MASK, Cond
from dmdcli.models.families import Family, NetworkShape, register
from dmdcli.models.flux import T5_TOKENS
from dmdcli.models.pipeline import PipelineTeacher, from_pretrained
from dmdcli.models.transformer import (
    TRANSFORMER_LORA_TARGETS,
    PackedDenoiser,
    flux_image_ids,
    not_flow_matching,
    pack_latents,
    unpack_latents,
)

if TYPE_CHECKING:
    from dmdcli.models.teacher import TeacherSpec

CHROMA = "lodestones/Chroma1-HD"
# The model card's negative prompt, the real score's unconditional side
NEGATIVE_PROMPT = (
    "low quality, ugly, unfinished, out of focus, deformed, disfigure, blurry, smudged, restricted palette, flat colors"
)
TEXT = "encoder_hidden_states"


class ChromaTeacher(PipelineTeacher):
    """A ChromaPipeline's frozen parts: T5's states and mask from the pipeline's own encoding, on a
    pipeline holding only the tokenizer and the text encoder."""

    network_class = "ChromaTransformer2DModel"

    def load_text_encoders(self, allow_pickle: bool) -> tuple[list, list[nn.Module]]:
        from transformers import AutoTokenizer, T5EncoderModel

        tokenizer = from_pretrained(AutoTokenizer, self.spec, "tokenizer", True)
        return [tokenizer], [from_pretrained(T5EncoderModel, self.spec, "text_encoder", allow_pickle)]

    @property
    def prompt_tokens(self) -> int:
        return self.spec.text_tokens(T5_TOKENS)

    def token_limits(self) -> list[tuple[object, int]]:
        return [(self.tokenizers[0], self.prompt_tokens)]

    def _encoder_pipeline(self):
        """Made per call, not kept: a kept one would hold the text encoder after it is released."""
        from diffusers import ChromaPipeline

        (tokenizer,), (encoder,) = self.tokenizers, self.text_encoders
        return ChromaPipeline(scheduler=None, vae=None, text_encoder=encoder, tokenizer=tokenizer, transformer=None)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """T5's states [B, 512, D] and the mask of the positions the transformer reads (each prompt's
        tokens and the first padding), as ChromaPipeline encodes them."""
        self.check_encoders()
        states, mask = self._encoder_pipeline()._get_t5_prompt_embeds(
            prompts, max_sequence_length=self.prompt_tokens, device=self.device
        )
        return {TEXT: self.as_read(states), TEXT + MASK: mask.float()}

    @torch.no_grad()
    def empty_cond(self) -> Cond:
        """The model card's negative prompt encoded: the real score's CFG is against it."""
        return self.encode_prompts([NEGATIVE_PROMPT])

    @staticmethod
    def conditioning_shapes(network_config: dict, spec: TeacherSpec) -> dict[str, tuple[int, ...]]:
        tokens = spec.text_tokens(T5_TOKENS)
        return {TEXT: (tokens, network_config["joint_attention_dim"]), TEXT + MASK: (tokens,)}


class ChromaDenoiser(PackedDenoiser):
    """A ChromaTransformer2DModel, as ChromaPipeline calls it (FLUX's packing and ids, the timestep
    σ), reading each prompt's tokens and its first padding token and no other position.

    That is done without a mask: the prompts of a batch are run in groups of one length, each cut
    to it. A mask would need two workarounds of diffusers (0.42): ChromaPipeline's float mask is
    added to the logits (see the module's docstring), and under gradient checkpointing its
    transformer hands its single-stream blocks no mask at all.

    `cond` holds "encoder_hidden_states" [B, L, D] (T5) and "encoder_hidden_states_mask" [B, L]."""

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return by_prompt_length(super().forward, x_t, t, cond)

    def bottleneck(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return by_prompt_length(super().bottleneck, x_t, t, cond)

    def _call(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        dtype, (h, w) = self.transformer.dtype, x_t.shape[-2:]
        text = cond[TEXT]  # every position read (by_prompt_length cut it)
        out = self.transformer(
            hidden_states=pack_latents(x_t).to(dtype),
            encoder_hidden_states=text.to(dtype),
            timestep=(self.schedule.network_timestep(t.to(x_t.device)) / 1000).to(dtype),
            img_ids=flux_image_ids(h, w, x_t.device, dtype),
            txt_ids=torch.zeros(text.shape[1], 3, device=x_t.device, dtype=dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)


def by_prompt_length(run, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
    """`run(x_t, t, cond)` on each group of a batch's prompts that read one number of positions,
    their text cut to it, the results put back in the batch's order. On the meta device (the
    memory estimate), which has no values: one group of every position."""
    text, mask = cond[TEXT], cond[TEXT + MASK]
    if text.device.type == "meta":
        return run(x_t, t, {TEXT: text})
    lengths = mask.sum(dim=1).long().tolist()  # one host sync; each prompt's mask is a prefix of ones
    groups: dict[int, list[int]] = {}
    for row, n in enumerate(lengths):
        groups.setdefault(n, []).append(row)
    if len(groups) == 1:
        return run(x_t, t, {TEXT: text[:, : lengths[0]]})
    parts, order = [], []
    for n, rows in groups.items():
        index = torch.tensor(rows, device=x_t.device)
        parts.append(run(x_t[index], t[index] if t.dim() else t, {TEXT: text[index, :n]}))
        order += rows
    return torch.cat(parts)[torch.argsort(torch.tensor(order, device=x_t.device))]


def chroma_guidance(scale: float | None) -> dict[str, Any]:
    """ChromaPipeline's CFG (scale > 1) with the model card's negative prompt; None: its scale 3."""
    scale = 3.0 if scale is None else scale
    return {"guidance_scale": scale, "negative_prompt": NEGATIVE_PROMPT} if scale > 1 else {"guidance_scale": scale}


def pipeline_prompts(pipe, prompts: list[str], guidance: dict[str, Any], call: dict[str, Any]) -> dict[str, Any]:
    """ChromaPipeline's prompt arguments for `prompts`, encoded by the pipeline with the masks made
    right (`reading_mask`) and as many positions as the teacher reads (`call`: a recorded
    max_sequence_length); with CFG, the negative prompt's too (taken out of `guidance`, which the
    call gets as well)."""
    negative = guidance.pop("negative_prompt", None)
    cfg = guidance.get("guidance_scale", 0) > 1
    negatives = None if negative is None else [negative] * len(prompts)
    embeds, _, mask, negative_embeds, _, negative_mask = pipe.encode_prompt(
        prompts, negatives, do_classifier_free_guidance=cfg, **_positions(call)
    )
    text = {"prompt_embeds": embeds, "prompt_attention_mask": reading_mask(mask)}
    if cfg:
        text.update(negative_prompt_embeds=negative_embeds, negative_prompt_attention_mask=reading_mask(negative_mask))
    return text


def reading_mask(mask: Tensor) -> Tensor:
    """ChromaPipeline's 0/1 prompt mask as its transformer must be handed it, in its dtype: 1 where a
    token is read, -200 where not (see the module's docstring; the snippets print the same expression)."""
    return mask * 201 - 200


def snippet_prompt(prompt: str, call: dict[str, Any]) -> tuple[list[str], str]:
    """The lines that encode `prompt` (a Python literal) for a ChromaPipeline with the mask the
    student was trained with (and its positions: `call`), and the call's arguments that pass it."""
    positions = "".join(f", {k}={v!r}" for k, v in _positions(call).items())
    return (
        [
            "# ChromaPipeline adds its float 0/1 prompt mask to the attention logits (diffusers #12116):",
            "# hand it the mask the student reads with: 1 where a token is read, -200 where not",
            f"embeds, _, mask, *_ = pipe.encode_prompt({prompt}, do_classifier_free_guidance=False{positions})",
        ],
        "prompt_embeds=embeds, prompt_attention_mask=mask * 201 - 200",
    )


def _positions(call: dict[str, Any]) -> dict[str, Any]:
    """The encoding's part of a pipeline call's recorded arguments (its max_sequence_length)."""
    return {k: v for k, v in call.items() if k == "max_sequence_length"}


def _chroma_pipeline(index: dict[str, Any]) -> bool:
    """ChromaPipeline itself: its img2img and inpainting pipelines share the transformer class."""
    transformer = index.get("transformer") or [None, None]
    return index.get("_class_name") == "ChromaPipeline" and transformer[1] == "ChromaTransformer2DModel"


def _unsupported(
    index: dict[str, Any], transformer: dict[str, Any], vae: dict[str, Any], scheduler: dict[str, Any]
) -> str | None:
    return not_flow_matching(scheduler, "a Chroma transformer")


def chroma_shape(config: dict[str, Any]) -> NetworkShape:
    """FLUX's: 2×2 latent patches in a token (in_channels = 4 × the latent channels), the VAE's size."""
    return NetworkShape(native_latent_side=None, latent_channels=int(config.get("in_channels", 64)) // 4, downsample=2)


CHROMA_FAMILY = register(
    Family(
        name="chroma",
        distills="Chroma (ChromaPipeline)",
        layout="chroma",
        teacher=ChromaTeacher,
        denoiser=ChromaDenoiser,
        network_shape=chroma_shape,
        conditioning_timestep=999,  # σ = 1: the pure noise a 1-step student starts from
        network="transformer",
        lora_targets=TRANSFORMER_LORA_TARGETS,
        denoiser_options=("gan_feature_block",),
        shardable=False,  # by_prompt_length: as many forwards as a batch has prompt lengths
        pipeline_guidance=chroma_guidance,
        pipeline_prompts=pipeline_prompts,
        snippet_prompt=snippet_prompt,
        tiny_autoencoder="madebyollin/taef1",  # FLUX.1's VAE
        unsupported=_unsupported,
        recognises=_chroma_pipeline,
        aliases={"chroma": CHROMA},
        recipe=lambda steps, lora_rank: "chroma",
        title="a Chroma teacher",
    )
)
