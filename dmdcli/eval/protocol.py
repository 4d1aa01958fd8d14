"""Prompt/reference sets: which captions to generate for and which real images to compare with.

Three kinds of set, each a list of (reference image, caption) pairs:

- ``coco30k``: zero-shot COCO-2014 val at 256² (the SD1.5 protocol of DMD2, GigaGAN, ...).
- ``coco10k``: the 10k COCO-2014 val subset at 512² used for SDXL models.
- any folder of captioned images (the layout ``dmd distill --data`` reads), default 256².

COCO selection (both sets, :func:`select_coco`): the images of ``captions_val2014.json`` that
have at least one non-blank caption, sorted by image id, are put in the order of
``numpy.random.default_rng(seed).permutation``; then, walking that order with the same
generator, one caption per image is drawn with ``rng.integers(number of its captions)`` among
its captions sorted by annotation id. coco30k uses seed 0, coco10k seed 123 (the seed the
reference's SDXL evaluation names). The first N items of a selection never depend on how many
more follow, so ``--num-samples N`` scores a prefix of the full set, and the result is the
same on every machine (PCG64 is a fixed algorithm).

The DMD2 reference instead ships fixed files (GigaGAN's 30k captions and a reference image
folder); its exact subset is not derivable from the COCO annotations, so FIDs computed here
follow its protocol (crop, LANCZOS, clean-fid) on a different random 30k/10k draw. To score
on exactly those files, lay them out as a captioned folder and pass it as the set.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dmdcli.data.images import scan_image_folder
from dmdcli.errors import DmdError, UsageError
from dmdcli.files import read_json

COCO_CAPTIONS = ("annotations/captions_val2014.json", "captions_val2014.json")
COCO_IMAGES = "val2014"
FOLDER_RESOLUTION = 256  # default evaluation resolution of a captioned folder


@dataclass(frozen=True)
class CocoProtocol:
    """A published COCO-2014 val protocol: set size, evaluation resolution, selection seed."""

    name: str
    size: int
    resolution: int
    seed: int


COCO_PROTOCOLS = {
    "coco30k": CocoProtocol("coco30k", 30_000, 256, seed=0),
    "coco10k": CocoProtocol("coco10k", 10_000, 512, seed=123),
}


@dataclass
class ReferenceSet:
    """The prompts to generate for and the real images to score against, in order.

    `items[i]` is (reference image path, caption); generated image i must come from caption i.
    `resolution` is the side the protocol crops and resizes images to before clean-fid;
    `set_size` is the size of the full set before a --num-samples prefix was taken.
    """

    name: str
    root: Path
    resolution: int
    items: list[tuple[Path, str]]
    set_size: int
    selection: str

    @property
    def num_samples(self) -> int:
        return len(self.items)

    @property
    def prompts(self) -> list[str]:
        return [caption for _, caption in self.items]

    @property
    def paths(self) -> list[Path]:
        return [path for path, _ in self.items]

    def fingerprint(self) -> str:
        """16 hex chars of sha256 over every reference image's (path relative to the root,
        size, mtime_ns): a changed, added or removed image changes it."""
        files = []
        for path in self.paths:
            try:
                st = path.stat()
            except OSError as exc:
                raise DmdError(f"cannot read reference image {path}: {exc.strerror or exc}") from None
            files.append([_relative(path, self.root), st.st_size, st.st_mtime_ns])
        return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]

    def describe(self) -> dict:
        """The protocol as it goes into a report."""
        return {
            "name": self.name,
            "root": str(self.root),
            "resolution": self.resolution,
            "num_samples": self.num_samples,
            "set_size": self.set_size,
            "selection": self.selection,
        }


def check_num_samples(num_samples: int | None) -> None:
    """--num-samples of any set: None (all of it) or at least 2 (a Fréchet distance needs two images)."""
    if num_samples is not None and num_samples < 2:
        raise UsageError(f"--num-samples must be at least 2 (FID needs two images), got {num_samples}")


def load_reference_set(
    spec: str | Path,
    *,
    coco_root: str | Path | None = None,
    resolution: int | None = None,
    num_samples: int | None = None,
) -> ReferenceSet:
    """The set named by `spec` ("coco30k", "coco10k" or a folder path), cut to `num_samples`.

    `resolution` overrides the protocol's (256 for coco30k, 512 for coco10k, 256 for a folder).
    Raises UsageError for a missing --coco-root or folder and a bad --num-samples, DmdError for
    a COCO layout that lacks files.
    """
    if resolution is not None and resolution < 1:
        raise UsageError(f"--eval-resolution must be positive, got {resolution}")
    check_num_samples(num_samples)
    spec = str(spec)
    if spec in COCO_PROTOCOLS:
        if coco_root is None:
            raise UsageError(f"--fid {spec} needs --coco-root DIR (the folder holding val2014/ and annotations/)")
        return coco_set(COCO_PROTOCOLS[spec], coco_root, resolution=resolution, num_samples=num_samples)
    if spec.lower().startswith("coco") and not Path(spec).is_dir():
        raise UsageError(f"unknown COCO protocol {spec!r}; choose {' or '.join(COCO_PROTOCOLS)}, or give a folder")
    return folder_set(spec, resolution=resolution or FOLDER_RESOLUTION, num_samples=num_samples)


# ----------------------------------------------------------------------------- COCO


def coco_set(
    protocol: CocoProtocol, coco_root: str | Path, *, resolution: int | None = None, num_samples: int | None = None
) -> ReferenceSet:
    """A COCO protocol's set from `coco_root` (val2014/ images + captions_val2014.json)."""
    root = Path(coco_root)
    if not root.is_dir():
        raise UsageError(f"COCO root not found: {root}")
    captions_file = next((root / rel for rel in COCO_CAPTIONS if (root / rel).is_file()), None)
    if captions_file is None:
        raise DmdError(f"no {COCO_CAPTIONS[0]} in {root} (download the COCO-2014 train/val annotations)")
    images_dir = root / COCO_IMAGES
    if not images_dir.is_dir():
        raise DmdError(f"no {COCO_IMAGES}/ folder in {root} (download the COCO-2014 val images)")

    annotations = _read_json(captions_file)
    available = len(_captions_by_image(annotations, captions_file))
    wanted = protocol.size if num_samples is None else num_samples
    if wanted > protocol.size:
        raise UsageError(f"--num-samples {num_samples} is more than {protocol.name}'s {protocol.size} images")
    if available < wanted:
        raise DmdError(
            f"{captions_file} lists {available} captioned images; {protocol.name} needs {wanted}"
            + ("" if num_samples else f" (use --num-samples <= {available} to score a prefix)")
        )
    selected = select_coco(annotations, min(protocol.size, available), protocol.seed, source=captions_file)
    items = [(images_dir / name, caption) for name, caption in selected[:wanted]]
    missing = [path for path, _ in items if not path.is_file()]
    if missing:
        raise DmdError(
            f"{len(missing)} of {len(items)} selected COCO images are missing from {images_dir} "
            f"(first: {missing[0].name})"
        )
    selection = (
        f"COCO-2014 val: images with captions sorted by id, permuted with numpy default_rng({protocol.seed}); "
        f"one caption per image drawn with the same generator; first {wanted} of {protocol.size}"
    )
    return ReferenceSet(
        name=protocol.name,
        root=root,
        resolution=resolution or protocol.resolution,
        items=items,
        set_size=protocol.size,
        selection=selection,
    )


