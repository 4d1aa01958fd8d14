"""Teacher families behind one registry: what each kind of teacher brings, declared in its own module.

A family says how a teacher of it is recognised (from its model_index.json, or by the name and
folder of a teacher shipped with dmd), how it is loaded (its PipelineTeacher, its network's folder
and shape), the adapter that puts its network behind the Denoiser interface, the modules its LoRA
adapters wrap, its --teacher aliases, its defaults (the 1-step conditioning timestep, the recipe a
run gets without --recipe), its evaluation set and its named data sets. The runtime asks the
lookups below and names no family; adding one is adding a module to FAMILY_MODULES, which
registers itself on import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from dmdcli.core.denoiser import Denoiser
    from dmdcli.core.schedule import NoiseSchedule
    from dmdcli.models.pipeline import PipelineTeacher

# The one place that names the family modules, in the order they are asked (and listed in help).
FAMILY_MODULES = (
    "dmdcli.models.sd",
    "dmdcli.models.sd3",
    "dmdcli.models.flux",
    "dmdcli.models.chroma",
    "dmdcli.models.flux2",
    "dmdcli.models.qwen_image",
    "dmdcli.models.z_image",
    "dmdcli.shapes.family",
)


def _no_recipe(steps: int, lora_rank: int | None) -> str | None:
    return None


def pipeline_guidance_scale(scale: float | None) -> dict[str, Any]:
    """diffusers' usual CFG argument, guidance_scale (None: the pipeline's default, 0: off)."""
    return {} if scale is None else {"guidance_scale": scale}


@dataclass(frozen=True)
class EvalSet:
    """A family's own evaluation set: `dmd eval --fid NAME`, the default for models of its built-in teacher."""

    name: str
    benchmark: str  # "module:function" making its Benchmark (dmdcli.eval.run), imported when asked for
    help: str  # what it scores, for `dmd eval --help`


@dataclass(frozen=True)
class NetworkShape:
    """What a family reads from its denoising network's config.json."""

    # the latent side it was trained at (× the VAE's factor: --resolution's default); None: the VAE's sample_size
    native_latent_side: int | None
    latent_channels: int  # channels of the latents the engine handles ([B, C, h, w])
    downsample: int  # how many times the network divides the latent side (a UNet's levels, a patch size)


