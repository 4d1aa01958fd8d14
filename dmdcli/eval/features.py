"""Feature extractors for FID/KID and feature extraction in batches.

An extractor maps float32 images [B, 3, 299, 299] in 0..255 (after clean-fid's "clean" resize)
to features [B, D]. Three sources:

- :func:`clean_fid_inception`: clean-fid's TorchScript Inception (inception-2015-12-05.pt),
  downloaded into clean-fid's folder (/tmp) on first use, as clean-fid itself does;
- :func:`inception_from_file`: the same file from disk (offline machines);
- :func:`torchscript_extractor`: any TorchScript module with that signature.

Each has an `identity` (kind + sha256 of the weights file) that keys the reference cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import platform
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dmdcli.errors import DmdError, UsageError, first_line
from dmdcli.eval.preprocess import clean_resize, to_uint8_rgb

INCEPTION_FILE = "inception-2015-12-05.pt"  # the name clean-fid's InceptionV3W loads


@dataclass
class FeatureExtractor:
    """`model` maps float [B, 3, 299, 299] in 0..255 on `device` to features [B, D]."""

    model: Callable[[Tensor], Tensor]
    identity: str  # e.g. "inception:<sha256[:16]>", "torchscript:<sha256[:16]>"
    device: torch.device

    @torch.no_grad()
    def __call__(self, batch: Tensor) -> np.ndarray:
        """Features float32 [B, D] of float images [B, 3, 299, 299] in 0..255."""
        out = self.model(batch.to(self.device, torch.float32))
        if not isinstance(out, Tensor) or out.shape[0] != batch.shape[0]:
            raise DmdError(
                f"feature extractor {self.identity} returned {getattr(out, 'shape', type(out))} "
                f"for a batch of {batch.shape[0]}; expected features [B, D]"
            )
        return out.reshape(out.shape[0], -1).to("cpu", torch.float32).numpy()


def load_extractor(
    *, inception: str | Path | None = None, features: str | Path | None = None, device: str | torch.device = "cpu"
) -> FeatureExtractor:
    """The extractor the options ask for: --features, else --inception, else clean-fid's
    Inception (downloaded on first use)."""
    if inception is not None and features is not None:
        raise UsageError("give --inception or --features, not both")
    device = torch.device(device)
    if features is not None:
        return torchscript_extractor(features, device)
    if inception is not None:
        return inception_from_file(inception, device)
    return clean_fid_inception(device)


def clean_fid_inception(device: str | torch.device = "cpu") -> FeatureExtractor:
    """clean-fid's Inception, as ``cleanfid.features.build_feature_extractor("clean")`` builds it
    (without DataParallel): the weights are downloaded into /tmp on first use."""
    from cleanfid.inception_torchscript import InceptionV3W

    folder = "./" if platform.system() == "Windows" else "/tmp"  # where clean-fid keeps it
    try:
        with _quiet_jit():
            model = InceptionV3W(folder, download=True, resize_inside=False)
    except Exception as exc:  # urllib/requests errors when offline, RuntimeError for a bad file
        raise DmdError(
            f"cannot load clean-fid's Inception ({exc}); on a machine with no network pass "
            f"--inception PATH ({INCEPTION_FILE}) or --features PATH"
        ) from None
    return _inception(model, Path(folder) / INCEPTION_FILE, device)


def inception_from_file(path: str | Path, device: str | torch.device = "cpu") -> FeatureExtractor:
    """clean-fid's Inception from `path`: the file inception-2015-12-05.pt or a folder holding it.
    Nothing is downloaded."""
    from cleanfid.inception_torchscript import InceptionV3W

    path = Path(path)
    file = path / INCEPTION_FILE if path.is_dir() else path
    if not file.is_file():
        raise UsageError(f"Inception weights not found: {file}")
    if file.name != INCEPTION_FILE:
        raise UsageError(f"--inception expects clean-fid's {INCEPTION_FILE} (or its folder), got {file.name}")
    try:
        with _quiet_jit():
            model = InceptionV3W(str(file.parent), download=False, resize_inside=False)
    except Exception as exc:  # torch.jit raises RuntimeError/ValueError for non-TorchScript files
        raise DmdError(f"cannot load Inception from {file}: {exc}") from None
    return _inception(model, file, device)


def _inception(model: torch.nn.Module, file: Path, device: torch.device | str) -> FeatureExtractor:
    device = torch.device(device)
    return FeatureExtractor(
        model=model.to(device).eval(), identity=f"inception:{file_sha256(file)[:16]}", device=device
    )


def torchscript_extractor(path: str | Path, device: str | torch.device = "cpu") -> FeatureExtractor:
    """A TorchScript module from `path` mapping float [B, 3, H, W] in 0..255 to [B, D].

    torch.jit.load runs no Python code from the file (TorchScript is not pickle)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"feature extractor not found: {path}")
    device = torch.device(device)
    try:
        with _quiet_jit():
            model = torch.jit.load(str(path), map_location=device).eval()
    except Exception as exc:  # RuntimeError / ValueError for files that are not TorchScript archives
        raise UsageError(f"--features {path} is not a TorchScript module ({first_line(exc)})") from None
    return FeatureExtractor(model=model, identity=f"torchscript:{file_sha256(path)[:16]}", device=device)


@contextlib.contextmanager
def _quiet_jit():
    """torch >= 2.10 warns that torch.jit is deprecated on every load; clean-fid's Inception is
    TorchScript, so the warning says nothing the user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        yield


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- extraction


class _CleanImages(torch.utils.data.Dataset):
    """Item i: (float [3, 299, 299] after uint8 RGB -> `transform` -> clean resize, original H, W)."""

    def __init__(self, images: Sequence[Any], transform: Callable[[np.ndarray], np.ndarray] | None):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int] | DmdError:
        try:
            image = to_uint8_rgb(self.images[index])
        except DmdError as e:  # returned, and raised by `extract`: raised in a worker process, torch
            return e  # would hand it back with the worker's whole traceback as its message
        height, width = image.shape[:2]
        if self.transform is not None:
            image = self.transform(image)
        return torch.from_numpy(clean_resize(image).transpose(2, 0, 1).copy()), height, width


def _collate(items: list) -> Any:
    """A batch, or the first unreadable image's error."""
    failed = next((item for item in items if isinstance(item, DmdError)), None)
    return failed if failed is not None else torch.utils.data.default_collate(items)


def extract(
    images: Sequence[Any],
    extractor: FeatureExtractor,
    *,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
    sizes: list[tuple[int, int]] | None = None,
) -> np.ndarray:
    """Features float32 [N, D] of N images (PIL, uint8 [H, W, 3] arrays/tensors, or paths;
    a uint8 array [N, H, W, 3] works too).

    Each image is made uint8 RGB, passed through `transform` (uint8 [H, W, 3] -> uint8; e.g.
    the protocol's crop and resize), resized to 299² by clean-fid's "clean" resize and fed to
    `extractor` in batches. `num_workers` > 0 prepares images in that many processes.
    `progress(done, total)` is called after each batch; `sizes`, when given, receives each
    image's original (H, W).
    """
    if len(images) == 0:
        raise ValueError("no images to extract features from")
    loader = torch.utils.data.DataLoader(
        _CleanImages(images, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    chunks, done = [], 0
    for batch in loader:
        if isinstance(batch, DmdError):
            raise batch
        batch, heights, widths = batch
        chunks.append(extractor(batch))
        if sizes is not None:
            sizes.extend(zip(heights.tolist(), widths.tolist()))
        done += batch.shape[0]
        if progress is not None:
            progress(done, len(images))
    return np.concatenate(chunks)
