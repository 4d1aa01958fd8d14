"""Reference statistics, computed once and kept on disk.

One entry per (set, which crop: "fid" at the protocol resolution or "patch", number of images,
image files, extractor): ``<key>.safetensors`` holds the reference features float32 [N, D]
(for KID) with mu float64 [D] and sigma float64 [D, D] (for FID), and the key's inputs in its
metadata; ``<key>.json`` repeats them for people. Both are written to a temporary file and
renamed, so a crash leaves no half entry; the .safetensors file is written last and is the
only one read back.

Default folder: ``$DMD_CACHE/eval`` when DMD_CACHE is set, else ``~/.cache/dmd/eval``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from dmdcli.errors import DmdError
from dmdcli.eval.metrics import FeatureStats, feature_stats
from dmdcli.files import atomic_save_file, atomic_write, cache_dir

CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    return cache_dir("eval")


@dataclass
class ReferenceStats:
    """Reference features float32 [N, D] and their Gaussian fit; `cached` is True when they
    were read from the cache rather than computed by this call."""

    features: np.ndarray
    stats: FeatureStats
    key: str
    cached: bool


def cache_key(inputs: dict) -> str:
    """16 hex chars of sha256 over the key inputs (JSON with sorted keys)."""
    return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **inputs}, sort_keys=True).encode()).hexdigest()[:16]


class StatsCache:
    """A folder of reference statistics; :meth:`get_or_compute` reads or fills one entry."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def get_or_compute(self, inputs: dict, compute: Callable[[], np.ndarray]) -> ReferenceStats:
        """The entry keyed by `inputs`; on a miss `compute()` gives features [N, D], which are
        fitted and stored. A hit never calls `compute`."""
        key = cache_key(inputs)
        entry = self.load(key)
        if entry is not None:
            return entry
        features = np.asarray(compute(), dtype=np.float32)
        stats = feature_stats(features)
        self.save(key, inputs, features, stats)
        return ReferenceStats(features=features, stats=stats, key=key, cached=False)

    def load(self, key: str) -> ReferenceStats | None:
        """The entry for `key`, or None when there is none."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in ("features", "mu", "sigma")}
        except Exception as exc:  # safetensors raises its own error type for a corrupt file
            raise DmdError(
                f"reference statistics {path} are unreadable ({exc}); delete the file and run again"
            ) from None
        if metadata.get("key") != key:
            raise DmdError(f"reference statistics {path} belong to another key; delete the file and run again")
        stats = FeatureStats(mu=tensors["mu"].numpy(), sigma=tensors["sigma"].numpy())
        return ReferenceStats(features=tensors["features"].numpy(), stats=stats, key=key, cached=True)

    def save(self, key: str, inputs: dict, features: np.ndarray, stats: FeatureStats) -> Path:
        """Write one entry atomically (temporary file + rename)."""
        metadata = {"key": key, "format": str(CACHE_FORMAT), "inputs": json.dumps(inputs, sort_keys=True)}
        tensors = {
            "features": torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)),
            "mu": torch.from_numpy(np.ascontiguousarray(stats.mu, dtype=np.float64)),
            "sigma": torch.from_numpy(np.ascontiguousarray(stats.sigma, dtype=np.float64)),
        }
        # A failed write (full disk, permissions) is an OSError naming the file: the CLI's one line.
        atomic_write(
            self.root / f"{key}.json",
            lambda tmp: tmp.write_text(json.dumps({"key": key, **inputs}, indent=1), encoding="utf-8"),
        )
        atomic_save_file(tensors, self.path(key), metadata)
        return self.path(key)
