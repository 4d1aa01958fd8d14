"""`dmd eval` glue: generate a benchmark's prompts with `dmd sample`'s samplers, then score them.

A *benchmark* is what ``--fid`` names: the prompts to generate for and how to score the images
made from them (:class:`Benchmark`). The Inception-based one is built in
(:class:`ReferenceBenchmark`: FID, KID, patch FID and CLIP score against a COCO protocol or a
captioned folder, through :func:`dmdcli.eval.report.score`). A set whose metrics are not
Inception-based plugs in through :data:`BENCHMARKS`.

Generation (:func:`dmdcli.eval.generation.generate`): image i of the set comes from prompt i with
seed S + i, which is how ``dmd sample --seed S`` numbers images with one image per prompt, so any
image can be redrawn alone with ``dmd sample --prompt <its prompt> --seed <its seed>``; images are
written as PNG under the report's folder as they come (never all held in memory) and scored from
their files.

Files, for one model: ``OUT/<stem>.json`` (the report), ``OUT/<stem>-grid.png`` (the first
images) and ``OUT/<stem>/`` (every image), stem = ``eval-<set>-<N>`` plus the options that change
the images (``-<steps>steps``, ``-cfg<scale>``, ``-<size>px``, ``-seed<S>``) when given.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Union

import torch

from dmdcli.errors import UsageError
from dmdcli.eval.cache import ReferenceStats, StatsCache
from dmdcli.eval.features import FeatureExtractor, load_extractor
from dmdcli.eval.generation import Generation, generate
from dmdcli.eval.metrics import ClipScorer
from dmdcli.eval.protocol import COCO_PROTOCOLS, ReferenceSet, check_num_samples, load_reference_set
from dmdcli.eval.report import Progress, reference_statistics, score, write_report
from dmdcli.files import atomic_write
from dmdcli.models.families import eval_sets
from dmdcli.models.student import ModelSource
from dmdcli.runfiles import STUDENT_FILE
from dmdcli.sample import Job, check_free, plan, slug

GRID_IMAGES, GRID_COLUMNS, GRID_TILE = 16, 4, 256  # the grid beside the report: first 16, tiles ≤ 256 px
FEATURE_BATCH = 32  # images per feature-extractor batch (generation uses --batch-size)


@dataclass
class EvalOptions:
    """The scoring options of `dmd eval`, as a benchmark factory receives them."""

    coco_root: Path | None = None
    num_samples: int | None = None  # score the first N of the set (None: all of it)
    eval_resolution: int | None = None  # None: the protocol's (256 coco30k, 512 coco10k, 256 folders)
    features: Path | None = None  # any TorchScript extractor instead of Inception
    inception: Path | None = None  # clean-fid's inception-2015-12-05.pt from disk
    clip_model: str | None = None  # transformers CLIP folder or hub id; None: no CLIP score
    cache_dir: Path | None = None  # reference statistics (None: $DMD_CACHE/eval or ~/.cache/dmd/eval)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    num_workers: int = 0
    allow_pickle: bool = False


class Benchmark(Protocol):
    """What `dmd eval` generates for and how it scores (the extension point of :data:`BENCHMARKS`).

    label: the set's name in report file names ("coco30k", "folder-<name>", a registered set's name).
    prompts: the N prompts, in order; image i is generated from prompts[i].
    """

    label: str
    prompts: list[str]

    def describe(self) -> str:
        """One line for the user: what the set is and what is scored."""
        ...

    def prepare(self, progress: Progress | None = None) -> None:
        """Load feature networks and scorers, and whatever is scored against (reference statistics).
        Called once, after the command line is checked and before any model loads, so that a bad
        extractor or reference image fails before hours of generation."""
        ...

    def score(self, generation: Generation, progress: Progress | None) -> dict:
        """The report dict of `generation` (see dmdcli.eval.report.score for its layout: a
        "metrics" dict, with seconds_per_image and nfe_per_image among them, and "num_samples")."""
        ...


#: Benchmarks that are not Inception-based, by their --fid name: a factory taking EvalOptions and
#: returning a Benchmark, or "module:function" naming one (imported only when asked for): the
#: teacher families' evaluation sets (dmdcli.models.families). A name here takes precedence over a
#: folder of the same name (pass ./NAME for the folder).
BENCHMARKS: dict[str, Union[str, Callable[[EvalOptions], Benchmark]]] = {s.name: s.benchmark for s in eval_sets()}


def open_benchmark(spec: str, options: EvalOptions) -> Benchmark:
    """The benchmark --fid names: a registered one, a COCO protocol, or a captioned folder.
    Raises UsageError for a missing folder or --coco-root, or --num-samples below 2, for every
    set (nothing is loaded or written)."""
    check_num_samples(options.num_samples)
    factory = BENCHMARKS.get(spec)
    if isinstance(factory, str):
        module, _, name = factory.partition(":")
        factory = getattr(importlib.import_module(module), name)
    if factory is not None:
        return factory(options)
    if spec not in COCO_PROTOCOLS and not spec.lower().startswith("coco") and not Path(spec).is_dir():
        names = ", ".join([*COCO_PROTOCOLS, *BENCHMARKS])
        raise UsageError(f"--fid {spec}: no such folder (give {names} or a folder of captioned images)")
    reference = load_reference_set(
        spec, coco_root=options.coco_root, resolution=options.eval_resolution, num_samples=options.num_samples
    )
    return ReferenceBenchmark(reference, options)


class ReferenceBenchmark:
    """FID, KID, patch FID (clean-fid's Inception or --features) and CLIP score (--clip-model)
    against a reference set, with reference statistics cached."""

    def __init__(self, reference: ReferenceSet, options: EvalOptions):
        self.reference, self.options = reference, options
        if reference.name in COCO_PROTOCOLS:
            self.label = reference.name
        else:
            self.label = f"folder-{slug(Path(reference.root).resolve().name, 40)}"
        if options.eval_resolution is not None:  # another protocol: its own report beside the default's
            self.label += f"-at{options.eval_resolution}px"
        self.prompts = reference.prompts
        self.extractor: FeatureExtractor | None = None
        self.clip: ClipScorer | None = None
        self.references: dict[str, ReferenceStats] | None = None

    def describe(self) -> str:
        r = self.reference
        what = "FID, KID, patch FID" + (", CLIP score" if self.options.clip_model else "")
        extractor = f" ({self.extractor.identity})" if self.extractor is not None else ""
        return f"{r.name} ({r.root}): {r.num_samples} of {r.set_size} prompts; {what} at {r.resolution}²{extractor}"

    def prepare(self, progress: Progress | None = None) -> None:
        o = self.options
        self.extractor = load_extractor(inception=o.inception, features=o.features, device=o.device)
        if o.clip_model:
            self.clip = ClipScorer.load(o.clip_model, o.device, allow_pickle=o.allow_pickle)
        self.references = reference_statistics(
            self.reference,
            self.extractor,
            StatsCache(o.cache_dir),
            batch_size=FEATURE_BATCH,
            num_workers=o.num_workers,
            progress=progress,
        )

    def score(self, generation: Generation, progress: Progress | None) -> dict:
        if self.references is None:
            self.prepare(progress)
        return score(
            generation.paths,
            self.prompts,
            self.reference,
            self.extractor,
            references=self.references,
            clip=self.clip,
            model=generation.model,
            seed=generation.seed,
            seconds_per_image=generation.seconds_per_image,
            nfe_per_image=generation.nfe_per_image,
            generation=generation.details,
            batch_size=FEATURE_BATCH,
            num_workers=self.options.num_workers,
            progress=progress,
        )


# ----------------------------------------------------------------------------- where files go


@dataclass
class Target:
    """One model to evaluate: what it is, the image size it is drawn at, and its files."""

    source: ModelSource
    folder: Path
    stem: str
    jobs: list[Job]
    size: tuple[int | None, int | None]  # (height, width); None: the pipeline's default

    @property
    def report(self) -> Path:
        return self.folder / f"{self.stem}.json"

    @property
    def grid(self) -> Path:
        return self.folder / f"{self.stem}-grid.png"

    @property
    def images(self) -> Path:
        return self.folder / self.stem


def report_stem(
    label: str,
    n: int,
    *,
    steps: int | None = None,
    guidance_scale: float | None = None,
    resolution: int | None = None,
    seed: int = 0,
    checkpoint: str | None = None,
) -> str:
    """eval-<set>-<N>, plus the options given that change the images, so that evaluating one
    model two ways into one folder gives two reports; a checkpoint's reports end in its name,
    so a run's checkpoints are scored side by side in the run folder."""
    stem = f"eval-{label}-{n}"
    if steps is not None:
        stem += f"-{steps}steps"
    if guidance_scale is not None:
        stem += f"-cfg{guidance_scale:g}"
    if resolution is not None:
        stem += f"-{resolution}px"
    if seed:
        stem += f"-seed{seed}"
    if checkpoint:
        stem += f"-{checkpoint}"
    return stem


def default_folder(source: ModelSource) -> Path:
    """A run folder (or its student.safetensors, or one of its checkpoints) keeps its evaluations;
    anything else goes to ./eval/<model slug> (an exported pipeline or a hub id is not ours to
    write into)."""
    if source.checkpoint:
        return source.run_folder
    path = Path(source.name).expanduser()
    if source.kind == "student" and path.is_dir():
        return path
    if source.kind == "student" and path.name == STUDENT_FILE:
        return path.parent
    return Path("eval") / slug(source.name)


def plan_targets(
    sources: list[ModelSource],
    benchmark: Benchmark,
    out: Path | None,
    *,
    seed: int,
    steps: int | None = None,
    guidance_scale: float | None = None,
    resolution: int | None = None,
    overwrite: bool = False,
) -> list[Target]:
    """Every model's files, checked before anything loads: a report that exists is refused
    unless `overwrite`, and so is any image file of the run (as `dmd sample` refuses).
    Several models with one `out` go to OUT/<model slug>/ each."""
    targets: list[Target] = []
    for source in sources:
        if any(Path(source.path).resolve() == Path(other.source.path).resolve() for other in targets):
            raise UsageError(f"--model {source.name} names a model given before")
        folder = (out / slug(source.name) if len(sources) > 1 else out) if out is not None else default_folder(source)
        stem = report_stem(
            benchmark.label,
            len(benchmark.prompts),
            steps=steps,
            resolution=resolution,
            seed=seed,
            guidance_scale=None if source.is_student else guidance_scale,
            checkpoint=source.checkpoint,
        )
        base, k = folder, 2
        while any(
            (folder / stem).resolve() == (other.folder / other.stem).resolve() for other in targets
        ):  # two names, one slug
            folder, k = base.with_name(f"{base.name}-{k}"), k + 1
        target = Target(
            source,
            folder,
            stem,
            plan(benchmark.prompts, 1, seed, folder / stem, "png"),
            source.image_size(resolution, None, None),
        )
        if target.report.exists() and not overwrite:
            raise UsageError(f"{target.report} already exists; pass --overwrite to replace it, or choose another --out")
        check_free(target.jobs, overwrite)
        targets.append(target)
    return targets


def evaluate(
    target: Target,
    benchmark: Benchmark,
    *,
    device: torch.device,
    dtype: torch.dtype,
    steps: int | None,
    guidance_scale: float | None,
    batch_size: int,
    seed: int,
    allow_pickle: bool = False,
    progress: Progress | None = None,
    message: Callable[[str], None] = lambda text: None,
) -> dict:
    """Load the target's model, draw its images, score them, write the grid and then the report
    (last: a report on disk means a finished evaluation). Returns the report as written."""
    from dmdcli.models.samplers import load_sampler, sampling_messages

    source = target.source
    target.report.unlink(missing_ok=True)  # being replaced (--overwrite): no stale report beside new images
    sampler = load_sampler(source, device, dtype, None if source.is_student else guidance_scale, allow_pickle)
    n_steps = steps or sampler.default_steps
    for line in sampling_messages(source, sampler, n_steps, device, [j.prompt for j in target.jobs], target.images):
        message(line)
    try:
        generation = generate(sampler, target, n_steps, batch_size, seed, progress)
        generation.details["dtype"] = str(dtype).removeprefix("torch.")
    finally:
        del sampler
        _free_memory(device)
    report = benchmark.score(generation, progress)
    write_grid(generation.paths, target.grid)
    report["files"] = {"report": str(target.report), "grid": str(target.grid), "images": str(target.images)}
    write_report(target.report, report)
    return json.loads(target.report.read_text(encoding="utf-8"))  # as written: NaN made null


def _free_memory(device: torch.device) -> None:
    """Give the sampler's memory back before the feature networks run (and the next model loads)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- files


def write_grid(paths: list[Path], path: Path, count: int = GRID_IMAGES, columns: int = GRID_COLUMNS) -> Path:
    """The first `count` images as one PNG, `columns` wide, each tile at most GRID_TILE px."""
    from PIL import Image

    tiles = []
    for image_path in paths[:count]:
        with Image.open(image_path) as image:
            tile = image.convert("RGB")
            tile.thumbnail((GRID_TILE, GRID_TILE), Image.LANCZOS)
            tiles.append(tile)
    width, height = tiles[0].size
    columns = min(columns, len(tiles))
    grid = Image.new("RGB", (columns * width, math.ceil(len(tiles) / columns) * height), "black")
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % columns) * width, (i // columns) * height))
    return atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
