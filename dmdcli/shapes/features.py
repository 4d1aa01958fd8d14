"""The shapes world's feature network and the two metrics it gives with no download.

**AttributeNet** — a small CNN that reads a 32×32 image and predicts the whole scene:
the background (3 classes) and, for each quadrant, its shape or "none" (5), color (6) and size
(2). Its penultimate layer (256 ReLU units) is the feature space of FD-shapes.

**FD-shapes** — the Fréchet distance between Gaussians fitted to the features of two image sets,
``|mu1 - mu2|² + tr(S1 + S2 - 2 (S1 S2)^½)`` (as FID, with this network instead of Inception).

**Alignment** — the fraction of images whose predicted scene equals the scene their caption
describes: same background, the same quadrants occupied, and in each occupied quadrant the same
shape, color and size (``world.parse_caption``; color and size are read only where the net sees
a shape). A one-object prompt is therefore also missed when a second object appears.

Images may be PIL images, uint8 arrays [N, H, W, 3] or float tensors [N, 3, H, W] in [-1, 1];
other sizes than 32 are resized (box filter / area interpolation).
"""

from __future__ import annotations

import json
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmdcli.shapes import features_path, world

FEATURE_DIM = 256
# Logit layout: background, then for each quadrant (POSITIONS order) shape+none, color, size.
HEAD_SIZES = [len(world.BACKGROUNDS)] + [len(world.SHAPES) + 1, len(world.COLORS), len(world.SIZES)] * 4
ATTRIBUTES = ["background"] + [f"{a}@{p}" for p in world.POSITIONS for a in ("shape", "color", "size")]


class AttributeNet(nn.Module):
    """Image [B, 3, 32, 32] in [-1, 1] → (logits [B, 55], features [B, 256])."""

    def __init__(self, width: int = 16, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        w = width
        self.body = nn.Sequential(
            *block(3, w),
            nn.MaxPool2d(2),  # 16×16
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            nn.MaxPool2d(2),  # 8×8
            *block(2 * w, 4 * w),
            *block(4 * w, 4 * w),
            nn.MaxPool2d(2),  # 4×4: one cell per 8 px
        )
        # Flattening (not pooling) keeps where things are: position is an attribute.
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, sum(HEAD_SIZES))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.embed(self.body(x))
        return self.head(features), features


def split_logits(logits: Tensor) -> list[Tensor]:
    """Logits [B, 55] → one [B, k] tensor per attribute (ATTRIBUTES order)."""
    return list(torch.split(logits, HEAD_SIZES, dim=1))


def attribute_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum over attributes of the cross-entropy; labels [B, 13] with -1 = not applicable."""
    return sum(F.cross_entropy(lg, labels[:, i], ignore_index=-1) for i, lg in enumerate(split_logits(logits)))


# ----------------------------------------------------------------------------- loading


def save_feature_net(net: AttributeNet, path: str | Path, extra: dict | None = None) -> None:
    """Weights as safetensors at ``path``; config JSON beside it (same stem, ``.json``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path))
    config = {
        "width": net.body[0].out_channels,
        "feature_dim": net.head.in_features,
        "resolution": world.RESOLUTION,
        "attributes": ATTRIBUTES,
        "head_sizes": HEAD_SIZES,
    }
    path.with_suffix(".json").write_text(json.dumps({**config, **(extra or {})}, indent=2) + "\n")


