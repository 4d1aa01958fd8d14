"""Peak-memory estimate of a distillation run, from config files alone (`dmd distill --dry-run`).

Every network is built on the meta device (shapes, no storage), so nothing is downloaded beyond
config files and nothing heavy is allocated. Activations are measured, not guessed: one training
forward of each network, as it trains (adapter or full weights), runs on meta tensors under a
saved-tensors hook that adds up what autograd keeps for backward, with autocast's dtypes and a
fused attention kernel's saves; with gradient checkpointing, the checkpointed units' inputs plus
the largest unit recomputed during backward (dmdcli.train.activations).

The peak is that of the heaviest phase of an iteration:
  generator phase: generator forward with grad (A) + the GAN loss through the fake score's down
                   and mid blocks (A_down), and the generator's gradients;
  fake score phase: fake score forward with grad (A) + two classifier passes (2·A_down), and
                   the fake score's (and head's) gradients;
  either network's AdamW step: its gradients, and on CUDA one fp32 temporary of its size;
on top of what persists: weights of all networks, AdamW moments (2 × fp32), the VAE, and the text
encoders unless the prompts are cached (`cache_prompts`, the default): then the encoders are on the
accelerator only at start-up, before the networks are built (the teacher's network is read after
the prompts are cached), and are listed apart, outside the peak, with the start-up peak they make
beside the VAE (and the teacher's network, which DMD's regression pairs need while the encoders are
still there).

Sharded over N processes (`--fsdp`), each process keeps 1/N of the networks' weights, moments and
gradients, and gathers whole units while they run: a UNet's root unit (everything outside its
ResNet and transformer blocks) for the whole forward, two blocks at a time (one computing, one
prefetched), in bf16 under mixed precision; plus one unit's unsharded gradients in backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dmdcli.data.prompt_cache import GIB
from dmdcli.models.families import get_family
from dmdcli.models.teacher import TeacherSpec, _load_json_config
from dmdcli.train.activations import meta_inputs, meta_network, saved_activations, training_network


@dataclass
class MemoryEstimate:
    parameters: dict[str, float]  # GiB of weights per network
    optimizer_states: float
    gradients: float
    activations_per_sample: float
    activations: float
    peak: float
    phase: str  # which phase sets the peak
    startup_only: dict[str, float] = field(default_factory=dict)  # GiB freed before training (not in the peak)
    startup_peak: float = 0.0  # GiB on the device while prompts are encoded (cached prompts only)
    processes: int = 1  # the networks are sharded over this many processes (FSDP)
    gathered: float = 0.0  # FSDP: whole units gathered while they run (in the peak phase)
    optimizer_step: float = 0.0  # AdamW's temporaries (in the peak phase)

    def rows(self) -> list[tuple[str, float]]:
        return [
            *((f"weights: {name}", gib) for name, gib in self.parameters.items()),
            *((f"start-up only: {name}", gib) for name, gib in self.startup_only.items()),
            *((("start-up peak (while the prompts are encoded)", self.startup_peak),) if self.startup_only else ()),
            ("AdamW moments (fp32)", self.optimizer_states),
            ("gradients (peak phase)", self.gradients),
            ("activations per sample", self.activations_per_sample),
            ("activations (batch, peak phase)", self.activations),
            ("AdamW step temporaries (fp32, peak phase)", self.optimizer_step),
            *((("gathered units (FSDP)", self.gathered),) if self.processes > 1 else ()),
            (f"estimated peak ({self.phase} phase)", self.peak),
        ]


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def _count(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _text_and_vae_parameters(spec: TeacherSpec) -> tuple[int, int]:
    """Parameter counts of the pipeline's text encoders (each of the classes model_index.json
    names: CLIP, T5, ...) and of its VAE."""
    import diffusers
    import transformers

    vae_class = getattr(diffusers, get_family(spec.family).teacher.vae_class)
    index = _load_json_config(spec.source, None, "model_index.json")
    folders = sorted(k for k, v in index.items() if k.startswith("text_encoder") and isinstance(v, list) and v[0])
    with torch.device("meta"):
        text = 0
        for folder in folders:
            encoder_class = getattr(transformers, index[folder][1])
            config = encoder_class.config_class.from_dict(_load_json_config(spec.source, folder, "config.json"))
            text += _count(encoder_class(config))
        vae = _count(vae_class.from_config(_load_json_config(spec.source, "vae", "config.json")))
    return text, vae


def estimate_memory(
    spec: TeacherSpec, config, resolution: int, bf16: bool, processes: int = 1, device_type: str = "cuda"
) -> MemoryEstimate:
    """Estimated peak memory of `dmd distill` with this configuration, per process (GiB), with
    the networks sharded over `processes` when config.fsdp. `device_type` is the machine whose
    autocast rules and AdamW implementation the run gets: "cuda", or "cpu" for a CPU run (in the
    GPU's precision layout when `bf16`)."""
    from dmdcli.core.gan_head import ClassifierHead
    from dmdcli.train.layouts import layout_for
    from dmdcli.train.sharding import ShardingOptions

    frozen = 2 if bf16 else 4  # frozen weights in bf16 under mixed precision
    frozen_dtype = torch.bfloat16 if bf16 else torch.float32
    unet = meta_network(spec)
    p_unet = _count(unet)
    p_text, p_vae = _text_and_vae_parameters(spec)

    family = get_family(spec.family)
    options = family.denoiser_kwargs(config)
    sharding = ShardingOptions() if config.fsdp and processes > 1 else None
    layout = layout_for(config, family.lora_targets, sharding, processes)
    adapters = layout.adapters()
    nets = {
        name: training_network(spec, frozen_dtype, adapter, layout.lora_targets) for name, adapter in adapters.items()
    }
    p_gen, p_fake = (_count(nets[name], trainable_only=True) for name in adapters)
    p_head = 0
    if config.data and config.gan_term():  # the head a run builds on the bottleneck's features (their shape, on meta)
        x, cond = meta_inputs(unet, spec, resolution, torch.float32)
        t = torch.zeros(1, dtype=torch.long, device="meta")
        features = family.denoiser(unet, spec.schedule(resolution), **options).bottleneck(x, t, cond)
        with torch.device("meta"):
            p_head = _count(ClassifierHead.for_features(features))

    n = layout.shards
    weights = {**layout.weight_rows(p_unet, p_gen, p_fake, p_head, frozen), "VAE (fp32)": p_vae * 4}
    if config.ema_decay:  # an fp32 average of the generator's trained weights
        weights["generator EMA (fp32)"] = 4 * p_gen / n
    encoder_dtype = family.teacher.training_encoder_dtype
    precision, text_bytes = _DTYPE_NAMES[encoder_dtype], p_text * encoder_dtype.itemsize
    if not config.cache_prompts:  # else they leave the accelerator before the networks are built
        weights[f"text encoders ({precision})"] = text_bytes
    regression_only = config.regression_only()  # the fake score is built but never stepped: no moments
    adam = 8 * (p_gen + (0 if regression_only else p_fake + p_head)) / n
    transient = layout.gathered_bytes(unet, frozen)
    cast_gen, cast_fake = layout.autocast_copies(p_gen, bf16), layout.autocast_copies(p_fake, bf16)
    saved = {}  # per layout: the generator's and the fake score's are one measurement when alike
    for name, adapter in adapters.items():
        key = adapter[:2] if adapter else None
        if key not in saved:
            saved[key] = saved_activations(
                nets[name],
                spec,
                resolution,
                torch.bfloat16 if bf16 else None,
                device_type,
                config.gradient_checkpointing,
                options,
            )
    (act_gen, _), (act_fake, act_down) = (saved[a[:2] if a else None] for a in adapters.values())
    b = config.batch_size
    # On CUDA AdamW runs its foreach implementation, which holds one fp32 temporary as large as the
    # weights it updates (the square root of the second moments) while their gradients are alive.
    foreach = 4 if device_type == "cuda" else 0
    g_gen, g_fake = 4 * p_gen / n, 4 * (p_fake + p_head) / n
    phases = {  # name: (gradients, activations and autocast's weight casts, optimizer temporaries, gathered units)
        "generator": (g_gen, b * (act_gen + act_down) + cast_gen, 0, transient),
        "fake score": (g_fake, b * (act_fake + 2 * act_down) + cast_fake, 0, transient),
        "generator's AdamW step": (g_gen, 0, foreach * p_gen / n, 0),
        "fake score's AdamW step": (g_fake, 0, foreach * (p_fake + p_head) / n, 0),
    }
    if regression_only:  # the generator's forward on the pairs, nothing through the fake score
        phases = {
            "generator": (g_gen, b * act_gen + cast_gen, 0, transient),
            "generator's AdamW step": phases["generator's AdamW step"],
        }
    pairs_network = p_unet * (frozen if layout.frozen_network else 4)  # the teacher making regression pairs
    phase = max(phases, key=lambda k: sum(phases[k]))
    grads, activations, step, gathered = phases[phase]
    static = sum(weights.values()) + adam
    return MemoryEstimate(
        parameters={k: v / GIB for k, v in weights.items()},
        optimizer_states=adam / GIB,
        gradients=grads / GIB,
        activations_per_sample=max(act_gen, act_fake) / GIB,
        activations=activations / GIB,
        optimizer_step=step / GIB,
        peak=(static + sum(phases[phase])) / GIB,
        phase=phase,
        startup_only={f"text encoders ({precision}, dropped once prompts are cached)": text_bytes / GIB}
        if config.cache_prompts
        else {},
        startup_peak=(text_bytes + p_vae * 4 + (pairs_network if config.regression_weight > 0 else 0)) / GIB
        if config.cache_prompts
        else 0.0,
        processes=n,
        gathered=gathered / GIB,
    )


FSDP_PROCESS_COUNTS = (2, 4, 8)  # sharded, memory per process depends on how many there are


@dataclass
class MemoryPlan:
    """What `--dry-run` shows: the estimate per process count (1, or each of FSDP_PROCESS_COUNTS
    when sharded), and the notes that say what it stands for."""

    spec: TeacherSpec
    resolution: int
    bf16: bool
    estimates: dict[int, MemoryEstimate]
    notes: list[str]

    def summary(self, config) -> dict:
        """The JSON form (`--dry-run --json`)."""
        import dataclasses

        counts = list(self.estimates)
        summary = {
            "config": config.to_dict(),
            "resolution": self.resolution,
            "memory_gib": dataclasses.asdict(self.estimates[counts[0]]),
        }
        if config.fsdp:
            summary["memory_gib_by_processes"] = {str(n): dataclasses.asdict(e) for n, e in self.estimates.items()}
        return summary


def _notes(config, bf16: bool) -> list[str]:
    notes = []
    if config.mixed_precision == "auto" and not bf16:
        notes.append(
            "note: no CUDA here, so this is a run on this machine, in fp32; --mixed-precision bf16 estimates a "
            "GPU run (bf16, what auto picks on CUDA)"
        )
    if config.method == "progressive":
        notes.append(
            "note: this estimate is for DMD2's three networks; --method progressive holds two UNets (teacher and "
            "student) and one optimizer, so it needs less"
        )
    if config.regression_only() and config.regression_distance in ("auto", "lpips"):
        notes.append(
            "note: regression only; the activations of LPIPS's decoder and VGG network (not measured) are not in "
            "this estimate"
        )
    return notes


def plan_memory(config, scratch, note) -> MemoryPlan:
    """The `--dry-run` estimate, from config files alone. Offline, SD1.5's and SDXL's public
    configs, which ship with dmd, stand in for a hub teacher's (written into `scratch`; `note`
    says so at once)."""
    from dmdcli.errors import DmdError
    from dmdcli.models.config_only import bundled_architecture, write_config_only_pipeline
    from dmdcli.models.teacher import inspect_teacher
    from dmdcli.train.validation import check_teacher_options

    try:
        spec = inspect_teacher(config.teacher)
    except DmdError:
        arch = bundled_architecture(config.teacher)
        if arch is None:
            raise
        spec = inspect_teacher(str(write_config_only_pipeline(scratch, arch)))
        note(
            f"note: could not read the config files of {config.teacher} (offline?); estimating with the public "
            f"{arch} architecture, whose configs ship with dmd"
        )
    check_teacher_options(config, spec, get_family(spec.family))
    resolution = spec.training_resolution(config.resolution)
    bf16 = config.precision() == "bf16"
    # bf16 is CUDA's layout, also when a CPU is asked for it (--mixed-precision bf16 to estimate a GPU run).
    device_type = "cuda" if bf16 or torch.cuda.is_available() else "cpu"
    counts = FSDP_PROCESS_COUNTS if config.fsdp else (1,)
    estimates = {n: estimate_memory(spec, config, resolution, bf16, n, device_type) for n in counts}
    return MemoryPlan(spec, resolution, bf16, estimates, _notes(config, bf16))


def device_memory(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of a CUDA device; None elsewhere (a CPU run has no budget to check)."""
    return torch.cuda.mem_get_info(device) if device.type == "cuda" else None


def over_memory_note(spec: TeacherSpec, config, resolution: int, device: torch.device, processes: int) -> str | None:
    """A note when the `--dry-run` estimate of this run's peak is more than its GPU has free, said
    before minutes of loading rather than at the first out-of-memory error; None when it fits."""
    memory = device_memory(device)
    if memory is None:
        return None
    free, total = memory
    estimate = estimate_memory(spec, config, resolution, config.precision() == "bf16", processes, device.type)
    if max(estimate.peak, estimate.startup_peak) * GIB <= free:
        return None
    if estimate.startup_peak > estimate.peak:  # the prompts' encoding, before any training lever applies
        return (
            f"note: while the prompts are encoded, the text encoders and the VAE take an estimated "
            f"{estimate.startup_peak:.1f} GiB, more than the {free / GIB:.1f} GiB free on this GPU (of "
            f"{total / GIB:.1f}; --dry-run for the table)"
        )
    levers = [
        *([] if config.gradient_checkpointing else ["--gradient-checkpointing"]),
        *([] if config.lora_rank or config.fsdp else ["--lora-rank 64"]),
        *(["--shared-base"] if config.lora_rank and not config.shared_base else []),
        *(["a lower --lora-rank"] if config.lora_rank > 16 else []),  # FLUX.2 [dev] at 1024²: 64 → 16 saves 8 GiB
        *([_smaller_batch(config, processes)] if config.batch_size > 1 else []),
    ]
    return (
        f"note: the estimated peak, {estimate.peak:.1f} GiB per GPU ({estimate.phase} phase; --dry-run for the table), "
        f"is more than the {free / GIB:.1f} GiB free on this GPU (of {total / GIB:.1f})"
        + (f": {', '.join(levers)} would lower it" if levers else "")
    )


def _smaller_batch(config, processes: int) -> str:
    """The batch lever: micro-batches of 1 that gradient accumulation adds up to the same update."""
    if config.global_batch:
        return f"--batch-size 1 (--global-batch {config.global_batch} accumulates it to the same update)"
    per_update = config.batch_size * config.accumulation_steps(processes)
    return f"--batch-size 1 --gradient-accumulation-steps {per_update} (the same batch an update)"
