"""The built-in shapes world: procedural captioned images, an attribute network, a teacher.

See docs/shapes.md. Everything here runs offline on a CPU.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def teacher_path() -> Path:
    """Folder of the shipped shapes teacher (a diffusers StableDiffusionPipeline)."""
    return WEIGHTS_DIR / "teacher"


def flow_teacher_path() -> Path:
    """Folder of the shipped flow-matching shapes teacher (a diffusers StableDiffusion3Pipeline, no T5)."""
    return WEIGHTS_DIR / "flow-teacher"


def features_path() -> Path:
    """The shipped feature network's weights (its config is ``features.json`` beside it)."""
    return WEIGHTS_DIR / "features.safetensors"
