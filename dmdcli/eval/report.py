"""Score generated images against a reference set and write the JSON report.

:func:`score` is what ``dmd eval`` calls once the images exist: generated image i must come from
``reference.prompts[i]``. Reference statistics come from the cache when they can, so a second
model on the same set only pays for its own images.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from dmdcli.errors import DmdError
from dmdcli.eval.cache import ReferenceStats, StatsCache
from dmdcli.eval.features import FeatureExtractor, extract
from dmdcli.eval.metrics import ClipScorer, clip_scores, feature_stats, fid, kid
from dmdcli.eval.preprocess import PATCH_SIZE, patch_crop, protocol_resize
from dmdcli.eval.protocol import ReferenceSet
from dmdcli.files import atomic_write, read_json

REPORT_FORMAT = "dmd-eval/1"
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000

#: progress(stage, done, total), called after each batch of each stage.
Progress = Callable[[str, int, int], None]


def score(
    generated: Sequence[Any],
    prompts: Sequence[str],
    reference: ReferenceSet,
    extractor: FeatureExtractor,
    *,
    cache: StatsCache | None = None,
    clip: ClipScorer | None = None,
    patch_fid: bool = True,
    model: str = "",
    seed: int | None = None,
    seconds_per_image: float | None = None,
    nfe_per_image: float | None = None,
    generation: dict | None = None,
    kid_seed: int = 0,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: Progress | None = None,
    references: dict[str, ReferenceStats] | None = None,
) -> dict:
    """Every metric of `generated` against `reference`, as the report dict.

    generated: N images, full resolution (PIL, uint8 [H, W, 3] arrays or tensors, [3, H, W]
        tensors, a uint8 array [N, H, W, 3], or paths of image files), N = reference.num_samples.
    prompts: the N prompts they were generated from (used by the CLIP score).
    cache: where reference statistics live (default: StatsCache() in ~/.cache/dmd/eval).
    references: `reference_statistics` computed beforehand (else they are, with `cache`).
    clip: a ClipScorer, or None to leave the CLIP score out (null in the report).
    model, seed, seconds_per_image, nfe_per_image, generation: the caller's facts about how the
        images were made, copied into the report (`generation` under its own key).
    """
    n = reference.num_samples
    if len(generated) != n or len(prompts) != n:
        raise ValueError(f"{len(generated)} images and {len(prompts)} prompts for a reference set of {n}")
    started = time.perf_counter()
    if references is None:
        references = reference_statistics(
            reference,
            extractor,
            cache,
            patch_fid=patch_fid,
            batch_size=batch_size,
            num_workers=num_workers,
            progress=progress,
        )
    step = functools.partial(_stage, progress)
    common = dict(extractor=extractor, batch_size=batch_size, num_workers=num_workers)

    sizes: list[tuple[int, int]] = []
    to_protocol = functools.partial(protocol_resize, resolution=reference.resolution)
    ref = references["fid"]
    gen = extract(generated, transform=to_protocol, sizes=sizes, progress=step("generated features"), **common)
    metrics: dict[str, float | None] = {
        "fid": fid(feature_stats(gen), ref.stats),
        "kid": kid(gen, ref.features, seed=kid_seed, num_subsets=KID_SUBSETS, max_subset_size=KID_SUBSET_SIZE),
        "patch_fid": None,
    }
    reference_stats = {"fid": {"key": ref.key, "cached": ref.cached}}
    if patch_fid:
        ref_patch = references["patch"]
        gen_patch = extract(generated, transform=patch_crop, progress=step("generated patch features"), **common)
        metrics["patch_fid"] = fid(feature_stats(gen_patch), ref_patch.stats)
        reference_stats["patch"] = {"key": ref_patch.key, "cached": ref_patch.cached}

    cosines = clip.cosines(generated, prompts, batch_size=batch_size) if clip is not None else None
    metrics.update(clip_scores(cosines) if cosines is not None else {"clip_score": None, "clip_score_100": None})
    metrics["seconds_per_image"] = seconds_per_image
    metrics["nfe_per_image"] = nfe_per_image

    return {
        "format": REPORT_FORMAT,
        "model": model,
        "seed": seed,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "num_samples": n,
        "protocol": {
            **reference.describe(),
            "fid_preprocess": f"center crop on the long edge, PIL LANCZOS to {reference.resolution}², "
            "clean-fid 'clean' resize to 299²",
            "patch_preprocess": f"{PATCH_SIZE}×{PATCH_SIZE} center crop of the full-resolution image "
            "(images with a shorter side: their centered square, resized up)",
            "kid": {"subsets": KID_SUBSETS, "max_subset_size": KID_SUBSET_SIZE, "seed": kid_seed},
            "clip": None if clip is None else {"prefix": clip.prefix, "image_size": clip.image_size},
        },
        "extractor": extractor.identity,
        "clip_model": None if clip is None else clip.name,
        "metrics": metrics,
        "image_size": _common_size(sizes),
        "patch_fid_upsampled": sum(min(s) < PATCH_SIZE for s in sizes) if patch_fid else None,
        "reference_stats": reference_stats,
        "generation": generation or {},
        "scoring_seconds": round(time.perf_counter() - started, 3),
    }


def reference_statistics(
    reference: ReferenceSet,
    extractor: FeatureExtractor,
    cache: StatsCache | None = None,
    *,
    patch_fid: bool = True,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: Progress | None = None,
) -> dict[str, ReferenceStats]:
    """The reference set's statistics for FID ("fid") and patch FID ("patch"), from the cache or
    computed and cached (default cache: StatsCache() in ~/.cache/dmd/eval)."""
    cache = cache if cache is not None else StatsCache()
    fingerprint = reference.fingerprint()
    common = dict(extractor=extractor, batch_size=batch_size, num_workers=num_workers)
    to_protocol = functools.partial(protocol_resize, resolution=reference.resolution)
    found = {
        "fid": _reference_stats(
            reference, "fid", to_protocol, cache, fingerprint, _stage(progress, "reference features"), **common
        )
    }
    if patch_fid:
        found["patch"] = _reference_stats(
            reference, "patch", patch_crop, cache, fingerprint, _stage(progress, "reference patch features"), **common
        )
    return found


def _reference_stats(
    reference: ReferenceSet,
    kind: str,
    transform: Callable,
    cache: StatsCache,
    fingerprint: str,
    progress: Callable[[int, int], None] | None,
    *,
    extractor: FeatureExtractor,
    batch_size: int,
    num_workers: int,
) -> ReferenceStats:
    """Reference features and statistics for `kind` ("fid" or "patch"), cached by everything
    they depend on (the patch crop does not depend on the protocol resolution)."""
    inputs = {
        "set": reference.name,
        "kind": kind,
        "resolution": reference.resolution if kind == "fid" else None,
        "num_images": reference.num_samples,
        "images": fingerprint,
        "extractor": extractor.identity,
        "mode": "clean",
    }
    return cache.get_or_compute(
        inputs,
        lambda: extract(
            reference.paths,
            extractor,
            transform=transform,
            batch_size=batch_size,
            num_workers=num_workers,
            progress=progress,
        ),
    )


def _stage(progress: Progress | None, name: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(name, done, total)


def _common_size(sizes: list[tuple[int, int]]) -> list[int] | None:
    """[H, W] shared by most generated images (None when there are none)."""
    if not sizes:
        return None
    return list(Counter(sizes).most_common(1)[0][0])


# ----------------------------------------------------------------------------- files


def write_report(path: str | Path, report: dict) -> Path:
    """Write `report` as indented JSON (NaN/inf written as null), atomically."""
    path = Path(path)
    text = json.dumps(_finite(report), indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_report(path: str | Path) -> dict:
    """A report written by write_report; DmdError when it is not one."""
    report = read_json(path)
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise DmdError(f"{path} is not a dmd eval report (format {REPORT_FORMAT})")
    return report


def _finite(value: Any) -> Any:
    """`value` with NaN/inf floats made None and numpy scalars made Python numbers."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ----------------------------------------------------------------------------- table

