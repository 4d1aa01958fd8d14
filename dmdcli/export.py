"""`dmd export`: write a student in the formats other tools load.

    diffusers  a complete pipeline folder: the teacher's text encoders, tokenizers and VAE, the
               student network (LoRA fused), and a scheduler configured for the student (an
               LCMScheduler; for a flow-matching student a FlowMatchLCMScheduler, called with its sigmas)
    lora       diffusers LoRA safetensors (peft keys under "unet.", lora_alpha in the header),
               for `pipe.load_lora_weights(file)` on the teacher pipeline
    kohya      the `lora_unet_…` layout with a per-module alpha (ComfyUI, Automatic1111, and
               diffusers' load_lora_weights); UNet students only
    unet       one safetensors file with the student network's state dict (LoRA fused; for an SD3
               student its transformer's)

Every file is safetensors, written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dmdcli.core.schedule import student_timesteps
from dmdcli.errors import DmdError, UsageError, first_line
from dmdcli.files import atomic_save_file, check_can_make, share_as_umask
from dmdcli.models.families import layout_family
from dmdcli.models.samplers import DTYPES
from dmdcli.models.student import EXPORT_INFO_FILE, ModelSource, find_model, load_student_network
from dmdcli.models.student_schedulers import (
    ddim_student_scheduler,
    flow_student_scheduler,
    pipeline_sigmas,
    student_scheduler,
    student_static_shift,
)
from dmdcli.models.teacher import record_max_sequence_length
from dmdcli.train import rundir

FORMATS = ("diffusers", "lora", "kohya", "unet")
DEFAULT_NAMES = {
    "diffusers": "diffusers",
    "lora": "lora.safetensors",
    "kohya": "kohya.safetensors",
    "unet": "unet.safetensors",
}
EXPORT_FORMAT = "dmd-export/1"
# -- writing safely --------------------------------------------------------------------------


def default_out(source: ModelSource, fmt: str) -> Path:
    """RUN/export/<format>; of a checkpoint RUN/export/<checkpoint>-<format> (never inside the
    checkpoint folder, which the run deletes when it keeps only the newest ones)."""
    if source.checkpoint:
        return source.run_folder / "export" / f"{source.checkpoint}-{DEFAULT_NAMES[fmt]}"
    return Path(source.path).parent / "export" / DEFAULT_NAMES[fmt]


def check_out(out: Path, fmt: str, overwrite: bool) -> None:
    """Refuse, before any work, to replace what is there unless asked (and never a non-pipeline folder)."""
    check_can_make(out, folder=False)  # what stands at `out` itself is judged below
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    if fmt == "diffusers":
        if not out.is_dir() or not (out / "model_index.json").is_file():
            raise UsageError(f"--out {out} exists and is not a pipeline folder; refusing to replace it")
    elif out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name for --format {fmt}")


def _replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` to `out`, replacing an old one only after the new one is whole."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:  # put the user's export back where it was
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _scratch(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


# -- formats ----------------------------------------------------------------------------------


def _cast(tensors: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}


def check_kind(source: ModelSource, fmt: str) -> None:
    """LoRA formats need a LoRA student; the kohya layout, a UNet's."""
    if fmt == "kohya" and layout_family(source.info["layout"]).network != "unet":
        raise UsageError(f"{source.name} is not a UNet student; the kohya layout is for UNets: use --format lora")
    if fmt in ("lora", "kohya") and source.info.get("kind") != "lora":
        raise UsageError(
            f"{source.name} is a full fine-tune; LoRA formats need a LoRA student (dmd distill --lora-rank R). "
            "Use --format unet or --format diffusers"
        )


def _lora_weights(source: ModelSource) -> dict[str, Tensor]:
    check_kind(source, "lora")
    return source.weights()


