"""The frozen parts of a teacher pipeline on one device: what every family's teacher shares.

A family's teacher (models/sd.py: SD and SDXL) subclasses `PipelineTeacher` and adds how its
text encoders are loaded and how prompts become its network's conditioning. Everything else a
run needs from the pipeline (the denoising network, VAE encode/decode, the latent cache's key,
the truncation note, releasing the text encoders once the prompts are cached) is here, so the
engine only ever sees tensors.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from dmdcli.core.denoiser import Cond
from dmdcli.errors import DmdError, first_line

if TYPE_CHECKING:
    from dmdcli.models.teacher import TeacherSpec


def from_pretrained(cls, spec: TeacherSpec, subfolder: str, allow_pickle: bool, **kwargs):
    """`cls.from_pretrained` of one component of the teacher, safetensors only unless allowed; a
    failure is one line naming the component."""
    try:
        return cls.from_pretrained(
            spec.source, subfolder=subfolder, use_safetensors=None if allow_pickle else True, **kwargs
        )
    except (OSError, ValueError, EnvironmentError) as e:
        hint = (
            " (weights only as pickle files? pass --allow-pickle to load them)"
            if "safetensors" in str(e).lower()
            else ""
        )
        raise DmdError(f"could not load {subfolder} of teacher {spec.source}: {first_line(e)}{hint}") from e


def has_component(index: dict, key: str) -> bool:
    """Whether a model_index.json names component `key` (["library", "Class"], not [null, null])."""
    return isinstance(index.get(key), list) and index[key][0] is not None


def names_network(index: dict, network: str, network_class: str, components: tuple[str, ...]) -> bool:
    """Whether a model_index.json's `network` component is a `network_class` and it names every one of `components`."""
    return (
        has_component(index, network)
        and index[network][1] == network_class
        and all(has_component(index, k) for k in components)
    )


def chat_template_limit(tokenizer, positions: int, **template_options) -> int:
    """How many of a prompt's tokens, as the tokenizer counts them alone, fit in `positions` once the
    tokenizer's chat template wraps it as one user turn (FLUX.2 [klein]'s and Z-Image's Qwen3
    template; `template_options` as their pipelines pass them)."""
    turn = [{"role": "user", "content": ""}]
    text = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True, **template_options)
    return positions - len(tokenizer(text).input_ids) + added_tokens(tokenizer)


def added_tokens(tokenizer) -> int:
    """The special tokens a tokenizer adds around any text (a BOS), which a prompt counted alone
    includes but a chat template already holds once."""
    return len(tokenizer("").input_ids)


def load_teacher(
    spec: TeacherSpec,
    device: torch.device,
    dtype: torch.dtype,
    resolution: int,
    allow_pickle: bool = False,
    encoder_dtype: torch.dtype | None = None,
    frozen_network: bool = False,
) -> PipelineTeacher:
    """The teacher of `spec`'s family (PipelineTeacher's arguments)."""
    from dmdcli.models.families import get_family

    family = get_family(spec.family)
    return family.teacher(spec, device, dtype, resolution, allow_pickle, encoder_dtype, frozen_network)


