"""One DMD2 training iteration: generator update on every `fake_updates_per_gen`-th iteration
(the two time-scale rule), fake score + classifier head update on every iteration; each update
adds up the gradients of the batch's micro-batches (gradient accumulation).

Model-agnostic: it sees denoisers, conditionings and optimizers, never a UNet or a file.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from dmdcli.core.denoiser import Cond, Denoiser
from dmdcli.core.dmd2 import DMD2
from dmdcli.core.sampler import backward_simulation, generator_x0
from dmdcli.core.schedule import as_timestep_tensor
from dmdcli.errors import DmdError


@contextlib.contextmanager
def frozen(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Temporarily stop gradients into `params` (the fake score during the generator update).

    The generator's GAN loss backpropagates *through* the fake score to the generator; the fake
    score must not collect those gradients, and not storing them saves memory.
    """
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def untimed(phase: str) -> contextlib.AbstractContextManager:
    """DMD2Step's default clock: phases are not timed (benchmarks/speed.py times them)."""
    return contextlib.nullcontext()


def simulation_step(seed: int, iteration: int, num_steps: int) -> int:
    """The backward-simulation step index for an iteration.

    Drawn from (seed, iteration) alone, so every process picks the same index without
    communicating, and a resumed run picks the same indices as an uninterrupted one.
    """
    if num_steps == 1:
        return 0
    g = torch.Generator().manual_seed(seed * 1_000_003 + iteration)
    return int(torch.randint(0, num_steps, (1,), generator=g))


@dataclass
class Batch:
    """What one iteration consumes. Tensors are on the training device.

    noise [B, ...]: the generator's initial noise; cond / uncond: prompt and empty-prompt
    conditionings for the generator and the real score; x_real [B', ...] and real_cond: real
    latents and their captions' conditioning for the GAN (None without real data);
    pair_noise / pair_latent / pair_cond: regression pairs (DMD v1), None without.
    """

    noise: Tensor
    cond: Cond
    uncond: Cond | None = None
    x_real: Tensor | None = None
    real_cond: Cond | None = None
    # DMD v1's regression pairs (None without): teacher noise [B, ...], its DDIM latent, its prompt.
    pair_noise: Tensor | None = None
    pair_latent: Tensor | None = None
    pair_cond: Cond | None = None

    def to(self, device: torch.device) -> Batch:
        """The batch with every tensor on `device` (those already there as they are)."""

        def moved(value):
            if isinstance(value, dict):
                return {k: v.to(device) for k, v in value.items()}
            return value if value is None else value.to(device)

        return Batch(**{f.name: moved(getattr(self, f.name)) for f in fields(self)})

    def split(self, n: int) -> list[Batch]:
        """The batch as n micro-batches of equal size (gradient accumulation), each field cut along dim 0."""
        if n == 1:
            return [self]

        def chunks(value):
            if value is None:
                return [None] * n
            if isinstance(value, dict):
                split = {k: chunks(v) for k, v in value.items()}
                return [{k: parts[i] for k, parts in split.items()} for i in range(n)]
            if value.shape[0] % n:
                raise ValueError(f"a batch of {value.shape[0]} does not split into {n} micro-batches")
            return list(value.chunk(n))

        parts = {f.name: chunks(getattr(self, f.name)) for f in fields(self)}
        return [Batch(**{name: chunk[i] for name, chunk in parts.items()}) for i in range(n)]


