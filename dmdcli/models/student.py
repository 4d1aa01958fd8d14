"""Find and load a model to sample from: a distilled student, or any diffusers text-to-image pipeline.

`--model` of `dmd sample` (and of later commands that generate images) names one of:

- a run folder of `dmd distill` (or its student.safetensors, or a `dmd export --format unet`
  file): the teacher's text encoders and VAE from the teacher the student records, and the
  teacher's UNet made into the student (full weights loaded, or the LoRA added and fused);
- one of a run's checkpoints (RUN/checkpoints/iter-NNNNNN): the generator as it was then, so
  a long run's checkpoints can be sampled, scored and exported to pick the best;
- a folder written by `dmd export --format diffusers` (it holds a dmd_student.json);
- any other diffusers pipeline folder or hub id: sampled by the pipeline itself, with its own
  scheduler, so a teacher can be sampled the same way for comparison.

How each is sampled: dmdcli.models.samplers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dmdcli.errors import DmdError, UsageError, first_line
from dmdcli.files import read_json
from dmdcli.models.families import get_family
from dmdcli.models.pipeline import from_pretrained
from dmdcli.models.teacher import TeacherSpec, inspect_teacher, looks_like_path, resolve_teacher
from dmdcli.runfiles import (
    CONFIG_FILE,
    EMA_PREFIX,
    METRICS_FILE,
    STUDENT_FILE,
    TENSORS_FILE,
    is_checkpoint,
    read_checkpoint,
    read_student_info,
)

# Written by `dmd export --format diffusers` beside model_index.json: the student's metadata.
EXPORT_INFO_FILE = "dmd_student.json"


@dataclass
class ModelSource:
    """What `--model` names, found from files alone (nothing heavy loaded).

    kind: "student" (a student file: a run folder's student.safetensors or a unet export),
    "export" (a diffusers folder written by `dmd export`) or "pipeline" (anything else).
    """

    kind: str
    name: str  # as the user gave it (recorded in image metadata)
    path: str  # the student file, the export folder, or the pipeline folder / hub id
    info: dict[str, Any] | None = None  # the student's metadata (teacher, steps, timesteps, ...)
    checkpoint: str | None = None  # "iter-000800" when the student is a checkpoint's generator

    @property
    def run_folder(self) -> Path | None:
        """The run a checkpoint belongs to (RUN/checkpoints/iter-N/tensors.safetensors)."""
        return Path(self.path).parents[2] if self.checkpoint else None

    def weights(self) -> dict[str, Tensor]:
        """The student's tensors; of a checkpoint only the generator's (its EMA with --ema-decay, as
        the student file; not the fake score's or the optimizer moments, which are most of its size)."""
        from safetensors import safe_open

        prefix = ""
        if self.checkpoint:
            prefix = EMA_PREFIX if self.info.get("ema_decay") else "generator."
        with safe_open(self.path, framework="pt") as f:
            return {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}

    @property
    def is_student(self) -> bool:
        return self.kind != "pipeline"

    def spec(self) -> TeacherSpec:
        """The pipeline whose text encoders and VAE the student uses (and, for an export, its UNet)."""
        spec = inspect_teacher(self.info["teacher"] if self.kind == "student" else self.path)
        if self.info and spec.layout != self.info.get("layout", spec.layout):
            raise DmdError(
                f"{self.name}: the student is {self.info['layout']}-layout but {spec.source} is {spec.layout}-layout"
            )
        return spec

    def resolution(self, spec: TeacherSpec) -> int:
        """The side the student was trained at (older students: its teacher's native one)."""
        return int(self.info.get("resolution") or spec.native_resolution)

    def image_size(
        self, resolution: int | None, height: int | None, width: int | None
    ) -> tuple[int | None, int | None]:
        """(height, width) from --resolution / --height / --width: a missing side is the student's
        resolution, or for a plain pipeline the other side (None, None: the pipeline's default)."""
        height, width = height or resolution, width or resolution
        if not self.is_student:
            return (height or width, width or height)
        spec = self.spec()
        default = self.resolution(spec)
        height, width = height or default, width or default
        for what, value in (("height", height), ("width", width)):
            spec.check_resolution(value, f"image {what}")
        return height, width


def find_model(name: str) -> ModelSource:
    """Tell what `name` is. Raises UsageError for a missing path, DmdError for a run with no student."""
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UsageError(f"{name} is not a run folder, a student .safetensors file or a diffusers pipeline")
        return ModelSource("student", name, str(path), read_student_info(path))
    if path.is_dir():
        if (path / STUDENT_FILE).is_file():
            return ModelSource("student", name, str(path / STUDENT_FILE), read_student_info(path / STUDENT_FILE))
        if is_checkpoint(path):
            return checkpoint_source(name, path)
        if (path / "model_index.json").is_file():
            if (path / EXPORT_INFO_FILE).is_file():
                return ModelSource("export", name, str(path), read_json(path / EXPORT_INFO_FILE))
            return ModelSource("pipeline", name, str(path))
        if (path / CONFIG_FILE).is_file() or (path / METRICS_FILE).is_file():
            raise DmdError(f"{name} holds no student yet: dmd distill writes {STUDENT_FILE} when the run ends")
        raise UsageError(f"{name} is neither a dmd run folder nor a diffusers pipeline folder")
    source = resolve_teacher(name)
    if looks_like_path(name):
        raise UsageError(f"model not found: {name}")  # a path (runs/typo: runs/ is a folder here), not a hub id
    return ModelSource("pipeline", name, source)


def checkpoint_source(name: str, folder: Path) -> ModelSource:
    """A checkpoint's generator as a student. Its metadata is the checkpoint's own (state.json
    "student"), or, for checkpoints written before that was recorded, the run's student file's
    with the checkpoint's iteration."""
    _, state = read_checkpoint(folder, with_tensors=False)
    info = state.get("student")
    if info is None:
        student_file = folder.parent.parent / STUDENT_FILE
        if not student_file.is_file():
            raise DmdError(
                f"{name}: the checkpoint does not record its student's metadata and {student_file} is missing"
            )
        info = {**read_student_info(student_file), "iterations": int(state["iteration"])}
    return ModelSource("student", name, str(folder / TENSORS_FILE), info, checkpoint=folder.name)


# -- the student's UNet -----------------------------------------------------------------------


def load_student_weights(unet: nn.Module, source: ModelSource) -> nn.Module:
    """Make a UNet of the teacher's architecture into the student, in place.

    A full student's state dict is loaded strictly. A LoRA student gets the adapter exactly as
    `dmd distill` added it (same rank, alpha and target modules), its weights through peft's
    set_peft_model_state_dict, and is then fused, so the result is a plain UNet2DConditionModel.
    """
    if source.kind != "student":
        raise DmdError(f"{source.name} holds no student weights to load")
    info, weights = source.info, source.weights()
    if info.get("kind") == "lora":
        fuse_lora_student(unet, weights, info, get_family(source.spec().family).lora_targets)
        return unet
    try:
        unet.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()}, strict=True)
    except RuntimeError as e:
        raise DmdError(f"{source.path} does not fit the UNet of {info['teacher']}: {first_line(e)}") from e
    return unet


