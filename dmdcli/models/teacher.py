"""Load a diffusers text-to-image teacher (SD or SDXL layout) and wrap its text and image codecs.

The teacher's UNet becomes the real score; copies of it become the fake score and the
generator. Everything else a run needs from the pipeline — prompt conditioning, the empty-prompt
conditioning for CFG, VAE encode/decode, the noise schedule — is exposed here, so the engine
only ever sees tensors.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dmdcli.core.denoiser import Cond
from dmdcli.core.schedule import NoiseSchedule
from dmdcli.errors import DmdError, UsageError, first_line
from dmdcli.files import read_json
from dmdcli.models.families import Family, get_family, named_family, recognise, resolve_alias


def resolve_teacher(name: str) -> str:
    """An alias → its hub id (a built-in teacher's name: its folder); a local folder → its
    absolute path (students record it, and are used from other working directories); any
    other hub id unchanged."""
    return resolve_alias(name) or local_teacher_folder(name) or name


def local_teacher_folder(name: str) -> str | None:
    """The absolute path of `name` when it names an existing local folder rather than an alias."""
    if resolve_alias(name) is not None:
        return None
    local = Path(name).expanduser()
    return str(local.resolve()) if local.is_dir() else None


def teacher_family(name: str) -> Family:
    """The family `--teacher name` is of: known for an alias or a built-in teacher's name, else
    read from the teacher's config files."""
    return named_family(name) or get_family(inspect_teacher(name).family)


def component_files(source: str, components: tuple[str, ...]) -> dict[str, list]:
    """What identifies the weights of a local pipeline folder's components without reading them:
    each component's file names, sizes and mtimes ({} for a hub id, which stands for its files
    as downloaded). Keys the caches made from a teacher (real-image latents, regression pairs)."""
    files = {}
    for component in components:
        folder = Path(source).expanduser() / component
        if folder.is_dir():
            files[f"{component}_files"] = sorted(
                [p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in folder.iterdir() if p.is_file()
            )
    return files


def looks_like_path(name: str) -> bool:
    """Whether `name` means a local path, not a hub id ("org/model"): ./x, /x, ~/x, a/b/c, an
    existing path, or dir/x where dir/ is a folder here (runs/typo, when runs/ exists)."""
    parts = Path(name).parts
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or Path(name).exists()
        or (len(parts) > 1 and Path(parts[0]).is_dir())
    )


def _load_json_config(source: str, subfolder: str | None, filename: str) -> dict[str, Any]:
    """A component's config from a local folder or the hub (config files only, no weights)."""
    local = Path(source).expanduser()
    if local.is_dir():
        path = local / subfolder / filename if subfolder else local / filename
        if not path.is_file():
            raise DmdError(f"{source} is not a complete diffusers pipeline: {path.relative_to(local)} is missing")
        return read_json(path)
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(source, filename, subfolder=subfolder)).read_text())
    except Exception as e:  # offline, unknown repo, gated model...
        raise DmdError(f"could not read {filename} of teacher {source!r}: {type(e).__name__}: {first_line(e)}") from e


def schedule_from_config(config: dict[str, Any]) -> NoiseSchedule:
    """The schedule of a diffusers scheduler config (any scheduler of the DDPM family).

    diffusers' DDPMScheduler already computes ᾱ_t for every beta schedule and option
    (scaled_linear, squaredcos_cap_v2, rescale_betas_zero_snr, ...), so we take its numbers
    instead of re-deriving them (here, not in core/, which imports only torch).
    """
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(dict(config))
    return NoiseSchedule(scheduler.alphas_cumprod, scheduler.config.prediction_type)


@dataclass
class TeacherSpec:
    """What a teacher is, read from its config files only (nothing heavy loaded)."""

    source: str
    layout: str  # "sd" (one CLIP text encoder) or "sdxl" (two encoders, pooled embeds, time ids)
    family: str  # the registered family its config files are of (dmdcli.models.families)
    pipeline_class: str
    scheduler_config: dict[str, Any]
    native_resolution: int
    latent_channels: int
    vae_scale_factor: int
    unet_downsample: int  # the UNet halves the latent this many times overall
    # SDXL's unconditional input is zeros unless its pipeline says otherwise (model_index.json)
    force_zeros_for_empty_prompt: bool = True

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    def schedule(self) -> NoiseSchedule:
        return schedule_from_config(self.scheduler_config)

    def training_resolution(self, requested: int | None) -> int:
        """--resolution, or the teacher's native side; checked."""
        resolution = requested or self.native_resolution
        self.check_resolution(resolution)
        return resolution

    def check_resolution(self, resolution: int, what: str = "--resolution") -> None:
        """A side must be a multiple of what the VAE and the UNet divide it by, and at least twice
        that: below a 2×2 latent at the UNet's bottom its group norms see a single value (a tiny
        UNet fails outright)."""
        multiple = self.vae_scale_factor * self.unet_downsample
        if resolution < 2 * multiple or resolution % multiple:
            raise UsageError(
                f"{what} {resolution} must be a multiple of {multiple} and at least {2 * multiple} for this model"
            )