_COLUMNS = (  # header, metric key, format
    ("FID", "fid", "{:.2f}"),
    ("KID", "kid", "{:.4f}"),
    ("patch FID", "patch_fid", "{:.2f}"),
    ("CLIP", "clip_score", "{:.4f}"),
    ("FD-shapes", "fd_shapes", "{:.3f}"),
    ("align", "alignment", "{:.1%}"),
    ("s/img", "seconds_per_image", "{:.3g}"),
    ("NFE", "nfe_per_image", "{:g}"),
)


def render_table(reports: Sequence[dict]) -> Table:
    """One row per report, side by side: model, set, N, then every metric ("–" when absent)."""
    table = Table(title="dmd eval")
    table.add_column("model")
    table.add_column("set")
    table.add_column("N", justify="right")
    # Only the metrics some report has (Inception sets and a teacher family's own set score differently).
    columns = [c for c in _COLUMNS if any(r.get("metrics", {}).get(c[1]) is not None for r in reports)]
    for header, _, _ in columns:
        table.add_column(header, justify="right")
    for report in reports:
        metrics = report.get("metrics", {})
        protocol = report.get("protocol", {})
        cells = [
            str(report.get("model", "")),
            f"{protocol.get('name', '?')}@{protocol.get('resolution', '?')}",
            str(report.get("num_samples", "")),
        ]
        for _, key, fmt in columns:
            value = metrics.get(key)
            cells.append("–" if value is None else fmt.format(value))
        table.add_row(*cells)
    return table
