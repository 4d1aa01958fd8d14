"""The options of a distillation run: a tree of typed sections, each field defined once with its
default and its one line of help.

`DistillConfig` is the sections together: the objective (`core`'s DMD2Config itself), then what to
distill, LoRA, optimization, regression, progressive distillation and outputs. Its keys stay
flat (`lr`, not `optimization.lr`), so recipes, config.toml and checkpoints name an option as the
command line does; `SECTIONS` says which section holds it, and `dmd distill --help` lists each
section as a panel, generated from these fields (cli/distill.py). Where a run's values come from
(recipes and the command line) is train/recipes.py; what they must be, train/validation.py; what a
resumed run may change, train/resume.py.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import tomli_w

from dmdcli.core.dmd2 import DMD2Config, option
from dmdcli.files import atomic_write

# Keys of a recipe file that are not options. description: what the recipe is; continues: the
# recipe whose run this one goes on from (its stage 1, given with --init-from); resolved: the
# table a run folder's config.toml adds, so that file works as a recipe too.
RECIPE_ONLY_KEYS = {"description", "continues", "resolved"}


@dataclass
class Distilled:
    """What to distill, into what, from which prompts and images."""

    teacher: str | None = option(None, "Diffusers pipeline folder, hub id or alias.")
    method: str = option(
        "dmd2",
        "dmd2 | dmd: DMD v1, distribution matching + regression on teacher noise→image pairs (λ 0.25, fake score "
        "updated every iteration, no GAN even with --data) | progressive: Progressive Distillation, rounds that "
        "halve the steps from --teacher-steps to --steps.",
    )
    steps: int = option(1, "Student sampling steps; timesteps evenly spaced from 999 (999, 749, 499, 249 for 4).")
    conditioning_timestep: int | None = option(
        None, "Timestep a 1-step student is told (default 399 for SDXL, 999 for SD, as the reference)."
    )
    student_timesteps: str | None = option(
        None,
        "The student's timesteps, decreasing indices in [0, 999], one a step (e.g. 999,666,333: --steps 3; over "
        "--conditioning-timestep); on a flow teacher each is a σ of its shifted table. Default: --steps of them "
        "evenly spaced from 999.",
    )
    prompts: str | None = option(None, "Prompts file: one a line, or JSON lines with prompt/text.")
    data: str | None = option(
        None,
        "Folder of captioned real images for the GAN term (.txt beside each, or metadata.jsonl); without it: no GAN.",
    )
    prompts_from_captions: bool = option(
        False,
        "With --data: the generator's, DM's and fake score's prompts are its captions, not --prompts (the "
        "reference's SDXL 4-step runs; on in the sdxl-4step recipes).",
    )
    resolution: int | None = option(None, "Training resolution in pixels (default: the teacher's).")
    embedded_guidance: float = option(
        3.5,
        "FLUX.1-dev and FLUX.2-dev (guidance-distilled): the guidance the teacher, generator and fake score are "
        "told (their recipes: 3.5 and 4); the real score takes no CFG (--guidance-scale 1).",
    )
    allow_pickle: bool = option(False, "Allow teacher weights stored as pickle (.bin/.ckpt) files.")

    def student_timestep_list(self) -> list[int] | None:
        """--student-timesteps as indices (None when not given); validate() says what is wrong with one."""
        if self.student_timesteps is None:
            return None
        return [int(part) for part in self.student_timesteps.replace(" ", "").split(",")]


@dataclass
class LoRA:
    """The generator as a low-rank adapter of the teacher, and where the fake score lives."""

    lora_rank: int = option(0, "Train the generator as a LoRA of this rank (reference: 64; 0: full fine-tune).")
    lora_alpha: float | None = option(
        None, "LoRA alpha of both adapters (default: the rank; the reference SDXL LoRA uses 8 with rank 64)."
    )
    shared_base: bool = option(
        True,
        "With LoRA: generator and fake score as two adapters on one frozen copy of the teacher (about one UNet in "
        "memory), or the reference layout with a full fp32 fake score.",
    )
    fake_lora_rank: int | None = option(
        None,
        "Rank of the fake score's adapter on the shared base (default: --lora-rank); its alpha is the generator's.",
    )

    def lora_alpha_value(self) -> float:
        """The alpha of the generator's and the fake score's adapters."""
        return self.lora_alpha or self.lora_rank

    def fake_adapter_rank(self) -> int:
        """The rank of the fake score's adapter on a shared base."""
        return self.fake_lora_rank or self.lora_rank


