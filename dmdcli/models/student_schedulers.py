"""The diffusers scheduler that steps a pipeline through a student's timesteps (what `dmd export`
writes and its snippets set): an LCMScheduler for a DMD2 student of a DDPM-family teacher, a
DDIMScheduler for a progressive one, and for a flow-matching teacher a FlowMatchLCMScheduler
(DMD2) or FlowMatchEulerDiscreteScheduler (progressive), called with the student's sigmas.
"""

from __future__ import annotations

from typing import Any

import torch

from dmdcli.errors import DmdError

# LCM's boundary condition denoised = c_out·x0 + c_skip·x_t, c_skip = σ²/((s·t)² + σ²) with
# σ = 0.5. At s = 10 (LCM's default), t = 249 gives c_skip ≈ 4e-8; at s = 1e4 it is ≈ 4e-14,
# far below float32 resolution, so the exported pipeline returns the student's x0 exactly.
TIMESTEP_SCALING = 10000.0


def student_scheduler(teacher_scheduler_config: dict[str, Any], timesteps: list[int]):
    """An LCMScheduler whose `set_timesteps(len(timesteps))` yields the student's `timesteps` (a
    ladder of the student's own, `--student-timesteps`: `set_timesteps(timesteps=...)` does).

    LCM with original_inference_steps = T picks N timesteps evenly from T−1 down: 999, 749, 499,
    249 for N = 4 and T = 1000, the student's own. Its one-step timestep is T−1, so a one-step
    student told another timestep c (SDXL: 399) gets a schedule truncated to c + 1 training
    timesteps (the teacher's first c + 1 betas, given explicitly): then num_inference_steps=1
    gives t = c by itself, and timesteps=[c] works too. ᾱ_t is the teacher's at every t used.
    """
    from diffusers import DDPMScheduler, LCMScheduler

    ddpm = DDPMScheduler.from_config(dict(teacher_scheduler_config))  # the teacher's ᾱ_t, as training uses
    total = int(ddpm.config.num_train_timesteps)
    overrides: dict[str, Any] = dict(
        original_inference_steps=total,
        timestep_scaling=TIMESTEP_SCALING,
        clip_sample=False,
        thresholding=False,
        prediction_type=ddpm.config.prediction_type,
    )
    explicit_betas = lambda n: dict(
        num_train_timesteps=n,
        original_inference_steps=n,
        trained_betas=ddpm.betas[:n].tolist(),
        rescale_betas_zero_snr=False,
    )  # noqa: E731
    if len(timesteps) == 1 and timesteps[0] != total - 1:
        overrides.update(explicit_betas(timesteps[0] + 1))
    n = overrides.get("num_train_timesteps", total)
    try:
        scheduler = _lcm(LCMScheduler, teacher_scheduler_config, overrides)
        same = torch.equal(scheduler.alphas_cumprod, ddpm.alphas_cumprod[:n])
    except NotImplementedError:  # a beta schedule LCM does not build (e.g. "sigmoid")
        same = False
    if not same:  # give the teacher's betas explicitly
        overrides.update(explicit_betas(n))
        scheduler = _lcm(LCMScheduler, teacher_scheduler_config, overrides)
    scheduler.set_timesteps(len(timesteps))
    if scheduler.timesteps.tolist() != list(timesteps):  # a ladder of its own (--student-timesteps)
        scheduler.set_timesteps(timesteps=list(timesteps))
    got = scheduler.timesteps.tolist()
    if got != list(timesteps):
        raise DmdError(f"no LCMScheduler configuration gives the student's timesteps {timesteps} (it gives {got})")
    return scheduler


def ddim_student_scheduler(teacher_scheduler_config: dict[str, Any], timesteps: list[int], prediction_type: str):
    """A DDIMScheduler for a progressive-distillation student (`dmd sample`'s DDIM, η = 0).

    "trailing" spacing gives the student's timesteps (round(T − i·T/N) − 1), set_alpha_to_one
    makes the last step land on the x0 estimate, and the prediction type is the student's. DDIM
    steps from t to t − T//N, so this is exact only when N divides T (1, 2, 4, 5, 8, … for T = 1000).
    """
    from diffusers import DDIMScheduler

    config = {k: v for k, v in teacher_scheduler_config.items() if not k.startswith("_")}
    config.update(
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        steps_offset=1,
        prediction_type=prediction_type,
        clip_sample=False,
        thresholding=False,
    )
    scheduler = DDIMScheduler.from_config(config)
    total = int(scheduler.config.num_train_timesteps)
    scheduler.set_timesteps(len(timesteps))
    got = scheduler.timesteps.tolist()
    if got != list(timesteps) or total % len(timesteps):
        raise DmdError(
            f"no DDIMScheduler configuration steps exactly through the student's timesteps {timesteps} (it gives {got})"
        )
    return scheduler