def inspect_teacher(name: str) -> TeacherSpec:
    """Read the teacher's layout, prediction type and schedule from its config files."""
    source = resolve_teacher(name)
    local = Path(source).expanduser()
    if looks_like_path(source) and not local.exists():
        raise UsageError(f"teacher not found: {source}")
    if local.exists() and not (local / "model_index.json").is_file():
        raise UsageError(f"{source} is not a diffusers pipeline folder (no model_index.json)")
    index = _load_json_config(source, None, "model_index.json")
    pipeline_class = index.get("_class_name", "?")
    family = recognise(index)
    if family is None:
        raise DmdError(
            f"unsupported pipeline {pipeline_class} in {source}: dmd distills Stable Diffusion and SDXL "
            "layouts (UNet2DConditionModel, AutoencoderKL, CLIP text encoders)"
        )
    layout = family.layout
    unet_cfg = _load_json_config(source, "unet", "config.json")
    vae_cfg = _load_json_config(source, "vae", "config.json")
    scheduler_cfg = _load_json_config(source, "scheduler", "scheduler_config.json")
    if layout == "sdxl" and unet_cfg.get("addition_embed_type") != "text_time":
        raise DmdError(f"unsupported SDXL-like pipeline in {source}: its UNet takes no text_time conditioning")
    _check_schedule_and_latents(source, scheduler_cfg, vae_cfg)
    vae_scale = 2 ** (len(vae_cfg.get("block_out_channels", [0] * 4)) - 1)
    return TeacherSpec(
        source=source,
        layout=layout,
        family=family.name,
        pipeline_class=pipeline_class,
        scheduler_config=scheduler_cfg,
        native_resolution=int(unet_cfg.get("sample_size", 64)) * vae_scale,
        latent_channels=int(unet_cfg.get("in_channels", 4)),
        vae_scale_factor=vae_scale,
        unet_downsample=2 ** (len(unet_cfg.get("down_block_types", [0] * 4)) - 1),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
    )


def _check_schedule_and_latents(source: str, scheduler_cfg: dict[str, Any], vae_cfg: dict[str, Any]) -> None:
    """Refuse what the schedule math and the VAE code here would get silently wrong: a teacher
    trained on an EDM or flow-matching schedule (DDPMScheduler.from_config would fill in its default
    linear betas), and a VAE whose latents are normalized by a mean/std or shift (Playground v2.5)."""
    scheduler = scheduler_cfg.get("_class_name", "?")
    discrete = "beta_schedule" in scheduler_cfg or scheduler_cfg.get("trained_betas") is not None
    if not discrete or "EDM" in scheduler or "FlowMatch" in scheduler:
        raise DmdError(
            f"unsupported scheduler {scheduler} in {source}: dmd distills teachers trained on a discrete "
            "DDPM schedule (betas); EDM and flow-matching teachers are not supported"
        )
    normalized = [k for k in ("latents_mean", "latents_std", "shift_factor") if vae_cfg.get(k) is not None]
    if normalized:
        raise DmdError(
            f"unsupported VAE in {source}: its latents are normalized ({', '.join(normalized)}), which dmd does not "
            "apply"
        )


def _from_pretrained(cls, spec: TeacherSpec, subfolder: str, allow_pickle: bool, **kwargs):
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