@dataclass
class Optimization:
    """Iterations, the two time-scale rule, AdamW and its schedule, precision and memory savers."""

    iterations: int = option(1000, "Training iterations.")
    batch_size: int = option(2, "Per-process batch of prompts (and of real images with --data).")
    gradient_accumulation_steps: int = option(
        1,
        "Micro-batches of --batch-size each process adds up before each update of the generator and the fake score "
        "alike: the batch of many GPUs on one, in as many times the time.",
    )
    global_batch: int | None = option(
        None,
        "The batch of each update over all processes and micro-batches: sets --gradient-accumulation-steps to it / "
        "(--batch-size × processes), e.g. 128 for the SDXL reference's 2 per GPU on 64 GPUs.",
    )
    fake_updates_per_gen: int = option(
        10, "Two time-scale rule: fake score updates per generator update; 10 SD1.5, 5 SDXL, 1 with --method dmd."
    )
    lr: float = option(1e-5, "Generator learning rate (reference: 5e-7 full, 5e-5 LoRA).")
    fake_lr: float | None = option(None, "Fake score and classifier learning rate (default: --lr).")
    warmup_steps: int = option(500, "Linear LR warm-up iterations.")
    lr_schedule: str = option(
        "constant",
        "After the warm-up: constant (the reference) | cosine | linear, which decay to 0 at the last iteration.",
    )
    weight_decay: float = option(0.01, "AdamW weight decay.", command_line=False)
    adam_beta1: float = option(0.9, "AdamW beta1.", command_line=False)
    adam_beta2: float = option(0.999, "AdamW beta2.", command_line=False)
    max_grad_norm: float = option(10.0, "Gradient clipping norm.")
    fused_optimizer: bool = option(
        True,
        "AdamW as one fused kernel over all weights (torch's fused=True; the same math, other float rounding), where "
        "torch has it for the weights' device; off: torch's default AdamW, as the reference.",
        command_line=False,
    )
    ema_decay: float = option(
        0.0,
        "EMA of the generator's weights, updated after each generator update (0: off, the reference). When on, "
        "student.safetensors (sample, eval, export) is the average; student-raw.safetensors the raw weights.",
    )
    mixed_precision: str = option(
        "auto",
        "bf16 | no | auto (bf16 on CUDA, fp32 on CPU). bf16 on a CPU runs the GPU's mixed-precision path (frozen "
        "weights in bf16, autocast); fast only on CPUs with bf16 instructions.",
    )
    gradient_checkpointing: bool = option(False, "Recompute activations in backward to save memory.")
    fsdp: bool = option(
        False,
        "Shard the generator, fake score and teacher across processes with PyTorch FSDP2 (full-weight runs under "
        "torchrun / accelerate launch).",
    )
    cache_prompts: bool = option(
        True,
        "Encode every prompt once at start-up and keep the conditionings on the CPU, so the text encoders leave the "
        "GPU (over 8 GiB of host memory: on disk, in $DMD_CACHE/prompts).",
    )
    seed: int = option(0, "Random seed.")
    skip_nonfinite: bool = option(
        False, "Skip and count updates with a non-finite loss or gradient instead of stopping."
    )

    def accumulation_steps(self, processes: int) -> int:
        """Micro-batches a process adds up per update: --gradient-accumulation-steps, or what
        --global-batch makes of the processes at hand."""
        from dmdcli.errors import UsageError

        if self.global_batch is None:
            return self.gradient_accumulation_steps
        per_micro_batch = self.batch_size * processes
        if self.global_batch % per_micro_batch:
            raise UsageError(
                f"--global-batch {self.global_batch} is not a multiple of --batch-size {self.batch_size} × "
                f"{processes} process(es) = {per_micro_batch}"
            )
        return self.global_batch // per_micro_batch

    def fake_lr_value(self) -> float:
        """The fake score's learning rate (the generator's unless --fake-lr)."""
        return self.fake_lr or self.lr

    def precision(self) -> str:
        """What mixed_precision resolves to on this machine: "bf16" or "no" (fp32)."""
        import torch

        if self.mixed_precision == "auto":
            return "bf16" if torch.cuda.is_available() else "no"
        return self.mixed_precision

    def frozen_dtype(self):
        """The dtype of the frozen weights (teacher, shared LoRA base; the prompt conditioning): bf16 under
        mixed precision, else fp32; trained weights stay fp32 either way."""
        import torch

        return torch.bfloat16 if self.precision() == "bf16" else torch.float32


@dataclass
class Regression:
    """DMD v1's regression term: the teacher's noise→image pairs, made once and cached (its weight λ,
    `regression_weight`, is the objective's)."""

    regression_iterations: int = option(0, "Regression only for the first K iterations, e.g. a warm-up (0: always).")
    regression_distance: str = option(
        "auto",
        "auto (LPIPS if the lpips package and its weights load, else pseudo_huber) | lpips | pseudo_huber | mse. "
        "The one that ran is in config.toml and metrics.jsonl.",
    )
    regression_decoder: str = option(
        "auto",
        "What LPIPS decodes latents with: auto (the family's tiny autoencoder, e.g. madebyollin/taesdxl, where it "
        "loads; else the teacher's VAE) | vae | a folder or hub id of an AutoencoderTiny.",
    )
    pairs: int = option(
        64, "Regression pairs: made on first use by the teacher's deterministic DDIM with CFG, cached and reused."
    )
    pair_steps: int = option(25, "DDIM steps of the teacher per regression pair.")
    pairs_dir: str | None = option(None, "Regression pair cache (default $DMD_CACHE/pairs, else ~/.cache/dmd/pairs).")


