"""Seconds per DMD2 iteration and where they go, phase by phase (issue 25: every speed claim from here).

Builds a run exactly as `dmd distill` does (any teacher and recipe, any option), then times N
iterations of its loop: the data (prompt picks, noise, real latents) and each phase of the step
(backward simulation, the generator's forward with the real and fake scores inside it, backward,
optimizer steps, the fake score's update). Each phase is timed by wall clock with the GPU
synchronised at its edges, so the shares add up to the iteration; the synchronisation itself
costs a little on CUDA. Reports the median after `--warmup` iterations.

    python benchmarks/speed.py                                   # the shapes recipe, CPU
    python benchmarks/speed.py --teacher runs/tiny-teacher --recipe tiny --steps 4 --set batch_size=2
    python benchmarks/speed.py --teacher sd15 --recipe sd15-1step-stage1 --set resolution=512 --set batch_size=1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import torch

from dmdcli.train.distill import Distillation
from dmdcli.train.recipes import resolve_config
from dmdcli.train.ui import SilentUI


class PhaseClock:
    """Wall seconds per phase name, the GPU synchronised at each edge; nested phases (the real and
    fake scores inside the generator's forward) are also counted in their parent."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(phase):
                yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[phase] += time.perf_counter() - start


def timed(function, clock: PhaseClock, phase: str):
    """`function` with each call timed as `phase`."""

    def call(*args, **kwargs):
        with clock(phase):
            return function(*args, **kwargs)

    return call


# Timed inside "generator forward": the DM gradient's two passes (DMD2.real_x0, DMD2.fake_x0).
NESTED = ("real score (teacher, CFG)", "fake score (DM pass)")


def value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None, help="as dmd distill's (default: the recipe's)")
    parser.add_argument("--recipe", default="shapes")
    parser.add_argument("--prompts", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=20, help="timed iterations (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key, e.g. lr=1e-4")
    args = parser.parse_args()

    overrides = {k: value(v) for k, v in (item.split("=", 1) for item in args.set)}
    for key in ("teacher", "prompts", "steps"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    total = args.warmup + args.iterations
    with tempfile.TemporaryDirectory() as out:
        overrides.update(out=out, iterations=total, sample_every=0, teacher_grid_steps=0, checkpoint_every=0)
        config = resolve_config(args.recipe, overrides)
        run = Distillation(config, SilentUI())  # loads the teacher and data, builds the networks and the step
        cuda = run.accelerator.device.type == "cuda"
        clock = PhaseClock(cuda)
        step = run.step
        step.clock = clock
        dmd2 = step.dmd2
        dmd2.real_x0, dmd2.fake_x0 = (timed(f, clock, name) for f, name in zip((dmd2.real_x0, dmd2.fake_x0), NESTED))
        times, shares = [], defaultdict(list)
        for it in range(total):
            clock.seconds.clear()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            with clock("data"):
                batch = run.batch(it)
            step(batch, it)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            if it >= args.warmup:
                times.append(seconds)
                for phase, s in clock.seconds.items():
                    shares[phase].append(s / seconds)
    median = statistics.median(times)
    device = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"{config.teacher}, recipe {args.recipe}, {config.steps} step(s), batch {config.batch_size}"
        + (f" × {run.accumulation_steps} accumulated" if run.accumulation_steps > 1 else "")
        + ", "
        f"resolution {run.resolution}, TTUR {config.fake_updates_per_gen}, {config.precision()}, {device}"
    )
    mean = statistics.mean(times)  # with TTUR, every k-th iteration is a long one: the mean is the throughput
    print(
        f"\nseconds per iteration: median {median:.3f}, mean {mean:.3f} ({1 / mean:.2f} it/s) over {len(times)} "
        f"(min {min(times):.3f}, max {max(times):.3f})\n"
    )
    print("| phase | share of the iteration (mean) |")
    print("| --- | ---: |")
    share = {
        phase: sum(v) / len(times) for phase, v in shares.items()
    }  # phases of some iterations only count 0 elsewhere
    for phase in sorted((p for p in share if p not in NESTED), key=lambda p: -share[p]):
        print(f"| {phase} | {100 * share[phase]:.1f}% |")
        if phase == "generator forward":
            for inner in (p for p in NESTED if p in share):
                print(f"| … of which {inner} | {100 * share[inner]:.1f}% |")
    accounted = sum(sum(v) for p, v in shares.items() if p not in NESTED) / len(times)
    print(f"| (not in a phase: loss reads, LR schedules, Python) | {100 * (1 - accounted):.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
