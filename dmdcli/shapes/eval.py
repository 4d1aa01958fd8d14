"""`dmd eval --fid shapes`: FD-shapes and prompt alignment with the shipped attribute network.

The prompts are the captions of N procedural scenes (seed EVAL_SEED, disjoint from the seeds the
teacher and the feature network were trained on); the reference set is the same scenes rendered
by the world, so FD-shapes compares "what the prompts ask for" with "what the model drew", and
alignment is the fraction of images whose predicted scene is exactly the one their prompt
describes. Nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from dmdcli.errors import UsageError
from dmdcli.shapes import features, world

EVAL_SEED = 20_251_122
DEFAULT_SAMPLES = 2000


class ShapesBenchmark:
    """The Benchmark protocol of dmdcli.eval.run for the shapes world."""

    label = "shapes"

    def __init__(self, options):
        unused = [
            flag
            for flag, value in (
                ("--coco-root", options.coco_root),
                ("--eval-resolution", options.eval_resolution),
                ("--features", options.features),
                ("--inception", options.inception),
                ("--clip-model", options.clip_model),
            )
            if value is not None
        ]
        if unused:
            raise UsageError(
                f"{', '.join(unused)}: for reference sets; --fid shapes scores with its own attribute network"
            )
        self.num_samples = DEFAULT_SAMPLES if options.num_samples is None else options.num_samples
        self.scenes = world.scenes(EVAL_SEED, self.num_samples)
        self.prompts = [world.caption(s) for s in self.scenes]
        self.net = None

    def describe(self) -> str:
        return (
            f"shapes world: {self.num_samples} procedural prompts (seed {EVAL_SEED}); FD-shapes against the "
            "same scenes rendered, and prompt alignment, with the shipped attribute network"
        )

    def prepare(self, progress=None) -> None:  # the reference scenes are rendered when scoring: a second or so
        self.net = features.load_feature_net()

    def score(self, generation, progress=None) -> dict:
        if self.net is None:
            self.prepare()
        images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in generation.paths])
        reference = world.render_array(self.scenes)
        report = features.alignment_report(images, self.scenes, self.net)
        metrics = {
            "fd_shapes": features.fd_shapes(images, reference, self.net),
            "alignment": report.pop("alignment"),
            **{f"accuracy_{k}": v for k, v in report.items() if k != "n"},
            "seconds_per_image": generation.seconds_per_image,
            "nfe_per_image": generation.nfe_per_image,
        }
        return {
            "model": generation.model,
            "seed": generation.seed,
            "num_samples": self.num_samples,
            "protocol": {
                "name": "shapes",
                "resolution": world.RESOLUTION,
                "eval_seed": EVAL_SEED,
                "reference": "the prompts' scenes rendered by dmdcli.shapes.world",
                "features": "dmdcli/shapes/weights/features.safetensors",
            },
            "metrics": metrics,
            "generation": generation.details,
        }


def benchmark(options) -> ShapesBenchmark:
    return ShapesBenchmark(options)