class Teacher:
    """The frozen parts of a teacher pipeline on one device.

    Args:
        spec: from `inspect_teacher`.
        device: where the text encoders and the VAE live (the UNet is loaded on the CPU in fp32:
            the caller places it, as the frozen real score or as a shared LoRA base).
        dtype: the frozen dtype (bf16 on CUDA): the prompt conditioning is rounded to it once, as
            the UNets read it under autocast; the VAE stays fp32 because SDXL's VAE breaks in half
            precision.
        resolution: training resolution; SDXL's time ids are (R, R, 0, 0, R, R).
        encoder_dtype: the text encoders' dtype (default `dtype`, as a pipeline samples); training
            runs them in fp32, as the DMD2 reference does (a bf16 CLIP is ~6× less exact than one
            rounding of an fp32 CLIP's output), once per prompt when prompts are cached.
    """

    def __init__(
        self,
        spec: TeacherSpec,
        device: torch.device,
        dtype: torch.dtype,
        resolution: int,
        allow_pickle: bool = False,
        encoder_dtype: torch.dtype | None = None,
    ):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        self.spec, self.device, self.dtype, self.resolution = spec, device, dtype, resolution
        self.unet = _from_pretrained(UNet2DConditionModel, spec, "unet", allow_pickle)
        self.vae = _from_pretrained(AutoencoderKL, spec, "vae", allow_pickle).to(device, torch.float32)
        self.tokenizers = [_from_pretrained(CLIPTokenizer, spec, "tokenizer", True)]
        self.text_encoders = [_from_pretrained(CLIPTextModel, spec, "text_encoder", allow_pickle)]
        if spec.layout == "sdxl":
            self.tokenizers.append(_from_pretrained(CLIPTokenizer, spec, "tokenizer_2", True))
            self.text_encoders.append(
                _from_pretrained(CLIPTextModelWithProjection, spec, "text_encoder_2", allow_pickle)
            )
        for module in [self.unet, self.vae, *self.text_encoders]:
            module.requires_grad_(False).eval()
        self.text_encoders = [te.to(device, encoder_dtype or dtype) for te in self.text_encoders]
        self.scaling_factor = float(self.vae.config.scaling_factor)
        # The posterior samples of real images come from their own generator, not the global RNG:
        # the latent cache is then the same wherever and whenever it is built, and building it
        # does not shift the random stream of the run that builds it.
        self.latent_generator = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Prompt conditioning, as the diffusers pipelines compute it.

        SD: the last hidden state of the CLIP encoder. SDXL: the penultimate hidden states of
        both encoders concatenated, the second encoder's pooled projection, and the time ids.
        """
        if self.text_encoders is None:
            # A bug, not a user's mistake: every caller after release must go through the cache.
            raise RuntimeError(
                "the text encoders were released after caching the run's prompts; "
                "encode through the prompt cache (dmdcli.data.prompt_cache)"
            )
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            if self.spec.layout == "sd":
                hidden.append(encoder(ids)[0])
            else:
                out = encoder(ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                pooled = out[0]
        as_read = lambda x: x.to(self.dtype).float()  # noqa: E731 - the UNets' linear layers read the frozen dtype
        cond = {"encoder_hidden_states": as_read(torch.cat(hidden, dim=-1))}
        if self.spec.layout == "sdxl":
            cond["text_embeds"] = as_read(pooled)
            cond["time_ids"] = self.time_ids(len(prompts))
        return cond

    def truncation_note(self, prompts: list[str]) -> str | None:
        """A note naming how many distinct `prompts` are over the tokenizer's limit (CLIP: 77 tokens,
        start and end included), or None. The encoders read the first tokens of such a prompt, as
        diffusers' pipelines and the DMD2 reference do; only the pipelines say so."""
        tokenizer = self.tokenizers[0]  # SDXL's two CLIP tokenizers share vocabulary and limit
        distinct = list(dict.fromkeys(prompts))
        lengths = (len(ids) for ids in tokenizer(distinct, truncation=False, verbose=False).input_ids)
        cut = [p for p, n in zip(distinct, lengths) if n > tokenizer.model_max_length]
        if not cut:
            return None
        example = cut[0] if len(cut[0]) <= 60 else cut[0][:57] + "..."
        return (
            f"note: {len(cut)} of {len(distinct)} prompts are longer than the text encoder's "
            f"{tokenizer.model_max_length} tokens; "
            f"it reads only their start (e.g. {example!r})"
        )

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

    def time_ids(self, batch: int) -> Tensor:
        """SDXL micro-conditioning (original size, crop top-left, target size), fixed square."""
        r = float(self.resolution)
        return torch.tensor([[r, r, 0.0, 0.0, r, r]], device=self.device).expand(batch, 6)

    @torch.no_grad()
    def empty_cond(self) -> Cond:
        """The unconditional conditioning for CFG, batch 1.

        SD: the empty prompt encoded. SDXL: zeros, as the SDXL pipeline does for an empty
        negative prompt and the DMD2 reference does, unless the teacher's pipeline sets
        force_zeros_for_empty_prompt false: then the empty prompt encoded, as that pipeline does.
        """
        cond = self.encode_prompts([""])
        if self.spec.layout == "sdxl" and self.spec.force_zeros_for_empty_prompt:
            cond["encoder_hidden_states"] = torch.zeros_like(cond["encoder_hidden_states"])
            cond["text_embeds"] = torch.zeros_like(cond["text_embeds"])
        return cond

    @property
    def latent_cache_id(self) -> str:
        """Names what encode_images computes, for the latent cache's key ("seed0": the seeded
        posterior samples; caches built before them from the global RNG are not reused). A local
        teacher's VAE files are in it, so a replaced VAE is not served its predecessor's latents."""
        vae = component_files(self.spec.source, ("vae",))
        digest = f":{hashlib.sha256(json.dumps(vae).encode()).hexdigest()[:16]}" if vae else ""
        return f"{self.spec.source}:vae:seed0{digest}"

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images [B, 3, R, R] in [-1, 1] → latents [B, C, R/f, R/f] (one posterior sample × scale).

        Successive calls continue one seeded stream (`latent_generator`), so a folder encoded in the
        same order and batches gives the same latents."""
        posterior = self.vae.encode(images.to(self.device, torch.float32)).latent_dist
        return (posterior.sample(generator=self.latent_generator) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents [B, C, h, w] → images [B, 3, H, W] in [-1, 1]."""
        return self.vae.decode(latents.to(self.device, torch.float32) / self.scaling_factor).sample.float().clamp(-1, 1)
