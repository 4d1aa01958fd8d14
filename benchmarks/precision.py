"""How far bf16 moves the passes whose precision we chose differently from the reference (issue 23 item 4).

The reference runs the teacher (the real score) with bf16 weights and no autocast, and the
generator's no-grad passes (backward simulation, samples for fake-score-only iterations) in fp32;
`dmd distill` runs both under bf16 autocast (weights kept fp32 or bf16, matmuls and convolutions
in bf16, normalizations and softmax in fp32). This prints, on the built-in shapes teacher, the
relative RMS error against fp32 of

- the real score's CFG x0 at several t: ours (autocast) and the reference's (bf16 weights, no autocast);
- the 4-step generator's backward-simulated input x_t at k = 1, 2, 3 (the teacher standing in for the
  generator, as it is at the start of a run): ours (autocast) against the reference's fp32;
- the one-step sample a fake-score-only iteration trains on;
- the DM direction x0_real − x0_fake at the first iteration (the fake score is the teacher's fp32
  copy; the real score has CFG, the fake none): each layout's departure from the fp32 direction,
  divided by the RMS of x0.

    python benchmarks/precision.py            # CPU, under a minute
    python benchmarks/precision.py --batch 32 --cfg 4
"""

from __future__ import annotations

import argparse
import contextlib
import copy

import torch

from dmdcli.core.sampler import backward_simulation, generator_x0, guided_prediction
from dmdcli.core.schedule import as_timestep_tensor, student_timesteps
from dmdcli.models.families import get_family
from dmdcli.models.pipeline import load_teacher
from dmdcli.models.teacher import inspect_teacher
from dmdcli.shapes.world import caption, scenes


def relative_rms(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float((x.double() - reference.double()).pow(2).mean().sqrt() / reference.double().pow(2).mean().sqrt())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cfg", type=float, default=4.0, help="the real score's CFG (the shapes recipe's 4)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = inspect_teacher("shapes")
    family = get_family(spec.family)
    teacher = load_teacher(spec, device, torch.float32, spec.training_resolution(None))
    schedule = spec.schedule()
    fp32 = family.denoiser(teacher.network.to(device).eval(), schedule)
    bf16_weights = family.denoiser(copy.deepcopy(teacher.network).to(torch.bfloat16), schedule)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731

    prompts = [caption(s) for s in scenes(args.seed + 1, args.batch)]
    cond, uncond = teacher.encode_prompts(prompts), teacher.empty_cond()
    uncond = {k: v.expand(args.batch, *v.shape[1:]) for k, v in uncond.items()}
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, spec.latent_channels, *teacher.latent_size)
    noise = torch.randn(shape, generator=g).to(device)

    def real_x0(denoiser, x_t, t, context=contextlib.nullcontext, cast=None):
        c = {k: v.to(cast) for k, v in cond.items()} if cast else cond
        u = {k: v.to(cast) for k, v in uncond.items()} if cast else uncond
        with torch.no_grad(), context():
            x_in = x_t.to(cast) if cast else x_t
            prediction = guided_prediction(denoiser, x_in, as_timestep_tensor(t, args.batch, device), c, u, args.cfg)
        return schedule.to_x0(x_t, prediction.float(), as_timestep_tensor(t, args.batch, device))

    print(f"shapes teacher, batch {args.batch}, CFG {args.cfg}, {device}; relative RMS error against fp32\n")
    print("| pass | t or k | ours: bf16 autocast | reference: bf16 weights, no autocast | reference: fp32 |")
    print("| --- | --- | ---: | ---: | ---: |")
    with torch.no_grad():
        x0 = generator_x0(fp32, schedule, noise, as_timestep_tensor(999, args.batch, device), cond)
    for t in (980, 749, 499, 249, 20):
        x_t = schedule.add_noise(
            x0, torch.randn(shape, generator=g).to(device), as_timestep_tensor(t, args.batch, device)
        )
        exact = real_x0(fp32, x_t, t)
        ours = relative_rms(real_x0(bf16_weights, x_t, t, autocast), exact)  # the frozen teacher is bf16 too
        theirs = relative_rms(real_x0(bf16_weights, x_t, t, cast=torch.bfloat16), exact)
        print(f"| real score x0 (CFG) | t = {t} | {ours:.2e} | {theirs:.2e} | 0 |")

    # The first iteration's fake score is the teacher's fp32 copy. Ours: the real score's bf16 weights
    # and the fake score's fp32 ones, both under autocast; the reference's: the real score in bf16
    # without autocast, the fake score in fp32.
    for t in (980, 499, 20):
        x_t = schedule.add_noise(
            x0, torch.randn(shape, generator=g).to(device), as_timestep_tensor(t, args.batch, device)
        )
        tt = as_timestep_tensor(t, args.batch, device)
        with torch.no_grad():
            with autocast():
                ours_real = real_x0(bf16_weights, x_t, t, autocast)
                ours_fake = schedule.to_x0(x_t, fp32(x_t, tt, cond).float(), tt)
            theirs_real = real_x0(bf16_weights, x_t, t, cast=torch.bfloat16)
            theirs_fake = schedule.to_x0(x_t, fp32(x_t, tt, cond), tt)
            exact = real_x0(fp32, x_t, t) - schedule.to_x0(x_t, fp32(x_t, tt, cond), tt)
        scale = float(x0.double().pow(2).mean().sqrt())
        ours = float((ours_real - ours_fake - exact).double().pow(2).mean().sqrt()) / scale
        theirs = float((theirs_real - theirs_fake - exact).double().pow(2).mean().sqrt()) / scale
        print(
            f"| DM direction x0_real − x0_fake, first iteration (÷ RMS x0) | t = {t} | {ours:.2e} | {theirs:.2e} | 0 |"
        )

    timesteps = student_timesteps(4, schedule.num_train_timesteps)
    for k in (1, 2, 3):
        with torch.no_grad():  # the re-noising draws from the global stream: the same draws for both
            torch.manual_seed(args.seed)
            exact = backward_simulation(fp32, schedule, noise, cond, timesteps, k)
            torch.manual_seed(args.seed)
            with autocast():
                ours = backward_simulation(fp32, schedule, noise, cond, timesteps, k)
        print(f"| generator's backward simulation x_t | k = {k} | {relative_rms(ours, exact):.2e} | | 0 |")
    with torch.no_grad():
        t0 = as_timestep_tensor(timesteps[0], args.batch, device)
        exact = generator_x0(fp32, schedule, noise, t0, cond)
        with autocast():
            ours = generator_x0(fp32, schedule, noise, t0, cond)
    print(f"| generator's sample, fake-score-only iteration | k = 0 | {relative_rms(ours, exact):.2e} | | 0 |")


if __name__ == "__main__":
    main()