def load_feature_net(path: str | Path | None = None) -> AttributeNet:
    """The shipped network (or the one at ``path``), fp32, CPU, eval mode."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else features_path()
    config = json.loads(path.with_suffix(".json").read_text())
    net = AttributeNet(width=config["width"], feature_dim=config["feature_dim"])
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)


@lru_cache(maxsize=1)
def _shipped() -> AttributeNet:
    return load_feature_net()


def _net(net: AttributeNet | None) -> AttributeNet:
    return net if net is not None else _shipped()


# ----------------------------------------------------------------------------- inputs


def to_input(images) -> Tensor:
    """Images (see module docstring) → float32 [N, 3, 32, 32] in [-1, 1]."""
    size = world.RESOLUTION
    if isinstance(images, Tensor):
        x = images.detach().float().cpu()
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="area")
        return x
    if isinstance(images, np.ndarray) and images.ndim == 4:
        arrays = list(images)
    else:
        arrays = [np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im) for im in images]
    out = []
    for a in arrays:
        if a.dtype != np.uint8:
            a = np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)  # float images in [0, 1]
        if a.shape[0] != size or a.shape[1] != size:
            from PIL import Image

            a = np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BOX))
        out.append(a)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def _run(images, net: AttributeNet | None, batch: int = 256) -> tuple[Tensor, Tensor]:
    model = _net(net)
    x = to_input(images)
    logits, feats = zip(*(model(x[i : i + batch]) for i in range(0, len(x), batch)))
    return torch.cat(logits), torch.cat(feats)


# ----------------------------------------------------------------------------- predictions


def labels_from_logits(logits: Tensor) -> Tensor:
    """Predicted labels [B, 13] (``world.scene_labels`` layout; -1 for empty quadrants)."""
    labels = torch.stack([lg.argmax(dim=1) for lg in split_logits(logits)], dim=1)
    for q in range(4):
        empty = labels[:, 1 + 3 * q] == 0
        labels[empty, 2 + 3 * q] = -1
        labels[empty, 3 + 3 * q] = -1
    return labels


def predict_labels(images, net: AttributeNet | None = None) -> np.ndarray:
    """Predicted labels int64 [N, 13]."""
    return labels_from_logits(_run(images, net)[0]).numpy()


def features(images, net: AttributeNet | None = None) -> np.ndarray:
    """Penultimate features, float64 [N, 256]."""
    return _run(images, net)[1].double().numpy()


def _as_scenes(targets: Sequence) -> list[world.Scene]:
    return [world.parse_caption(t) if isinstance(t, str) else t for t in targets]


def attribute_accuracy(images, targets: Sequence, net: AttributeNet | None = None) -> dict[str, float]:
    """Accuracy per attribute kind on images of known scenes (``targets``: scenes or captions).

    ``background``; ``shape`` over all quadrants (including "none"); ``color`` and ``size`` over
    the occupied quadrants; ``scene``: the whole scene right (= alignment).
    """
    pred = predict_labels(images, net)
    true = np.stack([world.scene_labels(s) for s in _as_scenes(targets)])
    shape_cols, color_cols, size_cols = [1, 4, 7, 10], [2, 5, 8, 11], [3, 6, 9, 12]
    occupied = true[:, shape_cols] > 0
    return {
        "background": float(np.mean(pred[:, 0] == true[:, 0])),
        "shape": float(np.mean(pred[:, shape_cols] == true[:, shape_cols])),
        "color": float(np.mean((pred[:, color_cols] == true[:, color_cols])[occupied])),
        "size": float(np.mean((pred[:, size_cols] == true[:, size_cols])[occupied])),
        "scene": float(np.mean(np.all(pred == true, axis=1))),
    }


def alignment(images, targets: Sequence, net: AttributeNet | None = None) -> float:
    """Fraction of images whose predicted scene is the one their caption (or scene) describes."""
    pred = predict_labels(images, net)
    true = np.stack([world.scene_labels(s) for s in _as_scenes(targets)])
    return float(np.mean(np.all(pred == true, axis=1)))


def alignment_report(images, targets: Sequence, net: AttributeNet | None = None) -> dict[str, float]:
    """``attribute_accuracy`` with the scene accuracy named ``alignment``, plus ``n``."""
    acc = attribute_accuracy(images, targets, net)
    acc["alignment"] = acc.pop("scene")
    acc["n"] = len(targets)
    return acc


# ----------------------------------------------------------------------------- FD-shapes


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID's formula, float64)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    diff = mu1 - mu2
    with warnings.catch_warnings():  # fewer images than features: singular, handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product: regularize, as FID implementations do
        offset = np.eye(len(sigma1)) * 1e-6
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real
    return float(max(0.0, diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)))


def feature_stats(images, net: AttributeNet | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean [256] and covariance [256, 256] of the features of ``images``."""
    f = features(images, net)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def fd_shapes(images_a, images_b, net: AttributeNet | None = None) -> float:
    """FD-shapes between two image sets (a few hundred images each or more)."""
    return frechet_distance(*feature_stats(images_a, net), *feature_stats(images_b, net))


# ----------------------------------------------------------------------------- teacher sampling


def sample_teacher(
    pipe_dir: str | Path,
    captions: Sequence[str],
    steps: int = 25,
    guidance_scale: float = 4.0,
    seed: int = 0,
    batch: int = 64,
) -> np.ndarray:
    """Images of a shapes teacher's diffusers pipeline (SD, or SD3 without T5) for ``captions``,
    uint8 [N, H, W, 3], called as its model_index.json says (dmdcli.models.teacher.TeacherSpec).

    Image i uses generator seed ``seed + i``, so it does not depend on the batch. fp32, CPU.
    """
    from diffusers import DiffusionPipeline

    from dmdcli.models.teacher import inspect_teacher

    spec = inspect_teacher(str(pipe_dir))
    # No dtype argument (diffusers renamed torch_dtype to dtype); cast after loading instead.
    pipe = DiffusionPipeline.from_pretrained(str(pipe_dir), local_files_only=True, **spec.absent_required)
    if pipe.dtype != torch.float32:
        pipe = pipe.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    size = spec.native_resolution
    out = []
    for i in range(0, len(captions), batch):
        chunk = list(captions[i : i + batch])
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        images = pipe(
            chunk,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=gens,
            height=size,
            width=size,
            **spec.call_kwargs,
            output_type="np",
        ).images
        out.append(np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(out)
