"""Seconds per iteration and peak memory of DMD2 on the full-size SD1.5, SDXL, SD3.5, FLUX.1-dev and Qwen-Image
architectures.

The networks (UNets, transformers) are built from their public configs with random weights (no download), the text
conditioning is random, and a few real DMD2 iterations run through the same code as
`dmd distill` (dmdcli.train.networks). Each row also shows the `--dry-run` estimate for the same
configuration, without the text encoders and VAE (which this benchmark does not load).

    python benchmarks/memory_speed.py                       # CPU: SD1.5 shared-base LoRA at 256²
    python benchmarks/memory_speed.py --mixed-precision bf16  # the same in the GPU's precision layout
    python benchmarks/memory_speed.py --arch sdxl --resolution 1024 --layouts full lora-reference lora-shared
    python benchmarks/memory_speed.py --arch flux-dev --resolution 1024 --layouts lora-shared  # 12B: GPU
    # where the time goes:
    python benchmarks/memory_speed.py --arch sdxl --resolution 1024 --layouts full lora-shared --profile 25
    torchrun --nproc_per_node 8 benchmarks/memory_speed.py --arch sdxl --resolution 1024 --layouts fsdp

The fsdp layout (full weights sharded with FSDP2 over the launched processes, as `dmd distill
--fsdp`) reports the largest peak among the processes, beside the per-process estimate.

Peak memory is torch.cuda.max_memory_allocated on CUDA, and the growth of the process's peak
resident set on CPU (coarser: it includes allocator slack and the CPU kernels' scratch memory;
freed tensors are returned to the system at once, see return_freed_memory_to_the_system).
"weights" is the memory the networks hold once built, before the first step (AdamW's moments
come at the first step), beside the estimate's weights.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator

import torch

os.environ.setdefault(
    "DIFFUSERS_VERBOSITY", "error"
)  # as the CLI: not the warning that every .to(bf16) of a UNet prints

from dmdcli.core.schedule import student_timesteps
from dmdcli.models.architectures import ARCHITECTURES
from dmdcli.models.config_only import write_config_only_pipeline
from dmdcli.models.families import get_family
from dmdcli.models.teacher import inspect_teacher
from dmdcli.train.config import DistillConfig
from dmdcli.train.layouts import layout_for
from dmdcli.train.memory import GIB, estimate_memory
from dmdcli.train.networks import build_step
from dmdcli.train.sharding import sharding_options
from dmdcli.train.step import Batch

LAYOUTS = {
    "full": dict(lora_rank=0),
    "lora-reference": dict(lora_rank=64, lora_alpha=8, shared_base=False),
    "lora-shared": dict(lora_rank=64, lora_alpha=8, shared_base=True),
    "fsdp": dict(lora_rank=0, fsdp=True),
}


def rss_gib() -> float:
    """The process's peak resident set so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # ru_maxrss is KiB on Linux


def resident_gib() -> float:
    """The process's resident set now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / GIB


def return_freed_memory_to_the_system() -> None:
    """Make host memory track what tensors hold. glibc serves allocations under its mmap threshold
    from heaps it seldom gives back, and raises that threshold (up to 32 MiB) each time a larger
    block is freed, so a UNet's activations come to live in heaps and the resident set keeps their
    high-water mark plus fragmentation. A fixed threshold of 128 KiB maps every tensor of note on
    its own and unmaps it when freed."""
    import ctypes

    M_MMAP_THRESHOLD = -3
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except OSError:  # not glibc: the resident set stays a coarser upper bound
        pass


@contextlib.contextmanager
def profiled(rows: int, title: str, cuda: bool) -> Iterator[None]:
    """With rows > 0: torch.profiler over the block, then its `rows` costliest operators by time on
    the host (Python and kernel launches) and on the GPU, and the count of kernels launched. Where
    the GPU waits for the host (many small kernels), host time exceeds GPU time. The timed
    iteration is then slower by the profiler's own overhead: profile the last one only."""
    if rows <= 0:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        yield
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA) if cuda else 0
    print(f"\n### profile: {title} (one iteration; {kernels} CUDA kernels)\n", file=sys.stderr)
    for key in ["self_cpu_time_total"] + (["self_device_time_total"] if cuda else []):
        print(events.table(sort_by=key, row_limit=rows), file=sys.stderr)