@dataclass
class Progressive:
    """Progressive Distillation (arXiv 2202.00512), `--method progressive`."""

    teacher_steps: int = option(
        64, "Progressive: DDIM steps of the first round's teacher, --steps × a power of two, halved each round."
    )
    iterations_per_round: int = option(1000, "Progressive: iterations of each halving round.")
    parameterization: str | None = option(
        None, "Progressive: the student predicts x, v or epsilon (default: the teacher's own)."
    )
    loss_weight: str = option(
        "truncated_snr", "Progressive: truncated_snr (max(SNR, 1)) | snr_plus_one (1 + SNR), on the x-space MSE."
    )


@dataclass
class Outputs:
    """The run folder: where it is, what starts it, and what it writes how often."""

    out: str | None = option(None, "Run folder (default runs/<teacher>-<steps>step).")
    init_from: str | None = option(
        None,
        "Start the generator, fake score and GAN head from another run (its newest checkpoint) or "
        "RUN/checkpoints/iter-N; optimizers and iterations start anew (second stages: sd15-1step after "
        "sd15-1step-stage1).",
    )
    checkpoint_every: int = option(
        500, "Checkpoint every N iterations (also at the end and on Ctrl-C/SIGTERM; 0: only then)."
    )
    keep_checkpoints: int = option(2, "Newest complete checkpoints kept.")
    log_every: int = option(10, "Write metrics every N iterations.")
    sample_every: int = option(250, "Write a sample grid every N iterations (0: at the end only).")
    grid_size: int = option(4, "Images per sample grid: grid-size/2 fixed prompts × 2 fixed seeds.")
    teacher_grid_steps: int = option(
        25, "DDIM steps of the teacher's reference grid (with CFG) for the collapse watch (0: off)."
    )


# The sections in the order `--help` and config.toml list them, each with its panel's title.
SECTIONS: dict[str, type] = {
    "Teacher and data": Distilled,
    "DMD2 objective": DMD2Config,
    "LoRA": LoRA,
    "Optimization": Optimization,
    "Regression pairs (--method dmd, --regression-weight)": Regression,
    "Progressive distillation (--method progressive)": Progressive,
    "Outputs": Outputs,  # the panel that every command lists its outputs in (cli/options.OUTPUTS)
}


# Bases listed last-section-first: a dataclass takes its bases' fields from the last base up.
@dataclass
class DistillConfig(Outputs, Progressive, Regression, Optimization, LoRA, DMD2Config, Distilled):
    """Every option of a run: the fields of the SECTIONS, flat."""

    def gan_term(self) -> bool:
        """Whether the run has a GAN term (a classifier head, and --data's images as real latents)."""
        return self.method != "dmd" and (self.gan_generator_weight > 0 or self.gan_discriminator_weight > 0)

    def regression_only(self) -> bool:
        """Whether the generator fits the teacher's pairs and nothing else (DMD2's SDXL 1-step
        pre-training stage): no fake score is trained, as nothing reads it."""
        gan = self.gan_term() and self.data is not None
        return self.dm_weight == 0 and not gan and self.regression_weight > 0 and not self.regression_iterations

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELD_NAMES = [f.name for f in fields(DistillConfig)]
_FIELDS = {f.name: f for f in fields(DistillConfig)}
SECTION_OF = {f.name: title for title, section in SECTIONS.items() for f in fields(section)}
COMMAND_LINE = [name for name in FIELD_NAMES if _FIELDS[name].metadata["command_line"]]


def section_names(section: type) -> tuple[str, ...]:
    """The option names of one section."""
    return tuple(f.name for f in fields(section))


def option_help(name: str) -> str:
    """The help of the option that sets field `name`: the field's help, and its default where
    that is a value (a default that follows another option is said in the help itself)."""
    f = _FIELDS[name]
    text = f.metadata["help"]
    return text if f.default is None else f"{text} (default {_default_words(f.default)})"


def _default_words(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return re.sub(r"e([+-])0*(\d)", lambda m: f"e{m[1].strip('+')}{m[2]}", f"{value:g}")  # 1e-05 → 1e-5
    return str(value)


def _field_types() -> dict[str, type]:
    """Each field's value type (str for `str | None`, ...), from the dataclass annotations."""
    import typing

    hints = typing.get_type_hints(DistillConfig)
    return {
        name: next(t for t in typing.get_args(hint) or (hint,) if t is not type(None)) for name, hint in hints.items()
    }


FIELD_TYPES = _field_types()


def write_config(config: DistillConfig, path: Path, extra: dict[str, Any] | None = None) -> None:
    """The resolved configuration as TOML (None values omitted: TOML has no null)."""
    values = {k: v for k, v in config.to_dict().items() if v is not None}
    if extra:
        values["resolved"] = {k: v for k, v in extra.items() if v is not None}
    text = tomli_w.dumps(values)
    atomic_write(path, lambda tmp: tmp.write_text(text))
