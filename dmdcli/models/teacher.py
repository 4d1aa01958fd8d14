"""What a teacher is, from its config files alone: its family, its network's shape, its schedule.

`inspect_teacher` reads a diffusers pipeline's model_index.json and its components' configs (a
local folder or the hub, no weights) into a TeacherSpec; the family it is of (dmdcli.models.
families) loads its frozen parts (models/pipeline.py's `load_teacher`) and puts its network
behind the Denoiser interface.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmdcli.core.schedule import NoiseSchedule, flow_sigmas, resolution_shift, shift_sigmas, time_shift_sigmas
from dmdcli.errors import DmdError, UsageError, first_line
from dmdcli.files import read_json
from dmdcli.models.families import Family, get_family, named_family, recognise, resolve_alias, supported_pipelines


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


def schedule_from_config(
    config: dict[str, Any], image_seq_len: int | None = None, mu: float | None = None
) -> NoiseSchedule:
    """The schedule of a diffusers scheduler config: any scheduler of the DDPM family, or a
    flow-matching one (`is_flow_matching_config`: SD3, FLUX).

    diffusers' DDPMScheduler already computes ᾱ_t for every beta schedule and option
    (scaled_linear, squaredcos_cap_v2, rescale_betas_zero_snr, ...), so we take its numbers
    instead of re-deriving them (here, not in core/, which imports only torch).

    image_seq_len: the teacher's image token count at the training resolution (FLUX: (H/16)·(W/16)),
    which a flow schedule with a resolution-dependent shift (`use_dynamic_shifting`) needs.
    mu: that shift's μ where the family's pipeline computes it otherwise than from the config's
    bounds (FLUX.2's `compute_empirical_mu`; `TeacherSpec.time_shift`); None: from the config.
    """
    if is_flow_matching_config(config):
        return _flow_schedule_from_config(config, image_seq_len, mu)
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(dict(config))
    return NoiseSchedule(scheduler.alphas_cumprod, scheduler.config.prediction_type)


def is_flow_matching_config(config: dict[str, Any]) -> bool:
    """Whether a scheduler config is of diffusers' flow-matching schedulers: by its class name
    (FlowMatchEulerDiscreteScheduler, ...), or, without one, by their shift keys and no betas."""
    if name := config.get("_class_name"):
        return "FlowMatch" in name
    has_betas = "beta_schedule" in config or config.get("trained_betas") is not None
    return not has_betas and ("shift" in config or "use_dynamic_shifting" in config)


def _flow_schedule_from_config(config: dict[str, Any], image_seq_len: int | None, mu: float | None) -> NoiseSchedule:
    """FlowMatchEulerDiscreteScheduler's training sigmas, statically shifted (SD3) or by the
    image's token count (FLUX), with velocity prediction. Options that only respace its inference
    ladder (shift_terminal, Karras / exponential / beta sigmas, stochastic sampling) do not change
    what the network was trained on and are not applied."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    c = FlowMatchEulerDiscreteScheduler.from_config(dict(config)).config  # diffusers' defaults for unset keys
    if c.invert_sigmas:
        raise ValueError("flow-matching schedules with invert_sigmas (the network told 1 − σ) are not supported")
    sigmas = flow_sigmas(c.num_train_timesteps)
    if not c.use_dynamic_shifting:
        return NoiseSchedule.flow(shift_sigmas(sigmas, c.shift))
    if image_seq_len is None:
        raise ValueError(
            "this flow-matching schedule shifts its sigmas by the image's resolution (use_dynamic_shifting): "
            "pass image_seq_len, the number of image tokens at the training resolution"
        )
    if mu is None:
        mu = resolution_shift(image_seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    return NoiseSchedule.flow(time_shift_sigmas(sigmas, mu, c.time_shift_type))


# A key of model_index.json dmd reads and diffusers ignores (it drops keys starting with "_").
MAX_SEQUENCE_LENGTH_KEY = "_dmd_max_sequence_length"


def record_max_sequence_length(folder: Path, length: int | None) -> None:
    """Record a pipeline's T5 positions in its model_index.json (diffusers' save_pretrained drops the key)."""
    if length is None:
        return
    path = Path(folder) / "model_index.json"
    index = json.loads(path.read_text())
    path.write_text(json.dumps(index | {MAX_SEQUENCE_LENGTH_KEY: length}, indent=2, sort_keys=True) + "\n")


@dataclass
class TeacherSpec:
    """What a teacher is, read from its config files only (nothing heavy loaded)."""

    source: str
    layout: str  # what its students record they were trained on: its family's layout ("sd", "sdxl", ...)
    family: str  # the registered family its config files are of (dmdcli.models.families)
    pipeline_class: str
    scheduler_config: dict[str, Any]
    native_resolution: int
    latent_channels: int
    vae_scale_factor: int
    network_downsample: int  # the network divides the latent side by this (a UNet's levels, a patch size)
    network: str = "unet"  # the pipeline's component that is the denoising network
    # SDXL's unconditional input is zeros unless its pipeline says otherwise (model_index.json)
    force_zeros_for_empty_prompt: bool = True
    # components model_index.json lists as [null, null] (SD3 without T5): diffusers' from_pretrained
    # wants them passed as None, so the pipelines dmd loads and the snippets it prints pass them
    absent: tuple[str, ...] = ()
    # the T5 positions of a prompt when its pipeline records them ("_dmd_max_sequence_length" in
    # model_index.json, which diffusers ignores): the pipeline is called with max_sequence_length=N.
    # None: the family's pipeline default (SD3 256, FLUX 512)
    max_sequence_length: int | None = None

    @property
    def absent_required(self) -> dict[str, None]:
        """The absent components diffusers' from_pretrained must be passed as None (its pipeline
        class's optional ones, such as a safety checker, it leaves out by itself)."""
        import diffusers

        optional = getattr(getattr(diffusers, self.pipeline_class, None), "_optional_components", [])
        return {k: None for k in self.absent if k not in optional}

    @property
    def call_kwargs(self) -> dict[str, int]:
        """What its diffusers pipeline must be called with to condition as dmd does (a recorded
        max_sequence_length)."""
        return {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}

    def text_tokens(self, default: int) -> int:
        """A prompt's text positions (T5's, Qwen2.5-VL's): the recorded max_sequence_length, else the
        family pipeline's `default`."""
        return default if self.max_sequence_length is None else self.max_sequence_length

    @property
    def prediction_type(self) -> str:
        if is_flow_matching_config(self.scheduler_config):
            return "flow"  # v = ε − x0: what every flow-matching teacher predicts (no key says so)
        return self.scheduler_config.get("prediction_type", "epsilon")

    def schedule(self, resolution: int | None = None) -> NoiseSchedule:
        """The teacher's schedule; at `resolution` (pixels) for one shifted by the image's token count
        (FLUX: (R / 16)² tokens), which then needs it."""
        tokens = self.image_seq_len(resolution) if resolution else None
        return schedule_from_config(self.scheduler_config, tokens, self.time_shift(tokens))

    def time_shift(self, image_seq_len: int | None) -> float | None:
        """μ of the resolution shift for `image_seq_len` image tokens where the family's pipeline
        computes it itself (Family.time_shift: FLUX.2), else None (the scheduler config's bounds)."""
        shift = get_family(self.family).time_shift
        return shift(image_seq_len) if shift and image_seq_len else None

    def image_seq_len(self, resolution: int) -> int:
        """How many image tokens (or bottom-level positions) a resolution² image is to the network."""
        return (resolution // (self.vae_scale_factor * self.network_downsample)) ** 2

    def training_resolution(self, requested: int | None) -> int:
        """--resolution, or the teacher's native side; checked."""
        resolution = requested or self.native_resolution
        self.check_resolution(resolution)
        return resolution

    def check_resolution(self, resolution: int, what: str = "--resolution") -> None:
        """A side must be a multiple of what the VAE and the network divide it by, and at least twice
        that: below a 2×2 latent at a UNet's bottom its group norms see a single value (a tiny
        UNet fails outright)."""
        multiple = self.vae_scale_factor * self.network_downsample
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
        raise DmdError(f"unsupported pipeline {pipeline_class} in {source}: dmd distills {supported_pipelines()}")
    network_cfg = _load_json_config(source, family.network, "config.json")
    vae_cfg = _load_json_config(source, "vae", "config.json")
    scheduler_cfg = _load_json_config(source, "scheduler", "scheduler_config.json")
    if reason := family.unsupported(index, network_cfg, vae_cfg, scheduler_cfg):
        raise DmdError(f"{reason} ({source})")
    vae_scale = family.teacher.vae_scale_factor(vae_cfg)
    shape = family.network_shape(network_cfg)
    return TeacherSpec(
        source=source,
        layout=family.layout,
        family=family.name,
        pipeline_class=pipeline_class,
        scheduler_config=scheduler_cfg,
        native_resolution=shape.native_latent_side * vae_scale
        if shape.native_latent_side
        else int(vae_cfg.get("sample_size", 1024)),
        latent_channels=shape.latent_channels,
        vae_scale_factor=vae_scale,
        network_downsample=shape.downsample,
        network=family.network,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        absent=tuple(k for k, v in index.items() if v == [None, None]),
        max_sequence_length=index.get(MAX_SEQUENCE_LENGTH_KEY),
    )