def pipeline_sigmas(timesteps: list[int], num_train_timesteps: int = 1000) -> list[float]:
    """What a flow-matching pipeline is called with (`sigmas=`) to step through a student's
    timesteps: their unshifted sigmas (t + 1) / T, which the scheduler shifts as training did."""
    return [(t + 1) / num_train_timesteps for t in timesteps]


def flow_student_scheduler(
    teacher_scheduler_config: dict[str, Any],
    timesteps: list[int],
    image_seq_len: int,
    sampler: str = "dmd",
    mu: float | None = None,
):
    """The scheduler of a flow-matching student. A DMD2 student's is a FlowMatchLCMScheduler: each
    step takes the x0 estimate x_t − σ·v and re-noises it with fresh noise to the next sigma, DMD2's
    sampler; a progressive one's ("ddim") FlowMatchEulerDiscreteScheduler, whose Euler step
    x_t + (σ' − σ)·v is DDIM's on a flow path.

    No configuration makes a plain `num_inference_steps=N` give the student's sigmas (diffusers
    spaces N steps between its shifted end sigmas and shifts again), so the pipeline is called
    with `sigmas=pipeline_sigmas(timesteps)`; checked here against the teacher's schedule at the
    student's resolution, `image_seq_len` image tokens (a resolution-shifted schedule, FLUX's: the
    pipeline computes the same shift from the image size it is asked for).

    mu: the teacher's shift where its family computes it (`TeacherSpec.time_shift`: FLUX.2's
    pipeline computes μ from the number of steps too, which for a student's few steps is not the
    teacher's): the scheduler is given it as the static shift e^μ, which gives the same sigmas
    (`time_shift_sigmas`) and ignores the μ the pipeline passes."""
    import diffusers

    from dmdcli.core.schedule import resolution_shift
    from dmdcli.models.teacher import schedule_from_config

    name = "FlowMatchEulerDiscreteScheduler" if sampler == "ddim" else "FlowMatchLCMScheduler"
    # The student's sigmas are given exactly: a stretch of the ladder to a terminal sigma (Qwen-Image's
    # shift_terminal, an inference option) would move them.
    overrides = {"shift_terminal": None} | ({} if mu is None else student_static_shift(teacher_scheduler_config, mu))
    scheduler = _lcm(getattr(diffusers, name), teacher_scheduler_config, overrides)
    c, tokens = scheduler.config, image_seq_len
    total = int(c.num_train_timesteps)
    pipeline_mu = None
    if c.use_dynamic_shifting:  # as the pipeline computes it for a resolution² image
        pipeline_mu = resolution_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    scheduler.set_timesteps(sigmas=pipeline_sigmas(timesteps, total), mu=pipeline_mu)
    expected = schedule_from_config(teacher_scheduler_config, tokens, mu).sigmas[timesteps].float()
    if not torch.allclose(scheduler.sigmas[:-1], expected, atol=1e-6, rtol=0):
        raise DmdError(f"no {name} configuration gives the student's sigmas {expected.tolist()}")
    return scheduler


def student_static_shift(teacher_scheduler_config: dict[str, Any], mu: float) -> dict[str, Any]:
    """The scheduler config keys that shift sigmas by μ statically, whatever μ its pipeline passes."""
    from dmdcli.core.schedule import static_shift

    kind = teacher_scheduler_config.get("time_shift_type", "exponential")
    return {"use_dynamic_shifting": False, "shift": static_shift(mu, kind)}


def _lcm(cls, base: dict[str, Any], overrides: dict[str, Any]):
    """cls from the teacher's config, keeping only the keys it takes (the rest would be saved too)."""
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return cls.from_config({**{k: v for k, v in base.items() if k in accepted}, **overrides})
