"""Image preprocessing of the evaluation protocol, on uint8 RGB arrays [H, W, 3].

For FID and KID, generated and reference images alike go through
1. :func:`protocol_resize`: center crop on the long edge, then PIL LANCZOS to the protocol size
   (256 for coco30k, 512 for coco10k), as the DMD2 reference's ``resize_and_center_crop``;
2. :func:`clean_resize`: clean-fid's "clean" resize to 299² (PIL bicubic on each channel in
   float32, no quantization), then the feature extractor.

Patch FID replaces step 1 by :func:`patch_crop` on the full-resolution image.

Images are read as clean-fid reads them: ``Image.open(path).convert("RGB")``, with no EXIF
rotation, so reference features match clean-fid's own for the same folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from cleanfid.resize import build_resizer
from PIL import Image

from dmdcli.errors import DmdError

PATCH_SIZE = 299  # Inception's input side: patch FID crops exactly what the network sees

#: What the evaluation accepts as one image: a PIL image, a uint8 array or tensor [H, W, 3]
#: (a tensor may also be [3, H, W]), or the path of an image file.
ImageLike = Union[Image.Image, np.ndarray, torch.Tensor, str, Path]

_CLEAN_RESIZE = build_resizer("clean")


def to_uint8_rgb(image: Any) -> np.ndarray:
    """`image` (see ImageLike) as a uint8 array [H, W, 3].

    Float arrays are refused: the protocol quantizes to 8 bits like a saved PNG, and guessing
    between 0..1, -1..1 and 0..255 would silently change the scores.
    """
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as img:
                return np.asarray(img.convert("RGB"))
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
            raise DmdError(f"cannot read image {image}: {exc}") from None
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
            image = image.permute(1, 2, 0)  # [3, H, W] -> [H, W, 3]
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a PIL image, a uint8 array/tensor or a path, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (0..255), got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected an image [H, W, 3], got shape {tuple(image.shape)}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image)


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """PIL box (left, top, right, bottom) of the centered size×size square, offsets rounded as
    torchvision's ``center_crop`` rounds them (``int(round((H - size) / 2))``, half to even)."""
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def center_crop_long_edge(image: np.ndarray) -> np.ndarray:
    """The centered square whose side is the short edge: [H, W, 3] -> [S, S, 3], S = min(H, W)."""
    height, width = image.shape[:2]
    left, top, right, bottom = center_crop_box(width, height, min(height, width))
    return image[top:bottom, left:right]


def protocol_resize(image: np.ndarray, resolution: int) -> np.ndarray:
    """FID protocol step 1: center crop on the long edge, PIL LANCZOS to resolution²; uint8."""
    square = Image.fromarray(center_crop_long_edge(image))
    if square.size != (resolution, resolution):
        square = square.resize((resolution, resolution), Image.LANCZOS)
    return np.asarray(square)


def patch_crop(image: np.ndarray, size: int = PATCH_SIZE) -> np.ndarray:
    """Patch FID: the centered size×size crop of the full-resolution image [H, W, 3].

    An image with a side shorter than `size` cannot give that patch; it gives its centered
    square on the short edge instead (for a square image, the whole image, as in the reference,
    which leaves such images uncropped), and :func:`clean_resize` then scales it up to 299².
    Reports count these images (``patch_fid_upsampled``), since their patch FID measures
    the whole image rather than full-resolution detail.
    """
    height, width = image.shape[:2]
    if min(height, width) < size:
        return center_crop_long_edge(image)
    left, top, right, bottom = center_crop_box(width, height, size)
    return image[top:bottom, left:right]


def clean_resize(image: np.ndarray) -> np.ndarray:
    """clean-fid's "clean" resize: uint8 [H, W, 3] -> float32 [299, 299, 3] in 0..255."""
    return _CLEAN_RESIZE(image)