def measure(arch: str, layout: str, args, spec) -> dict:
    import diffusers
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    family = get_family(spec.family)
    cfg = family.classifier_free_guidance  # FLUX.1-dev's real score takes its embedded guidance instead
    config = DistillConfig(
        teacher=arch,
        steps=args.steps,
        batch_size=args.batch_size,
        gradient_checkpointing=not args.no_checkpointing,
        fake_updates_per_gen=1,
        data="random",
        warmup_steps=1,
        guidance_scale=8.0 if cfg else 1.0,
        gan_generator_weight=5e-3,  # the SDXL reference's GAN (diffusion GAN: the default)
        gan_discriminator_weight=1e-2,
        mixed_precision=args.mixed_precision,
        fused_optimizer=not args.loop_optimizer,
        **LAYOUTS[layout],
    )
    bf16 = config.precision() == "bf16"
    accelerator = Accelerator(mixed_precision=config.precision(), cpu=not cuda)
    device = accelerator.device
    if config.fsdp and accelerator.num_processes < 2:
        sys.exit("the fsdp layout shards over processes: launch with torchrun --nproc_per_node N (N ≥ 2)")
    estimate = estimate_memory(
        spec, config, args.resolution, bf16, processes=accelerator.num_processes, device_type="cuda" if cuda else "cpu"
    )
    not_loaded = (
        estimate.parameters.get("text encoders", 0.0) + estimate.parameters["VAE (fp32)"]
    )  # absent with cached prompts

    torch.manual_seed(0)
    frozen = config.frozen_dtype()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_before, resident_before = rss_gib(), resident_gib()
    # On the CPU the network is built in its frozen dtype, so that a whole fp32 copy does not set the
    # peak before training starts (dmd distill loads it in host memory, not on the GPU).
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32 if cuda else frozen)
    try:
        network_class = getattr(diffusers, family.teacher.network_class)
        base = network_class.from_config(ARCHITECTURES[arch][family.network])
    finally:
        torch.set_default_dtype(default_dtype)
    side = args.resolution // spec.vae_scale_factor
    shapes = family.teacher.conditioning_shapes(base.config, spec)
    cond = {k: torch.randn(args.batch_size, *shape, device=device) for k, shape in shapes.items()}
    if "time_ids" in cond:  # SDXL's micro-conditioning, as dmd distill sets it
        r = float(args.resolution)
        cond["time_ids"] = torch.tensor([[r, r, 0, 0, r, r]], device=device).expand(args.batch_size, 6)
    uncond = {k: torch.zeros_like(v) for k, v in cond.items()} if cfg else None
    # A text mask (Qwen-Image): the prompts fill every position (the longest they can be), the
    # negative prompt 8 of them, so CFG's batch runs masked attention, as in training.
    for c, tokens in ((cond, None), (uncond or {}, 8)):
        for k in [k for k in c if k.endswith("_mask")]:
            c[k] = torch.ones_like(c[k])
            if tokens:
                c[k][:, tokens:] = 0
    latent = (args.batch_size, spec.latent_channels, side, side)
    schedule = spec.schedule(args.resolution)
    options = family.denoiser_kwargs(config)
    denoiser = lambda network: family.denoiser(network, schedule, **options)  # noqa: E731
    probe = (
        lambda fake, on: denoiser(fake).bottleneck(
            torch.zeros(1, *latent[1:], device=on),
            torch.zeros(1, dtype=torch.long, device=on),  # noqa: E731
            {k: v[:1].to(on) for k, v in cond.items()},
        )
    )
    sharding = sharding_options(accelerator, accelerator.mixed_precision) if config.fsdp else None
    runtime = layout_for(config, family.lora_targets, sharding, accelerator.num_processes)
    nets = runtime.build(base, device, frozen, probe)
    weights = torch.cuda.memory_allocated() / GIB if cuda else resident_gib() - resident_before
    timesteps = student_timesteps(args.steps, schedule.num_train_timesteps, family.conditioning_timestep)
    step = build_step(nets, denoiser, runtime.data_parallel(accelerator), schedule, config, timesteps, accelerator)

    times = []
    for it in range(args.iterations):
        batch = Batch(
            noise=torch.randn(latent, device=device),
            cond=cond,
            uncond=uncond,
            x_real=torch.randn(latent, device=device),
            real_cond=cond,
        )
        last = it == args.iterations - 1
        with profiled(args.profile if last else 0, f"{arch} {layout}", cuda):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(batch, it)  # fake_updates_per_gen = 1: every iteration updates both networks
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / GIB if cuda else rss_gib() - rss_before
    if accelerator.num_processes > 1:  # the largest process's
        peak = float(accelerator.reduce(torch.tensor([peak], device=device), "max"))
    result = {
        "arch": arch,
        "layout": layout + (f" ×{accelerator.num_processes}" if config.fsdp else ""),
        "resolution": args.resolution,
        "batch": args.batch_size,
        "device": f"{torch.cuda.get_device_name() if cuda else 'cpu'} ({'bf16' if bf16 else 'fp32'})",
        "sec_per_iter": min(times[1:] or times),
        "peak_gib": peak,
        "estimate_gib": estimate.peak - not_loaded,
        "weights_gib": weights,
        "weights_estimate_gib": sum(estimate.parameters.values()) - not_loaded,
    }
    del nets, step, base
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result, accelerator.is_main_process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="sd15")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=["lora-shared"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument(
        "--loop-optimizer", action="store_true", help="torch's default AdamW (the reference's) instead of the fused one"
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="ROWS",
        help="profile the last iteration: its ROWS costliest operators on the host and the GPU (stderr); "
        "the row's peak then includes the profiler's own memory (on the CPU, about 0.8 GiB)",
    )
    parser.add_argument(
        "--mixed-precision",
        choices=["auto", "bf16", "no"],
        default="auto",
        help="auto: bf16 on CUDA, fp32 on CPU; bf16 on a CPU measures the GPU's layout (bf16 frozen weights, "
        "autocast) in host memory",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        return_freed_memory_to_the_system()
    with tempfile.TemporaryDirectory() as folder:
        spec = inspect_teacher(str(write_config_only_pipeline(folder, args.arch)))
        header = [
            "| arch | layout | resolution | batch | device | s/iter | weights GiB (estimate) | peak GiB | dry-run "
            "estimate GiB | estimate / peak |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for layout in args.layouts:
            r, main_process = measure(args.arch, layout, args, spec)
            if not main_process:
                continue
            for line in header:
                print(line)
            header = []
            print(
                f"| {r['arch']} | {r['layout']} | {r['resolution']} | {r['batch']} | {r['device']} | "
                f"{r['sec_per_iter']:.2f} | "
                f"{r['weights_gib']:.2f} ({r['weights_estimate_gib']:.2f}) | {r['peak_gib']:.2f} | "
                f"{r['estimate_gib']:.2f} | {r['estimate_gib'] / r['peak_gib']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