def fuse_lora_student(
    unet: nn.Module, weights: dict[str, Tensor], info: dict[str, Any], family_targets: tuple[str, ...]
) -> None:
    """Add the generator LoRA described by `info` (on its recorded target modules, else the
    family's), load `weights` (peft layout) and fuse it."""
    from dmdcli.models.lora import add_generator_lora, load_lora_state_dict

    targets = info.get("lora_target_modules") or family_targets
    add_generator_lora(unet, int(info["lora_rank"]), float(info["lora_alpha"]), targets)
    try:
        load_lora_state_dict(unet, weights)
    except (ValueError, RuntimeError) as e:  # RuntimeError: peft's shape mismatch (another rank)
        raise DmdError(f"the student's LoRA does not fit the teacher's UNet: {first_line(e)}") from None
    # peft's (unsafe, diffusers' default) merge adds the fp32 delta in place, in fp32 then rounded: a
    # base read in bf16 gets bf16(W + Δ), the bits of an fp32 read fused then cast where the teacher
    # stores bf16 (its safe merge would round Δ to bf16 first)
    unet.fuse_lora()
    unet.unload_lora()


def load_student_network(
    source: ModelSource, allow_pickle: bool = False, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """The student as a plain network of its teacher's class (a UNet2DConditionModel, ...) in
    `dtype` on the CPU (LoRA fused).

    Read in `dtype`, not whole in fp32 and then cast (Qwen-Image's transformer: 82 GB of host memory
    in fp32): a full student's weights are the same bits (loading rounds each as a cast does), a
    LoRA student's too where the teacher stores `dtype`, else within one rounding of them."""
    import diffusers

    spec = source.spec()
    network_class = getattr(diffusers, get_family(spec.family).teacher.network_class)
    network = from_pretrained(network_class, spec, spec.network, allow_pickle, torch_dtype=dtype)
    network = network.to(dtype).requires_grad_(False).eval()
    if source.kind == "student":
        load_student_weights(network, source)
    return network
