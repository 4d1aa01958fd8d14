"""Real images for the GAN term (and `dmd eval`'s folders): the folder scan, captions and image
loading. Their VAE latents' cache is dmdcli.data.latents."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from dmdcli.errors import DmdError, UsageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
CAPTION_FIELDS = ("text", "caption", "prompt")
METADATA_FILE = "metadata.jsonl"


# ----------------------------------------------------------------------------- folder scan


@dataclass
class ImageFolderScan:
    """What a folder offers: usable (image, caption) pairs and the files left out, with why."""

    root: Path
    items: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def scan_image_folder(root: str | Path) -> ImageFolderScan:
    """Find captioned images under `root`, recursively, sorted by relative path.

    Captions come from `root/metadata.jsonl` when it exists (Hugging Face imagefolder layout:
    `file_name` plus one of `text`/`caption`/`prompt`), else from a `.txt` file with the same
    stem beside each image. Images with no caption, or that PIL cannot verify, are skipped.
    Hidden folders (such as the latent cache) are not searched.
    """
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"image folder not found: {root}")
    images = _find_images(root)
    metadata = root / METADATA_FILE
    captions = _read_metadata(metadata) if metadata.is_file() else None

    scan = ImageFolderScan(root=root)
    if captions is not None:
        present = {relpath(root, p) for p in images}
        for rel in sorted(set(captions) - present):
            scan.skipped.append((root / rel, f"listed in {METADATA_FILE} but not found"))
    for path in images:
        caption, reason = _caption_for(root, path, captions)
        if caption is None:
            scan.skipped.append((path, reason))
        elif (problem := _verify_image(path)) is not None:
            scan.skipped.append((path, problem))
        else:
            scan.items.append((path, caption))
    if not scan.items:
        raise UsageError(f"no images with captions in {root}")  # as much the command line's mistake as a missing folder
    return scan


def relpath(root: Path, path: Path) -> str:
    """Path relative to the folder root, with forward slashes (as in metadata.jsonl)."""
    return path.relative_to(root).as_posix()


def _find_images(root: Path) -> list[Path]:
    """Image files under `root`, sorted by relative path; hidden folders are pruned."""
    found = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(folder, f) for f in filenames if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found, key=lambda p: relpath(root, p))


def _read_metadata(path: Path) -> dict[str, str]:
    """Map of relative file name -> caption from a metadata.jsonl file ("" = no caption)."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    captions: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}, line {number}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
            raise UsageError(f"{path}, line {number}: expected a JSON object with a 'file_name' string")
        caption = next((record[k] for k in CAPTION_FIELDS if k in record), None)
        if caption is None:
            raise UsageError(f"{path}, line {number}: no 'text', 'caption' or 'prompt' field")
        if not isinstance(caption, str):
            raise UsageError(f"{path}, line {number}: the caption is not a string")
        name = PurePosixPath(record["file_name"].replace("\\", "/"))
        captions[str(PurePosixPath(*[part for part in name.parts if part != "."]))] = _clean(caption)
    return captions


def _caption_for(root: Path, path: Path, metadata: dict[str, str] | None) -> tuple[str | None, str]:
    """(caption, "") or (None, reason) for one image."""
    if metadata is not None:
        caption = metadata.get(relpath(root, path), "")
    else:
        txt = path.with_suffix(".txt")
        if not txt.is_file():
            return None, "no caption"
        try:
            caption = _clean(txt.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError) as exc:
            return None, f"unreadable caption file {txt.name}: {exc}"
    return (caption, "") if caption else (None, "no caption")


def _clean(caption: str) -> str:
    """Caption with runs of whitespace (newlines in .txt files too) made single spaces."""
    return " ".join(caption.split())


def _verify_image(path: Path) -> str | None:
    """None when PIL can open and verify the file, else the reason it is unusable.

    verify() checks structure without decoding pixels, so a scan stays cheap; a file that
    still fails to decode later is skipped while building the latent cache.
    """
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        return f"unreadable: {exc}"
    return None


# ----------------------------------------------------------------------------- images


def _rgb8(img: Image.Image) -> Image.Image:
    """RGB, 8 bits a channel. PIL's convert("RGB") clips 16-bit greyscale (modes I;16, I) at 255
    instead of scaling it, which turns nearly all of such an image white."""
    if img.mode.startswith("I"):
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) / 257.0 + 0.5, 0, 255).astype(np.uint8))
    return img.convert("RGB")


def load_image(path: str | Path, resolution: int) -> Tensor:
    """Load an image as float32 [3, R, R] in [-1, 1], R = `resolution`.

    The image is turned upright by its EXIF orientation, converted to RGB, center-cropped to
    a square (the long edge is cut to the short one) and resized with LANCZOS.
    Raises DmdError naming the file when it cannot be decoded.
    """
    return load_square(path, resolution)[0]


def load_square(path: str | Path, resolution: int) -> tuple[Tensor, int]:
    """`load_image`'s tensor and the image's short side before resizing (under `resolution`: upscaled)."""
    try:
        with Image.open(path) as img:
            img = _rgb8(ImageOps.exif_transpose(img))
    except Exception as exc:  # see _verify_image
        raise DmdError(f"cannot read image {path}: {exc}") from None
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != resolution:
        img = img.resize((resolution, resolution), Image.Resampling.LANCZOS)
    pixels = np.asarray(img, dtype=np.float32) / 127.5 - 1.0  # [R, R, 3] in [-1, 1]
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), side
