"""FID, KID and CLIP score.

FID is clean-fid's Fréchet distance between Gaussians fitted to two feature sets; KID is
clean-fid's kernel distance (cubic polynomial kernel, 100 subsets of up to 1000), with its
subsets drawn from a seeded generator so the same features always give the same number.
The CLIP score follows the DMD2 reference: images center-cropped and LANCZOS-resized to 256²,
then the CLIP processor; "A photo depicts " prepended to each prompt (as in CLIPScore,
arXiv 2104.08718); the mean cosine similarity of image and text embeddings.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cleanfid.fid import frechet_distance

from dmdcli.errors import DmdError, UsageError, first_line
from dmdcli.eval.preprocess import protocol_resize, to_uint8_rgb

CLIP_PREFIX = "A photo depicts "
CLIP_IMAGE_SIZE = 256  # the reference resizes to 256² before CLIP's own preprocessing


@dataclass
class FeatureStats:
    """Gaussian fit of features: mean mu float64 [D], covariance sigma float64 [D, D]."""

    mu: np.ndarray
    sigma: np.ndarray


def feature_stats(features: np.ndarray) -> FeatureStats:
    """Mean and (unbiased) covariance of features [N, D], N >= 2, as clean-fid computes them."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got {features.shape}")
    features = features.astype(np.float64)
    return FeatureStats(mu=features.mean(axis=0), sigma=np.cov(features, rowvar=False))


def fid(generated: FeatureStats, reference: FeatureStats) -> float:
    """Fréchet distance ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½) (clean-fid's implementation)."""
    # clean-fid prints a notice on stdout for a near-singular product; stdout is for data.
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # SciPy's sqrtm(disp=...)
        try:
            value = frechet_distance(generated.mu, generated.sigma, reference.mu, reference.sigma)
        except ValueError as exc:  # "Imaginary component ..." when the covariances are degenerate
            raise DmdError(f"FID is numerically ill-defined here ({exc}); score more images") from None
    return float(value)


def kid(
    generated: np.ndarray, reference: np.ndarray, *, seed: int = 0, num_subsets: int = 100, max_subset_size: int = 1000
) -> float:
    """Kernel Inception Distance of features [N, D] and [M, D].

    clean-fid's ``kernel_distance(generated, reference)`` in float64, with ``np.random.choice``
    replaced by a ``RandomState(seed)``: after ``np.random.seed(seed)`` clean-fid returns the same
    value for float64 features. With the same images on both sides it is negative, about
    -2/m·(mean k(x, x) - mean k(x, y)): the estimator assumes independent samples.
    """
    n = generated.shape[1]
    m = min(generated.shape[0], reference.shape[0], max_subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 feature vectors on each side")
    rng = np.random.RandomState(seed)
    t = 0.0
    for _ in range(num_subsets):
        x = reference[rng.choice(reference.shape[0], m, replace=False)].astype(np.float64)
        y = generated[rng.choice(generated.shape[0], m, replace=False)].astype(np.float64)
        a = (x @ x.T / n + 1) ** 3 + (y @ y.T / n + 1) ** 3
        b = (x @ y.T / n + 1) ** 3
        t += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return float(t / num_subsets / m)


class ClipScorer:
    """CLIP image-text cosine similarity with a transformers CLIPModel and its processor."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        name: str,
        device: str | torch.device = "cpu",
        prefix: str = CLIP_PREFIX,
        image_size: int = CLIP_IMAGE_SIZE,
    ):
        self.model = model.to(device).eval()
        self.processor = processor
        self.name = name
        self.device = torch.device(device)
        self.prefix = prefix
        self.image_size = image_size

    @classmethod
    def load(cls, name_or_path: str, device: str | torch.device = "cpu", *, allow_pickle: bool = False) -> "ClipScorer":
        """CLIPModel + CLIPProcessor from a local folder or a hub id (no remote code; weights
        stored only as pickles are refused unless `allow_pickle`)."""
        from transformers import CLIPModel, CLIPProcessor

        from dmdcli.models.teacher import looks_like_path

        if looks_like_path(name_or_path) and not Path(name_or_path).expanduser().exists():
            raise UsageError(
                f"CLIP model not found: {name_or_path}"
            )  # not a hub id: transformers would say "Repo id must be …"
        try:
            # float32 whatever the checkpoint's dtype (transformers 5 keeps it by default), as the
            # reference scores with clip.float(); the PIL backend resizes as open_clip does.
            model = CLIPModel.from_pretrained(
                name_or_path, use_safetensors=None if allow_pickle else True, dtype=torch.float32
            )
            processor = CLIPProcessor.from_pretrained(name_or_path, backend="pil")
        except Exception as exc:  # OSError (not found / offline), ValueError (bad config), ...
            hint = (
                ""
                if allow_pickle or "safetensors" not in str(exc)
                else " (weights stored only as pickle files load with --allow-pickle)"
            )
            raise DmdError(f"cannot load the CLIP model {name_or_path}: {first_line(exc)}{hint}") from None
        return cls(model, processor, name=str(name_or_path), device=device)

    @torch.no_grad()
    def cosines(self, images: Sequence[Any], prompts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Cosine similarity float64 [N] of image i with `prefix` + prompts[i]."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        max_length = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        out = []
        for start in range(0, len(images), batch_size):
            pil = [self._prepare(image) for image in images[start : start + batch_size]]
            texts = [self.prefix + prompt for prompt in prompts[start : start + batch_size]]
            text = self.processor.tokenizer(
                texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            pixels = self.processor.image_processor(images=pil, return_tensors="pt")["pixel_values"]
            result = self.model(
                input_ids=text["input_ids"].to(self.device),
                attention_mask=text["attention_mask"].to(self.device),
                pixel_values=pixels.to(self.device),
            )
            # image_embeds / text_embeds come L2-normalized, so their dot product is the cosine.
            out.append((result.image_embeds * result.text_embeds).sum(-1).double().cpu().numpy())
        return np.concatenate(out)

    def _prepare(self, image: Any):
        from PIL import Image

        return Image.fromarray(protocol_resize(to_uint8_rgb(image), self.image_size))


def clip_scores(cosines: np.ndarray) -> dict[str, float]:
    """The CLIP score in both common scales: the mean cosine (DMD2/GigaGAN tables, ~0.3) and
    the mean of 100·max(cos, 0) (torchmetrics' CLIPScore, ~30)."""
    return {
        "clip_score": float(np.mean(cosines)),
        "clip_score_100": float(np.mean(100.0 * np.maximum(cosines, 0.0))),
    }