class PipelineTeacher(ABC):
    """The frozen parts of a teacher pipeline on one device.

    Args:
        spec: from `inspect_teacher`.
        device: where the text encoders and the VAE live (the denoising network is loaded on the
            CPU in fp32: the caller places it, as the frozen real score or as a shared LoRA base).
        dtype: the frozen dtype (bf16 on CUDA): the prompt conditioning is rounded to it once, as
            the networks read it under autocast; the VAE stays fp32 because SDXL's VAE breaks in
            half precision.
        resolution: training resolution in pixels.
        encoder_dtype: the text encoders' dtype (default `dtype`, as a pipeline samples); training
            runs them in `training_encoder_dtype`: fp32, as the DMD2 reference does (a bf16 CLIP is
            ~6× less exact than one rounding of an fp32 CLIP's output), once per prompt when
            prompts are cached.
        frozen_network: the network is only ever used frozen (no fp32 copy is trained from it, as
            with a shared LoRA base): it is read in `dtype` straight onto `device`, one tensor at a
            time (on first use: `network`). Read in fp32 on the CPU first, FLUX.1-dev's transformer
            alone held 48 GB of host memory and Qwen-Image's 82 GB; the weights are the same bits
            either way (diffusers rounds each tensor as `.to(dtype)` does).

    A subclass sets `network_class` (the diffusers class of the pipeline's `spec.network`
    component) and implements `load_text_encoders`, `encode_prompts` and `empty_cond`. A family
    whose VAE is not an AutoencoderKL sets `vae_class` and overrides the VAE methods below
    (`vae_scale_factor`, `latent_normalization`, `vae_sample`, `vae_decode`).
    """

    network_class: str = "UNet2DConditionModel"
    vae_class: str = "AutoencoderKL"
    # What a training run encodes its prompts in: fp32, as the DMD2 reference does, unless the
    # family's encoder is too large for it (FLUX.2 [dev]'s 24B Mistral: 96 GB in fp32)
    training_encoder_dtype: torch.dtype = torch.float32

    def __init__(
        self,
        spec: TeacherSpec,
        device: torch.device,
        dtype: torch.dtype,
        resolution: int,
        allow_pickle: bool = False,
        encoder_dtype: torch.dtype | None = None,
        frozen_network: bool = False,
    ):
        import diffusers

        self.spec, self.device, self.dtype, self.resolution = spec, device, dtype, resolution
        self.allow_pickle, self.frozen_network, self._network = allow_pickle, frozen_network, None
        self.check_network_files()
        vae_class = getattr(diffusers, self.vae_class)
        self.vae = from_pretrained(vae_class, spec, "vae", allow_pickle, torch_dtype=torch.float32).to(device)
        self.encoder_dtype = encoder_dtype or dtype
        self.tokenizers, self.text_encoders = self.load_text_encoders(allow_pickle)
        for module in [self.vae, *self.text_encoders]:
            module.requires_grad_(False).eval()
        self.text_encoders = [te.to(device, self.encoder_dtype) for te in self.text_encoders]
        self.shift_factor, self.scaling_factor = self.latent_normalization()
        # The posterior samples of real images come from their own generator, not the global RNG:
        # the latent cache is then the same wherever and whenever it is built, and building it
        # does not shift the random stream of the run that builds it.
        self.latent_generator = torch.Generator().manual_seed(0)

    @property
    def network(self) -> nn.Module:
        """The denoising network, read on first use: a run caches its prompts first, so its text
        encoders (fp32) and a network read onto the device are never there together (FLUX.2 [klein]
        9B: 30.5 GiB of Qwen3-8B and 16.9 of transformer)."""
        if self._network is None:
            import diffusers

            placed = {"torch_dtype": self.dtype, "device_map": {"": self.device}} if self.frozen_network else {}
            network_class = getattr(diffusers, self.network_class)
            network = from_pretrained(network_class, self.spec, self.spec.network, self.allow_pickle, **placed)
            self._network = network.requires_grad_(False).eval()
        return self._network

    def check_network_files(self) -> None:
        """Each safetensors file of a local teacher's network opened as far as its header, which
        must cover the file, and every shard its index names there: a truncated, broken or missing
        file is then one line now, not after the prompts are encoded (minutes, for a large
        encoder), when the network is read on first use."""
        from safetensors import safe_open

        folder = Path(self.spec.source).expanduser() / self.spec.network
        if not folder.is_dir():  # a hub id: its files come with the network, on first use
            return
        unloadable = f"could not load {self.spec.network} of teacher {self.spec.source}"
        files = sorted(folder.glob("*.safetensors"))
        if not files and not self.allow_pickle and any(folder.glob("*.bin")):
            raise DmdError(f"{unloadable}: its weights are pickle files only (pass --allow-pickle to load them)")
        for index in folder.glob("*.safetensors.index.json"):  # a sharded network: every shard there
            named = set(json.loads(index.read_text()).get("weight_map", {}).values())
            if missing := sorted(named - {f.name for f in files}):
                shards = f"{len(missing)} of the shards {index.name} names"
                raise DmdError(f"{unloadable}: {missing[0]} is missing ({shards})")
        for file in files:
            try:
                with safe_open(file, framework="pt"):
                    pass
            except Exception as e:  # safetensors' own error type, or an OSError
                raise DmdError(f"{unloadable}: {file.name}: {first_line(e)}") from e

    @property
    def network_config(self) -> dict:
        """The network's config.json, without reading its weights."""
        from dmdcli.models.teacher import _load_json_config

        return _load_json_config(self.spec.source, self.spec.network, "config.json")

    # -- what a family implements ----------------------------------------------------------------

    @abstractmethod
    def load_text_encoders(self, allow_pickle: bool) -> tuple[list, list[nn.Module]]:
        """The tokenizers and text encoders, in the order `encode_prompts` reads them."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Prompt conditioning, as the family's diffusers pipeline computes it."""

    @abstractmethod
    def empty_cond(self) -> Cond:
        """The unconditional conditioning for CFG, batch 1."""

    # -- the VAE: an AutoencoderKL unless the family says otherwise -------------------------------

    @staticmethod
    def vae_scale_factor(vae_config: dict) -> int:
        """How many times the VAE divides an image's side, from its config.json (AutoencoderKL: 2 per
        level after the first, as diffusers' pipelines compute it)."""
        return 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)

    def latent_normalization(self) -> tuple[float | Tensor, float | Tensor]:
        """(shift, scale) of the pipeline's latents, from the VAE (`self.vae`, on the device): latents
        = (z − shift)·scale for a VAE sample z. SD and SDXL scale them, SD3 and FLUX shift and scale
        (their config's factors); a tensor broadcasts per channel."""
        config = self.vae.config
        return float(config.get("shift_factor") or 0.0), float(config["scaling_factor"])

    def vae_sample(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Images [B, 3, R, R] → one sample z [B, C, R/f, R/f] of the VAE's posterior, drawn from `generator`."""
        return self.vae.encode(images).latent_dist.sample(generator=generator)

    def vae_decode(self, z: Tensor) -> Tensor:
        """z [B, C, h, w] (unnormalized) → images [B, 3, H, W]."""
        return self.vae.decode(z).sample

    @staticmethod
    @abstractmethod
    def conditioning_shapes(network_config: dict, spec: TeacherSpec) -> dict[str, tuple[int, ...]]:
        """The shape of each tensor `encode_prompts` returns for one prompt, batch dimension left
        out, from the network's config and the teacher's spec alone (the memory estimate's inputs)."""

    def _token_ids(self, tokenizer, prompts: list[str], length: int | None = None) -> Tensor:
        """Token ids [B, length] on the device, padded and cut as the pipelines do (length: the
        tokenizer's model_max_length unless given, e.g. a pipeline's T5 max_sequence_length)."""
        return tokenizer(
            prompts,
            padding="max_length",
            max_length=length or tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def token_limits(self) -> list[tuple[object, int]]:
        """(tokenizer, tokens it reads) for each distinct limit (CLIP: 77; T5: the pipeline's)."""
        tokenizer = self.tokenizers[0]
        return [(tokenizer, tokenizer.model_max_length)]

    # -- shared ------------------------------------------------------------------------------

    def check_encoders(self) -> None:
        if self.text_encoders is None:
            # A bug, not a user's mistake: every caller after release must go through the cache.
            raise RuntimeError(
                "the text encoders were released after caching the run's prompts; "
                "encode through the prompt cache (dmdcli.data.prompt_cache)"
            )

    def as_read(self, x: Tensor) -> Tensor:
        """A conditioning tensor rounded to the frozen dtype once, as the networks' linear layers read it."""
        return x.to(self.dtype).float()

    def truncation_note(self, prompts: list[str]) -> str | None:
        """A note naming how many distinct `prompts` are over a tokenizer's limit (start and end
        tokens included), or None. The encoders read the first tokens of such a prompt, as
        diffusers' pipelines and the DMD2 reference do; only the pipelines say so."""
        distinct = list(dict.fromkeys(prompts))
        for tokenizer, limit in sorted(self.token_limits(), key=lambda pair: pair[1]):
            lengths = (len(ids) for ids in tokenizer(distinct, truncation=False, verbose=False).input_ids)
            cut = [p for p, n in zip(distinct, lengths) if n > limit]
            if cut:
                example = cut[0] if len(cut[0]) <= 60 else cut[0][:57] + "..."
                return (
                    f"note: {len(cut)} of {len(distinct)} prompts are longer than the text encoder's "
                    f"{limit} tokens; it reads only their start (e.g. {example!r})"
                )
        return None

    def release_text_encoders(self) -> None:
        """Drop the text encoders once every prompt of the run is cached, freeing their memory.

        Dropped rather than moved to the CPU: a CPU fallback would run them slowly and silently,
        with numbers that differ from the accelerator's ones in the cache, and keep ~3 GB (SDXL,
        fp32) of host memory; after release `encode_prompts` raises, so a missed caller shows at once.
        """
        self.text_encoders = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def text_encoders_released(self) -> bool:
        return self.text_encoders is None

    @property
    def latent_size(self) -> tuple[int, int]:
        side = self.resolution // self.spec.vae_scale_factor
        return side, side

    @property
    def latent_cache_id(self) -> str:
        """Names what encode_images computes, for the latent cache's key ("seed0": the seeded
        posterior samples; caches built before them from the global RNG are not reused). A local
        teacher's VAE files are in it, so a replaced VAE is not served its predecessor's latents."""
        from dmdcli.models.teacher import component_files

        vae = component_files(self.spec.source, ("vae",))
        digest = f":{hashlib.sha256(json.dumps(vae).encode()).hexdigest()[:16]}" if vae else ""
        return f"{self.spec.source}:vae:seed0{digest}"

    @property
    def prompt_cache_id(self) -> dict:
        """What `encode_prompts` depends on besides the prompts, for the disk prompt cache's key: the
        teacher, its family and text positions, the encoders' dtype and device type (kernels differ),
        and a local teacher's text encoder and tokenizer files."""
        from pathlib import Path

        from dmdcli.models.teacher import component_files

        local = Path(self.spec.source).expanduser()
        folders = sorted(p.name for p in local.iterdir()) if local.is_dir() else []
        text = tuple(name for name in folders if name.startswith(("text_encoder", "tokenizer")))
        return {
            "teacher": self.spec.source,
            "family": self.spec.family,
            "max_sequence_length": self.spec.max_sequence_length,
            "zeros_for_empty_prompt": self.spec.force_zeros_for_empty_prompt,
            "encoders": f"{self.encoder_dtype} on {self.device.type}",
            "frozen_dtype": str(self.dtype),
            **component_files(self.spec.source, text),
        }

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images [B, 3, R, R] in [-1, 1] → latents [B, C, R/f, R/f]: one posterior sample, shifted
        and scaled as the pipeline's latents are ((z − shift)·scale).

        Successive calls continue one seeded stream (`latent_generator`), so a folder encoded in the
        same order and batches gives the same latents."""
        z = self.vae_sample(images.to(self.device, torch.float32), self.latent_generator)
        return ((z - self.shift_factor) * self.scaling_factor).float()  # z − 0.0 is z exactly: SD's latents as before

    def decode_with_grad(self, latents: Tensor) -> Tensor:
        """Latents [B, C, h, w] → images [B, 3, H, W] in [-1, 1], differentiable (DMD's LPIPS regression)."""
        z = latents.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
        return self.vae_decode(z).float().clamp(-1, 1)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents [B, C, h, w] → images [B, 3, H, W] in [-1, 1]."""
        return self.decode_with_grad(latents)