class GeneratorPhase(nn.Module):
    """The generator update's forward, x0 = G(x_t, t) and its DMD2 loss terms, as ONE module call.

    A data-parallel wrapper (DDP) around this module sees one forward per backward; the real and
    fake scores it calls through `dmd2` are not its parameters (they are frozen in this phase).
    """

    def __init__(self, dmd2: DMD2, generator: nn.Module, regression_distance=None, first_timestep: int = 999):
        super().__init__()
        self.generator = generator
        self.dmd2 = dmd2
        self.regression_distance, self.first_timestep = regression_distance, first_timestep

    def forward(
        self, x_t: Tensor | None, t: Tensor | None, cond: Cond, uncond: Cond | None, pair: tuple | None = None
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """x_t None: the pair's regression term alone (a regression-only stage), x None."""
        x, terms = None, {}
        if x_t is not None:
            x = generator_x0(self.generator, self.dmd2.schedule, x_t, t, cond)
            terms = self.dmd2.generator_losses(x, cond, uncond)
        if pair is not None:
            # The pair's noise through the generator's FIRST step (the whole student for 1 step;
            # for N steps, its x0 estimate from pure noise at t_0), compared with the teacher's latent.
            noise, latent, pair_cond = pair
            t0 = as_timestep_tensor(self.first_timestep, noise.shape[0], noise.device)
            x_pair = generator_x0(self.generator, self.dmd2.schedule, noise, t0, pair_cond)
            terms["regression"] = self.dmd2.regression_loss(x_pair, latent, self.regression_distance)
        return x, terms


class FakeScorePhase(nn.Module):
    """The fake score update's forward (denoising + discriminator terms) as ONE module call over
    the fake score and the classifier head, for the same reason."""

    def __init__(self, dmd2: DMD2):
        super().__init__()
        self.fake_score, self.discriminator = dmd2.fake_score, dmd2.discriminator
        self.dmd2 = dmd2

    def forward(self, x_fake: Tensor, cond: Cond, x_real: Tensor | None, real_cond: Cond | None) -> dict[str, Tensor]:
        return self.dmd2.fake_score_losses(x_fake, cond, x_real, real_cond)


class DMD2Step:
    """Owns the optimizers and the update schedule of one DMD2 run."""

    def __init__(
        self,
        dmd2: DMD2,
        generator: Denoiser,
        timesteps: Sequence[int],
        generator_params: list[nn.Parameter],
        fake_params: list[nn.Parameter],
        generator_optimizer: torch.optim.Optimizer,
        fake_optimizer: torch.optim.Optimizer,
        *,
        generator_lr_scheduler=None,
        fake_lr_scheduler=None,
        fake_updates_per_gen: int,
        max_grad_norm: float = 10.0,
        seed: int = 0,
        skip_nonfinite: bool = False,
        backward=None,
        autocast=contextlib.nullcontext,
        wrap=None,
        any_process=None,
        regression_distance=None,
        regression_iterations: int = 0,
        regression_only: bool = False,
        ema=None,
        accumulation_steps: int = 1,
    ):
        """`wrap` wraps each phase module for data parallelism (accelerate's prepare_model).
        `regression_distance` (x, y) → scalar enables DMD v1's regression term on batches that carry
        pairs, for the first `regression_iterations` iterations (0: always). `regression_only`: the
        generator fits the pairs alone on every iteration (a pre-training stage: DM and GAN off),
        and the fake score, which nothing reads then, is neither run nor updated. `ema`: an average
        of the generator's weights (dmdcli.train.ema), updated after each applied generator step.
        `accumulation_steps`: each batch is that many micro-batches, whose gradients each update adds up."""
        if regression_only and regression_distance is None:
            raise ValueError("regression_only needs a regression_distance")
        self.dmd2, self.generator, self.timesteps = dmd2, generator, list(timesteps)
        self.generator_params, self.fake_params = generator_params, fake_params
        self.generator_optimizer, self.fake_optimizer = generator_optimizer, fake_optimizer
        self.generator_lr_scheduler, self.fake_lr_scheduler = generator_lr_scheduler, fake_lr_scheduler
        self.fake_updates_per_gen = fake_updates_per_gen
        self.max_grad_norm = max_grad_norm
        self.seed = seed
        self.skip_nonfinite = skip_nonfinite
        self.skipped_updates = 0
        self.backward = backward or (lambda loss: loss.backward())
        self.autocast = autocast
        self.any_process = any_process or (lambda flag: flag)
        wrap = wrap or (lambda module: module)
        self.regression_distance, self.regression_iterations = regression_distance, regression_iterations
        self.regression_only = regression_only
        self.ema = ema
        self.accumulation_steps = accumulation_steps
        # phase name → a context manager around it; benchmarks/speed.py swaps in one that times them
        self.clock = untimed
        self.generator_phase = wrap(GeneratorPhase(dmd2, generator, regression_distance, self.timesteps[0]))
        self.fake_phase = wrap(FakeScorePhase(dmd2))

    def is_generator_iteration(self, iteration: int) -> bool:
        return self.regression_only or iteration % self.fake_updates_per_gen == 0

    def regression_active(self, iteration: int) -> bool:
        """Whether the regression term is part of this iteration's generator loss."""
        return (
            self.regression_distance is not None
            and self.dmd2.config.regression_weight > 0
            and (self.regression_iterations == 0 or iteration < self.regression_iterations)
        )

    def _update(
        self, phase: str, forwards: list[Callable[[], dict[str, Tensor]]], module: nn.Module, iteration: int
    ) -> tuple[float | None, dict[str, float]]:
        """Forward and backward each micro-batch (`forwards`: one call each, returning its loss terms)
        with its loss divided by their number, then clip and step once: the gradient of one batch
        of them all. Returns the gradient norm (None: skipped, or no terms) and the terms' means.

        A non-finite loss term or gradient stops the run (DmdError naming the iteration and the
        term) before the optimizer touches the weights, or, with skip_nonfinite, skips the update
        and counts it.
        """
        optimizer, params = (
            (self.generator_optimizer, self.generator_params)
            if phase == "generator"
            else (self.fake_optimizer, self.fake_params)
        )
        n, sums, run, bad = len(forwards), {}, 0, []
        for i, forward in enumerate(forwards):
            # Under DDP the processes average their gradients once, in the last micro-batch's backward.
            with contextlib.nullcontext() if i == n - 1 else getattr(module, "no_sync", contextlib.nullcontext)():
                terms = forward()
                if not terms:  # DM and GAN both off (an ablation): the generator stays put
                    continue
                bad = [f"loss_{name}" for name, v in terms.items() if not torch.isfinite(v.detach()).all()]
                if self.any_process(bool(bad)):
                    bad = bad or ["loss on another process"]
                else:
                    with self.clock(f"{phase} backward"):
                        self.backward(self.dmd2.weighted_total(terms) / n)
            run += 1
            for name, v in terms.items():
                sums[name] = sums.get(name, 0.0) + v.item()
            if bad:
                break
        means = {name: total / run for name, total in sums.items()}
        if not means:
            return None, means
        if not bad:
            with self.clock(f"{phase} backward"):
                grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            if not torch.isfinite(grad_norm):  # gradients are averaged: the same on every process
                bad = [f"{phase} gradient"]
        if bad:
            optimizer.zero_grad(set_to_none=True)
            if not self.skip_nonfinite:
                raise DmdError(
                    f"non-finite {', '.join(bad)} in the {phase} update at iteration {iteration + 1}; stopped before "
                    "applying it (lower --lr, or pass --skip-nonfinite to skip such updates)"
                )
            self.skipped_updates += 1
            return None, means
        with self.clock(f"{phase} optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if phase == "generator" and self.ema is not None:
                self.ema.update()
        return float(grad_norm), means

    def __call__(self, batch: Batch, iteration: int) -> dict[str, float]:
        """Run iteration `iteration`; returns the loss terms and gradient norms as floats."""
        if self.regression_only:
            return self._regression_iteration(batch, iteration)
        schedule, device = self.dmd2.schedule, batch.noise.device
        # A batch of several micro-batches is on the host but for its noise: each goes to the device when used.
        micro_batches = batch.split(self.accumulation_steps)
        k = simulation_step(self.seed, iteration, len(self.timesteps))
        samples: list[Tensor] = []  # each micro-batch's generator sample, detached: the fake score's data

        def simulated(m: Batch) -> tuple[Tensor, Tensor]:
            with self.clock("backward simulation"), self.autocast():
                x_t = backward_simulation(self.generator, schedule, m.noise, m.cond, self.timesteps, k)
            return x_t, as_timestep_tensor(self.timesteps[k], x_t.shape[0], x_t.device)

        def sample_without_grad(m: Batch) -> Tensor:
            x_t, t = simulated(m)
            with self.clock("generator sample (no grad)"), torch.no_grad(), self.autocast():
                return generator_x0(self.generator, schedule, x_t, t, m.cond)

        def generator_forward(m: Batch) -> dict[str, Tensor]:
            m = m.to(device)
            x_t, t = simulated(m)
            with self.clock("generator forward"), self.autocast():
                pair = None
                if m.pair_noise is not None and self.regression_active(iteration):
                    pair = (m.pair_noise, m.pair_latent, m.pair_cond)
                x, terms = self.generator_phase(x_t, t, m.cond, m.uncond, pair)
            samples.append(x.detach())
            return terms

        def fake_forward(m: Batch, x: Tensor) -> dict[str, Tensor]:
            m = m.to(device)
            with self.clock("fake score forward"), self.autocast():
                return self.fake_phase(x, m.cond, m.x_real, m.real_cond)

        logs: dict[str, float | None] = {}
        if self.is_generator_iteration(iteration):
            # The fake score stays frozen through backward too: under gradient checkpointing its
            # blocks are recomputed during backward and must see the same requires_grad flags.
            with frozen(self.fake_params):
                forwards = [functools.partial(generator_forward, m) for m in micro_batches]
                norm, terms = self._update("generator", forwards, self.generator_phase, iteration)
            logs["grad_norm_generator"] = norm
            logs.update({f"loss_{name}": v for name, v in terms.items()})
        # Every micro-batch's sample (those after a skipped non-finite one, on a generator iteration, too).
        samples += [sample_without_grad(m.to(device)) for m in micro_batches[len(samples) :]]

        forwards = [functools.partial(fake_forward, m, x) for m, x in zip(micro_batches, samples)]
        logs["grad_norm_fake"], terms = self._update("fake", forwards, self.fake_phase, iteration)
        logs.update({f"loss_{name}": v for name, v in terms.items()})
        # Both schedules count iterations, as the reference's (its generator scheduler steps on
        # every iteration, updated or not): a warm-up of W iterations, not of W generator updates.
        return self._finish(logs, (self.generator_lr_scheduler, self.fake_lr_scheduler))

    def _regression_iteration(self, batch: Batch, iteration: int) -> dict[str, float]:
        """The generator's regression on the batch's pairs, alone (the reference's train_sd_ode.py):
        no backward simulation, no DM or GAN forward, no fake score update."""
        if batch.pair_noise is None:
            raise ValueError("a regression-only iteration needs a batch with pairs")

        def forward(m: Batch) -> dict[str, Tensor]:
            m = m.to(batch.noise.device)
            with self.clock("generator forward"), self.autocast():
                return self.generator_phase(None, None, m.cond, None, (m.pair_noise, m.pair_latent, m.pair_cond))[1]

        forwards = [functools.partial(forward, m) for m in batch.split(self.accumulation_steps)]
        grad_norm, terms = self._update("generator", forwards, self.generator_phase, iteration)
        logs = {"grad_norm_generator": grad_norm, **{f"loss_{name}": v for name, v in terms.items()}}
        return self._finish(logs, (self.generator_lr_scheduler,))

    def _finish(self, logs: dict, lr_schedulers) -> dict[str, float]:
        for lr_scheduler in lr_schedulers:
            if lr_scheduler is not None:
                lr_scheduler.step()
        if self.skipped_updates:
            logs["skipped_updates"] = self.skipped_updates
        return {k: v for k, v in logs.items() if v is not None}