def export_diffusers(source: ModelSource, out: Path, dtype: torch.dtype, allow_pickle: bool) -> list[Path]:
    from diffusers import DiffusionPipeline

    spec, info = source.spec(), source.info
    network = load_student_network(source, allow_pickle, dtype)
    # Pipelines default to network.config.sample_size × the VAE factor: make that the student's resolution.
    resolution = source.resolution(spec)
    network.register_to_config(sample_size=resolution // spec.vae_scale_factor)
    timesteps = list(info["timesteps"])
    if spec.prediction_type == "flow":
        if info["prediction_type"] != "flow":  # FlowMatch schedulers read a velocity
            raise DmdError(
                f"a flow-matching pipeline's schedulers read the velocity; this student predicts "
                f"{info['prediction_type']}: use --format unet and dmd sample"
            )
        tokens = spec.image_seq_len(resolution)
        sampler = info.get("sampler", "dmd")
        scheduler = flow_student_scheduler(spec.scheduler_config, timesteps, tokens, sampler, spec.time_shift(tokens))
    elif info.get("sampler") == "ddim":
        scheduler = ddim_student_scheduler(spec.scheduler_config, timesteps, info["prediction_type"])
    else:
        scheduler = student_scheduler(spec.scheduler_config, timesteps)
    try:
        with warnings.catch_warnings():  # diffusers 0.4x calls torch_dtype `dtype`; 0.37 knows only torch_dtype
            warnings.filterwarnings("ignore", ".*`torch_dtype` is deprecated", FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(  # the other components read in `dtype` too (the same bits)
                spec.source,
                **{spec.network: network},
                scheduler=scheduler,
                use_safetensors=None if allow_pickle else True,
                torch_dtype=dtype,
                **spec.absent_required,
            ).to(dtype=dtype, silence_dtype_warnings=True)
    except (OSError, ValueError) as e:
        raise DmdError(f"could not load teacher pipeline {spec.source}: {first_line(e)}") from e
    tmp = _scratch(out)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        record_max_sequence_length(tmp, spec.max_sequence_length)
        record = {"format": EXPORT_FORMAT, **info, "exported_from": str(source.path), "dtype": _dtype_name(dtype)}
        (tmp / EXPORT_INFO_FILE).write_text(json.dumps(record, indent=2) + "\n")
        share_as_umask(tmp)
        _replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out]


def export_lora(source: ModelSource, out: Path, dtype: torch.dtype, allow_pickle: bool) -> list[Path]:
    """peft-layout LoRA through diffusers' own writer, with the adapter's LoraConfig (rank, alpha,
    targets) in its header so load_lora_weights restores alpha ≠ rank. (diffusers'
    convert_state_dict_to_diffusers would rename only attention keys and make load_lora_weights
    drop them beside conv/ff keys; the raw peft keys reload exactly.)"""
    import inspect

    import diffusers
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights, info, spec = _lora_weights(source), source.info, source.spec()
    pipeline_class = getattr(diffusers, spec.pipeline_class)  # its save_lora_weights names the network's keys
    network = spec.network  # "unet", "transformer"
    if f"{network}_lora_adapter_metadata" not in inspect.signature(pipeline_class.save_lora_weights).parameters:
        raise DmdError("this diffusers is too old to store lora_alpha in a LoRA file; upgrade diffusers (>= 0.34)")
    adapter = {
        "r": int(info["lora_rank"]),
        "lora_alpha": float(info["lora_alpha"]),
        "target_modules": list(info["lora_target_modules"]),
    }
    tmp = _scratch(out)
    try:
        layers = {f"{network}_lora_layers": _cast(weights, dtype), f"{network}_lora_adapter_metadata": adapter}
        pipeline_class.save_lora_weights(tmp, weight_name=out.name, **layers)
        written = tmp / out.name
        with safe_open(str(written), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        metadata["dmd_student"] = json.dumps(info)
        atomic_save_file(load_file(written), out, metadata)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out]


def kohya_state_dict(weights: dict[str, Tensor], alpha: float, dtype: torch.dtype) -> dict[str, Tensor]:
    """peft keys `<module>.lora_A.weight` / `.lora_B.weight` → `lora_unet_<module, dots as _>`
    `.lora_down.weight` / `.lora_up.weight`, plus that module's `.alpha` (a 0-d tensor)."""
    out: dict[str, Tensor] = {}
    for key, value in weights.items():
        module, _, part = key.rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise DmdError(f"unexpected LoRA key {key} in the student")
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.{'lora_down' if part == 'A.weight' else 'lora_up'}.weight"] = value.to(dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out


def export_kohya(source: ModelSource, out: Path, dtype: torch.dtype, allow_pickle: bool) -> list[Path]:
    weights, info = _lora_weights(source), source.info
    rank, alpha = int(info["lora_rank"]), float(info["lora_alpha"])
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sdxl_base_v1-0" if info["layout"] == "sdxl" else "sd_v1",
        "dmd_student": json.dumps(info),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_file(kohya_state_dict(weights, alpha, dtype), out, metadata)
    return [out]


def export_unet(source: ModelSource, out: Path, dtype: torch.dtype, allow_pickle: bool) -> list[Path]:
    """The fused UNet's state dict; its header is a full student's, so `dmd sample --model FILE` works."""
    unet = load_student_network(source, allow_pickle, dtype)
    info = {k: v for k, v in source.info.items() if not k.startswith("lora_")}
    info.update(kind="full", exported_from=str(source.path), dtype=_dtype_name(dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    rundir.save_student(out, _cast(unet.state_dict(), dtype), info)
    return [out]


EXPORTERS: dict[str, Callable[[ModelSource, Path, torch.dtype, bool], list[Path]]] = {
    "diffusers": export_diffusers,
    "lora": export_lora,
    "kohya": export_kohya,
    "unet": export_unet,
}


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


# -- the command's work -----------------------------------------------------------------------


def student_source(model: str) -> ModelSource:
    source = find_model(model)
    if source.kind != "student":
        raise UsageError(f"{model} is not a dmd run folder or student file; dmd export converts a distilled student")
    return source


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def check_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"unknown --dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def export(source: ModelSource, fmt: str, out: Path, dtype: torch.dtype, allow_pickle: bool = False) -> dict[str, Any]:
    """Write `source` as `fmt` to `out` (already checked by check_out); returns what was written."""
    paths = EXPORTERS[fmt](source, out, dtype, allow_pickle)
    info, spec = source.info, source.spec()
    # what the snippet's scheduler is made with besides the teacher's config: the student's sigmas
    # exactly, not stretched to a terminal sigma (Qwen-Image's shift_terminal), nor shifted by the μ
    # FLUX.2's pipeline computes for the student's few steps
    scheduler = {"shift_terminal": None} if spec.scheduler_config.get("shift_terminal") else {}
    if (mu := spec.time_shift(spec.image_seq_len(source.resolution(spec)))) is not None:
        scheduler |= student_static_shift(spec.scheduler_config, mu)
    return {
        "format": fmt,
        "path": str(out),
        "files": [str(p) for p in paths],
        "dtype": _dtype_name(dtype),
        "teacher": info["teacher"],
        "layout": info["layout"],
        "kind": info["kind"],
        "steps": info["steps"],
        "timesteps": info["timesteps"],
        "flow": spec.prediction_type == "flow",  # a flow-matching pipeline: called with sigmas=
        "absent": sorted(spec.absent_required),  # components from_pretrained is passed as None (SD3 without T5)
        "call_kwargs": spec.call_kwargs,  # what the pipeline is called with besides the defaults (SD3 without T5)
        "scheduler": scheduler,
    }


def snippet(fmt: str, out: Path, info: dict[str, Any], dtype: str, record: dict[str, Any]) -> str:
    """A few lines of plain diffusers that use what was written (seed 0: `dmd sample --seed 0`'s
    image; a multi-step flow student's, whose later steps draw from torch's global RNG, a repeatable
    one); `record`: what `export` returned."""
    steps, timesteps, teacher, flow = info["steps"], info["timesteps"], info["teacher"], record["flow"]
    as_dtype = "" if dtype == "fp32" else f", torch_dtype=torch.{str(DTYPES[dtype]).removeprefix('torch.')}"
    # from_pretrained's arguments: the dtype, and the components it must be told are absent
    loading = as_dtype + "".join(f", {name}=None" for name in record.get("absent", []))
    # No CFG, as the family's pipeline turns it off (guidance_scale=0; Qwen-Image's true_cfg_scale=1);
    # a guidance-distilled pipeline's guidance_scale (FLUX) is its embedded guidance instead
    family = layout_family(info["layout"])
    embedded = info.get("denoiser", {}).get("embedded_guidance")
    no_cfg = family.pipeline_guidance(0)
    guidance = ", ".join(f"{k}={v:g}" for k, v in no_cfg.items()) if embedded is None else f"guidance_scale={embedded}"
    seed = f'{guidance}, generator=torch.Generator("cpu").manual_seed(0)'
    # the prompt by name (the FLUX.2 pipelines take an image first), or as the family encodes it (Chroma)
    text = '"a photo of a cat"'
    call_kwargs = record.get("call_kwargs", {})
    encoding, prompt = family.snippet_prompt(text, call_kwargs) if family.snippet_prompt else ([], f"prompt={text}")
    prompt += "".join(f", {name}={value!r}" for name, value in call_kwargs.items())
    if flow:
        scheduler_class = (
            "FlowMatchEulerDiscreteScheduler" if info.get("sampler") == "ddim" else "FlowMatchLCMScheduler"
        )
        overrides = "".join(f", {k}={v!r}" for k, v in record.get("scheduler", {}).items())
        scheduler = f"pipe.scheduler = {scheduler_class}.from_config(pipe.scheduler.config{overrides})"
        size = f"height={info['resolution']}, width={info['resolution']}, " if info.get("resolution") else ""
        call = f"image = pipe({prompt}, {size}sigmas={pipeline_sigmas(timesteps)}, {seed}).images[0]"
        # DMD2's later steps draw fresh noise from torch's global RNG (a progressive student's Euler steps draw none)
        if steps > 1 and info.get("sampler") != "ddim":
            call = (
                f"torch.manual_seed(0)  # steps 2-{steps} draw their noise from the global RNG, not `generator`\n{call}"
            )
    elif info.get("sampler") == "ddim":  # a progressive-distillation student
        scheduler_class = "DDIMScheduler"
        scheduler = (
            'pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", '
            'set_alpha_to_one=True, '
            f'clip_sample=False, prediction_type="{info["prediction_type"]}")'
        )
        call = f"image = pipe({prompt}, num_inference_steps={steps}, {seed}).images[0]"
    else:
        scheduler_class = "LCMScheduler"
        scheduler = "pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=1000)"
        call = f"image = pipe({prompt}, timesteps={timesteps}, {seed}).images[0]"
    head = ["import torch", f"from diffusers import DiffusionPipeline, {scheduler_class}"]
    evenly_spaced = timesteps == student_timesteps(steps, 1000, timesteps[0] if steps == 1 else None)
    if fmt == "diffusers" and not flow and evenly_spaced:  # the exported scheduler gives them by itself
        call = f"image = pipe({prompt}, num_inference_steps={steps}, {seed}).images[0]"
    call = "\n".join([*encoding, call])
    if fmt == "diffusers":
        return "\n".join(
            [
                "import torch",
                "from diffusers import DiffusionPipeline",
                f"pipe = DiffusionPipeline.from_pretrained({str(out)!r}{loading})",
                call,
            ]
        )
    if fmt in ("lora", "kohya"):
        return "\n".join(
            [
                *head,
                f"pipe = DiffusionPipeline.from_pretrained({teacher!r}{loading})",
                f"pipe.load_lora_weights({str(out)!r})",
                scheduler,
                call,
            ]
        )
    network_class, network = family.teacher.network_class, family.network
    return "\n".join(
        [
            *head,
            f"from diffusers import {network_class}",
            "from safetensors.torch import load_file",
            f"net = {network_class}.from_config({network_class}.load_config({teacher!r}, subfolder={network!r}))",
            f"net.load_state_dict(load_file({str(out)!r}))",
            # from_pretrained casts the components it loads, not one passed in.
            *([f"net.to({as_dtype.removeprefix(', torch_dtype=')})"] if as_dtype else []),
            f"pipe = DiffusionPipeline.from_pretrained({teacher!r}, {network}=net{loading})",
            scheduler,
            call,
        ]
    )
