"""dmd: distill diffusion text-to-image models into few-step generators with DMD2."""

__version__ = "0.1.0"
