"""The shapes world as `--data shapes`: procedural images written once.

`dmd distill --data shapes` needs no files from the user: the first run renders DATA_IMAGES
captioned scenes (seed DATA_SEED) into a cache folder, later runs reuse it. The folder is built
under a temporary name and renamed into place, so an interrupted build is never used.
"""

from __future__ import annotations

from pathlib import Path

from dmdcli.files import atomic_folder, cache_dir
from dmdcli.shapes import world

DATA_SEED = 1
DATA_IMAGES = 2048


def dataset_folder(n: int | None = None, seed: int = DATA_SEED) -> Path:
    """The folder of n (default DATA_IMAGES) captioned scenes of `seed` (rendered on first use)."""
    n = DATA_IMAGES if n is None else n
    final = cache_dir("shapes") / f"data-seed{seed}-n{n}-{world.RESOLUTION}px"
    if (final / "metadata.jsonl").is_file():
        return final
    return atomic_folder(final, lambda tmp: world.write_dataset(tmp, n, seed=seed, metadata=True), "metadata.jsonl")