def select_coco(
    annotations: dict, count: int, seed: int, *, source: Path | str = "captions json"
) -> list[tuple[str, str]]:
    """`count` (image file name, caption) pairs from a COCO captions JSON, one per image.

    See the module docstring for the rule. Raises DmdError when the JSON lacks the COCO fields
    or has fewer than `count` captioned images.
    """
    captions = _captions_by_image(annotations, source)
    files = _file_names(annotations, source)
    ids = sorted(captions)
    if count > len(ids):
        raise DmdError(f"{source} lists {len(ids)} captioned images, fewer than {count}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))[:count]
    selected = []
    for index in order:
        image_id = ids[int(index)]
        if image_id not in files:
            raise DmdError(f"{source}: image id {image_id} has captions but no entry in 'images'")
        options = captions[image_id]
        selected.append((files[image_id], options[int(rng.integers(len(options)))]))
    return selected


def _read_json(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise DmdError(f"{path} is not a COCO captions file (expected a JSON object)")
    return data


def _captions_by_image(annotations: dict, source: Path | str) -> dict[int, list[str]]:
    """image id -> its non-blank captions (whitespace runs made single spaces), by annotation id."""
    records = annotations.get("annotations")
    if not isinstance(records, list):
        raise DmdError(f"{source} is not a COCO captions file (no 'annotations' list)")
    by_image: dict[int, list[tuple[int, str]]] = {}
    for number, record in enumerate(records):
        try:
            image_id, caption = int(record["image_id"]), record["caption"]
            annotation_id = int(record.get("id", number))
        except (KeyError, TypeError, ValueError):
            raise DmdError(f"{source}: annotation {number} lacks an integer 'image_id' or a 'caption'") from None
        caption = " ".join(str(caption).split())
        if caption:
            by_image.setdefault(image_id, []).append((annotation_id, caption))
    return {image_id: [c for _, c in sorted(pairs)] for image_id, pairs in by_image.items()}


def _file_names(annotations: dict, source: Path | str) -> dict[int, str]:
    images = annotations.get("images")
    if not isinstance(images, list):
        raise DmdError(f"{source} is not a COCO captions file (no 'images' list)")
    try:
        return {int(image["id"]): str(image["file_name"]) for image in images}
    except (KeyError, TypeError, ValueError):
        raise DmdError(f"{source}: an entry of 'images' lacks an integer 'id' or a 'file_name'") from None


# ----------------------------------------------------------------------------- folders


def folder_set(
    root: str | Path, *, resolution: int = FOLDER_RESOLUTION, num_samples: int | None = None
) -> ReferenceSet:
    """A captioned image folder (``.txt`` beside each image or ``metadata.jsonl``), sorted by
    relative path, cut to its first `num_samples` images."""
    scan = scan_image_folder(root)
    total = len(scan.items)
    if num_samples is not None and num_samples > total:
        raise UsageError(f"--num-samples {num_samples} is more than the {total} captioned images in {scan.root}")
    items = scan.items[:num_samples] if num_samples is not None else list(scan.items)
    if len(items) < 2:
        raise UsageError(f"{scan.root} holds {len(items)} captioned image; FID needs at least 2")
    selection = f"captioned images sorted by relative path; first {len(items)} of {total}"
    if scan.skipped:
        selection += f" ({len(scan.skipped)} files skipped: no caption or unreadable)"
    return ReferenceSet(
        name="folder", root=scan.root, resolution=resolution, items=items, set_size=total, selection=selection
    )


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()
