"""The DMD2 math: schedule, losses, sampler and objective, on the denoiser interface."""