@dataclass(frozen=True)
class Family:
    """One kind of teacher. Only `name`, `layout`, `teacher`, `denoiser`, `network_shape` and
    `conditioning_timestep` are required."""

    name: str  # what TeacherSpec.family (and, for a built-in teacher, --teacher NAME) calls it
    layout: str  # what a student records it was trained on (TeacherSpec.layout): "sd", "sdxl", ...
    teacher: type[PipelineTeacher]  # loads the frozen pipeline parts and conditions prompts
    denoiser: Callable[[nn.Module, NoiseSchedule], Denoiser]  # the adapter: the network → the one interface
    network_shape: Callable[[dict[str, Any]], NetworkShape]  # its network's config.json → its shape
    conditioning_timestep: int  # the t a 1-step student is told when --conditioning-timestep is not given
    network: str = "unet"  # the pipeline's component (folder) that is the denoising network
    lora_targets: tuple[str, ...] = ()  # module names of the network the LoRA adapters wrap
    # config keys the adapter takes as keyword arguments (FLUX: embedded_guidance); students record them
    denoiser_options: tuple[str, ...] = ()
    classifier_free_guidance: bool = True  # False: a guidance-distilled teacher, whose real score takes no CFG
    # False: its adapter's number of network calls per batch depends on the batch (Chroma's prompt-length
    # groups), so processes sharing FSDP's collectives could disagree: --fsdp is refused
    shardable: bool = True
    # what its diffusers pipeline is called with for CFG at a scale (≤ 1: off; None: the family's default)
    pipeline_guidance: Callable[[float | None], dict[str, Any]] = pipeline_guidance_scale
    # Where its pipeline must be handed prompts otherwise than by `prompt=` (Chroma: the pipeline's own
    # mask is wrong): (pipeline, prompts, its CFG arguments, what it is called with besides: a recorded
    # max_sequence_length) → the call's prompt arguments, for `dmd sample` / `dmd eval` of the teacher
    # pipeline; and (a prompt as a Python literal, those same arguments) → the lines a printed diffusers
    # snippet encodes it with and the call's arguments that pass it.
    pipeline_prompts: Callable[[Any, list[str], dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None
    snippet_prompt: Callable[[str, dict[str, Any]], tuple[list[str], str]] | None = None
    # hub id of a tiny autoencoder (diffusers' AutoencoderTiny) decoding its latents, for LPIPS regression
    tiny_autoencoder: str | None = None
    # (model_index.json, config.json of the network, of the VAE, of the scheduler) → why dmd cannot
    # distill it, or None
    unsupported: Callable[[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]], str | None] = (
        lambda *configs: None
    )
    # image tokens → μ of the resolution shift, where the pipeline computes it otherwise than from the
    # scheduler config's bounds (FLUX.2); None: from them (FLUX, Qwen-Image), or a static shift
    time_shift: Callable[[int], float] | None = None
    recognises: Callable[[dict[str, Any]], bool] | None = None  # from model_index.json; None: by name only
    aliases: dict[str, str] = field(default_factory=dict)  # --teacher names → hub ids (listed in the help)
    builtin_teacher: Callable[[], str] | None = None  # the folder of a teacher shipped with dmd, named `name`
    recipe: Callable[[int, int | None], str | None] = _no_recipe  # (steps, lora_rank) → recipe without --recipe
    eval_set: EvalSet | None = None  # its own --fid set; None: the COCO protocols and folders only
    data: dict[str, Callable[[], str]] = field(default_factory=dict)  # --data NAME → its folder (made on first use)
    example_prompt: str = "..."  # what the hint after a run suggests sampling
    default: bool = False  # the family of `dmd distill` with no --teacher (one with a built-in teacher)
    title: str = ""  # how messages name its teachers ("the built-in teacher"; default: "a NAME teacher")
    distills: str = ""  # the pipelines it recognises, as the message refusing any other pipeline lists them
    help: str = ""  # the default family's lines in `dmd distill --help`: what a run with no --teacher is

    def denoiser_kwargs(self, config) -> dict[str, Any]:
        """The adapter's keyword arguments from a run's config (`denoiser_options`); students record them."""
        return {k: getattr(config, k) for k in self.denoiser_options}


REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add (or replace) a family; called by its module on import."""
    REGISTRY[family.name] = family
    return family


def families() -> list[Family]:
    """Every registered family, in registration order (FAMILY_MODULES imported first)."""
    for module in FAMILY_MODULES:
        importlib.import_module(module)
    return list(REGISTRY.values())


def get_family(name: str) -> Family:
    """The family registered as `name` (a TeacherSpec's `family`)."""
    families()
    return REGISTRY[name]


def layout_family(layout: str) -> Family:
    """The first family whose students record `layout` (families sharing a layout share its network)."""
    return next(f for f in families() if f.layout == layout)


def default_family() -> Family:
    """The family a run without --teacher distills."""
    return next(f for f in families() if f.default)


def named_family(name: str | None) -> Family | None:
    """The family that `--teacher name` names by itself (a built-in teacher's name or an alias), else None."""
    return next((f for f in families() if (name == f.name and f.builtin_teacher) or name in f.aliases), None)


def resolve_alias(name: str) -> str | None:
    """A built-in teacher's name → its folder, an alias → its hub id; None for any other name."""
    family = named_family(name)
    if family is None:
        return None
    return family.aliases[name] if name in family.aliases else family.builtin_teacher()


def teacher_aliases() -> dict[str, str]:
    """Every family's aliases → hub ids."""
    return {alias: hub_id for f in families() for alias, hub_id in f.aliases.items()}


def recognise(index: dict[str, Any]) -> Family | None:
    """The first family whose `recognises` accepts a pipeline's model_index.json, else None."""
    return next((f for f in families() if f.recognises and f.recognises(index)), None)


def default_eval_set(teacher: str) -> EvalSet | None:
    """The evaluation set of the family whose built-in teacher is the folder `teacher`, else None."""
    path = Path(teacher).expanduser().resolve()
    builtin = (f for f in families() if f.builtin_teacher and Path(f.builtin_teacher()).resolve() == path)
    return next((f.eval_set for f in builtin), None)


def eval_sets() -> list[EvalSet]:
    """Every family's evaluation set, once (families of one world share theirs)."""
    return list({f.eval_set.name: f.eval_set for f in families() if f.eval_set}.values())


def data_names() -> list[str]:
    """The --data names the families register (not paths), once each."""
    return list(dict.fromkeys(name for f in families() for name in f.data))


def resolve_data(data: str | None) -> str | None:
    """A registered --data name → its folder (made on first use); anything else unchanged."""
    maker = next((f.data[data] for f in families() if data in f.data), None)
    return maker() if maker else data


def supported_pipelines() -> str:
    """What dmd distills, for the message that refuses any other pipeline."""
    return ", ".join(f.distills for f in families() if f.recognises)  # a built-in teacher's family: by name
