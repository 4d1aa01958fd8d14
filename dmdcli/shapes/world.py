"""The shapes world: a procedural caption → image data set, deterministic from a seed.

A scene is a background color and one or two objects, each in its own quadrant of the image::

    object = (shape, color, size, position)
    shape      circle, square, triangle, cross
    color      red, orange, yellow, green, blue, purple
    size       small, large
    position   top left, top right, bottom left, bottom right
    background white, black, gray

Its caption comes from one template, objects in reading order (top left first)::

    a small red circle at the top left on a white background
    a large blue square at the top right and a small green cross at the bottom left on a gray background

Each object is also nudged by a small random offset (at most 5% of the image side, in x and y)
that the caption does not mention, so images of one caption differ a little.

Rendering draws at 4× the output size with PIL and downsamples with a box filter (anti-aliased,
and deterministic: no randomness outside the scene). Scene ``i`` of seed ``s`` is drawn from
``numpy.random.default_rng([s, i])``, so the first k scenes of a seed never depend on how many
are asked for.

Command line::

    python -m dmdcli.shapes.world OUT_DIR [--n 1000] [--seed 0] [--size 32] [--metadata]
        [--prompts FILE]

writes ``OUT_DIR/00000.png`` + ``00000.txt`` (or one ``metadata.jsonl``) — the ``--data``
layout — and, with ``--prompts``, the same captions one a line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (240, 220, 20),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "purple": (150, 40, 190),
}
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}

#: Probability that a sampled scene has two objects (else one).
TWO_OBJECT_PROB = 0.5
#: Default image side in pixels.
RESOLUTION = 32

# Geometry in units of the image side.
_CENTERS = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
_RADIUS = {"small": 0.095, "large": 0.17}
_MAX_OFFSET = 0.05  # |dx|, |dy|: a large shape stays inside its quadrant
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Obj:
    """One shape in the scene (all four attributes are named in the caption)."""

    shape: str
    color: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    """Background and 1-2 objects in distinct quadrants, sorted in POSITIONS order.

    ``offsets`` (one (dx, dy) per object, units of the image side) only affect rendering; a
    scene parsed from a caption has none (objects drawn at their quadrant centers).
    """

    objects: tuple[Obj, ...]
    background: str
    offsets: tuple[tuple[float, float], ...] = ()

    def attributes(self) -> tuple[tuple[Obj, ...], str]:
        """What the caption says: equal for two scenes iff their captions are equal."""
        return self.objects, self.background

    def at(self, position: str) -> Obj | None:
        """The object in quadrant ``position``, or None."""
        return next((o for o in self.objects if o.position == position), None)


# ----------------------------------------------------------------------------- sampling


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene: uniform attributes, two objects with probability TWO_OBJECT_PROB."""
    n = 2 if rng.random() < TWO_OBJECT_PROB else 1
    places = sorted(rng.choice(len(POSITIONS), size=n, replace=False).tolist())
    objects, offsets = [], []
    for p in places:
        objects.append(
            Obj(
                shape=SHAPES[rng.integers(len(SHAPES))],
                color=tuple(COLORS)[rng.integers(len(COLORS))],
                size=SIZES[rng.integers(len(SIZES))],
                position=POSITIONS[p],
            )
        )
        dx, dy = rng.uniform(-_MAX_OFFSET, _MAX_OFFSET, size=2)
        offsets.append((round(float(dx), 4), round(float(dy), 4)))
    background = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    return Scene(tuple(objects), background, tuple(offsets))


def scene_at(seed: int, index: int) -> Scene:
    """Scene ``index`` of the stream of ``seed``."""
    return sample_scene(np.random.default_rng([seed, index]))


def scenes(seed: int, n: int, start: int = 0) -> list[Scene]:
    """Scenes ``start .. start + n - 1`` of the stream of ``seed``."""
    return [scene_at(seed, i) for i in range(start, start + n)]


# ----------------------------------------------------------------------------- captions


def caption(scene: Scene) -> str:
    """The scene's caption (the one template; see the module docstring)."""
    parts = [f"a {o.size} {o.color} {o.shape} at the {o.position}" for o in scene.objects]
    return " and ".join(parts) + f" on a {scene.background} background"


_ALT = lambda words: "|".join(re.escape(w) for w in words)  # noqa: E731
_OBJ_RE = re.compile(rf"an? ({_ALT(SIZES)}) ({_ALT(COLORS)}) ({_ALT(SHAPES)}) at the ({_ALT(POSITIONS)})")
_CAPTION_RE = re.compile(rf"^({_OBJ_RE.pattern})( and ({_OBJ_RE.pattern}))? on an? ({_ALT(BACKGROUNDS)}) background$")


def parse_caption(text: str) -> Scene:
    """The scene a caption describes (no offsets). Raises ValueError for other text.

    Case and runs of whitespace are ignored; objects may come in any order but must be in
    distinct quadrants.
    """
    clean = " ".join(text.lower().split()).rstrip(".")
    match = _CAPTION_RE.match(clean)
    if match is None:
        raise ValueError(f"not a shapes-world caption: {text!r}")
    objects = [Obj(shape=m[3], color=m[2], size=m[1], position=m[4]) for m in _OBJ_RE.finditer(clean)]
    if len({o.position for o in objects}) != len(objects):
        raise ValueError(f"two objects in one place: {text!r}")
    objects.sort(key=lambda o: POSITIONS.index(o.position))
    return Scene(tuple(objects), match.groups()[-1])


# ----------------------------------------------------------------------------- rendering


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[list[tuple[float, float]]]:
    """Polygons (pixel coordinates) whose union is the shape of radius ``r`` at (cx, cy)."""
    if shape == "square":
        h = 0.85 * r
        return [[(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]]
    if shape == "triangle":  # upward, inscribed in a circle of radius 1.1 r, centred vertically
        R = 1.1 * r
        angles = np.deg2rad([-90.0, 30.0, 150.0])
        dy = 0.25 * R  # move the centroid-based triangle down so its box is centred
        return [[(cx + R * np.cos(a), cy + R * np.sin(a) + dy) for a in angles]]
    if shape == "cross":
        w = 0.36 * r
        return [
            [(cx - r, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx - r, cy + w)],
            [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy + r), (cx - w, cy + r)],
        ]
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = RESOLUTION) -> Image.Image:
    """The scene as a ``size`` × ``size`` RGB PIL image (anti-aliased by 4× supersampling)."""
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    offsets = scene.offsets or ((0.0, 0.0),) * len(scene.objects)
    for obj, (dx, dy) in zip(scene.objects, offsets):
        ux, uy = _CENTERS[obj.position]
        cx, cy, r = (ux + dx) * big, (uy + dy) * big, _RADIUS[obj.size] * big
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            for poly in _polygon(obj.shape, cx, cy, r):
                draw.polygon(poly, fill=fill)
    return img.resize((size, size), Image.Resampling.BOX)


def render_array(scenes_: list[Scene], size: int = RESOLUTION) -> np.ndarray:
    """Scenes rendered as uint8 [N, size, size, 3]."""
    return np.stack([np.asarray(render(s, size)) for s in scenes_])


# ----------------------------------------------------------------------------- labels


def scene_labels(scene: Scene) -> np.ndarray:
    """Integer targets for the feature network, int64 [13].

    ``[background, (shape, color, size) for each quadrant in POSITIONS order]``; an empty
    quadrant has shape 0 ("none"; shapes are 1..4) and color = size = -1 (ignored).
    """
    labels = [list(BACKGROUNDS).index(scene.background)]
    for position in POSITIONS:
        o = scene.at(position)
        if o is None:
            labels += [0, -1, -1]
        else:
            labels += [SHAPES.index(o.shape) + 1, list(COLORS).index(o.color), SIZES.index(o.size)]
    return np.asarray(labels, dtype=np.int64)


def scene_from_labels(labels) -> Scene:
    """Inverse of ``scene_labels`` (color and size of empty quadrants are ignored)."""
    labels = [int(v) for v in labels]
    objects = []
    for q, position in enumerate(POSITIONS):
        shape, color, size = labels[1 + 3 * q : 4 + 3 * q]
        if shape > 0:
            objects.append(Obj(SHAPES[shape - 1], list(COLORS)[color], SIZES[size], position))
    return Scene(tuple(objects), list(BACKGROUNDS)[labels[0]])


# ----------------------------------------------------------------------------- files


def write_dataset(folder: str | Path, n: int, seed: int = 0, size: int = RESOLUTION, metadata: bool = False) -> Path:
    """Write scenes 0..n-1 of ``seed`` as ``NNNNN.png`` with captions into ``folder``.

    Captions go in a ``.txt`` beside each image, or with ``metadata=True`` in one
    ``metadata.jsonl`` (``file_name`` + ``text``): both are layouts ``--data`` reads.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(n - 1)))
    records = []
    for i, scene in enumerate(scenes(seed, n)):
        name = f"{i:0{width}d}.png"
        render(scene, size).save(folder / name, optimize=False)
        if metadata:
            records.append(json.dumps({"file_name": name, "text": caption(scene)}))
        else:
            (folder / name).with_suffix(".txt").write_text(caption(scene) + "\n", encoding="utf-8")
    if metadata:
        (folder / "metadata.jsonl").write_text("\n".join(records) + "\n", encoding="utf-8")
    return folder


def write_prompts(path: str | Path, n: int, seed: int = 0) -> Path:
    """Write the captions of scenes 0..n-1 of ``seed``, one a line (a ``--prompts`` file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(caption(s) + "\n" for s in scenes(seed, n)), encoding="utf-8")
    return path


def iter_vocabulary() -> Iterator[str]:
    """Every word a caption can contain, once each, in a fixed order."""
    seen: set[str] = set()
    words = ["a", "an", "at", "the", "and", "on", "background"]
    for group in (SIZES, COLORS, SHAPES, POSITIONS, BACKGROUNDS):
        for phrase in group:
            words += phrase.split()
    for w in words:
        if w not in seen:
            seen.add(w)
            yield w


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dmdcli.shapes.world", description="Write shapes-world images with captions."
    )
    parser.add_argument("out_dir")
    parser.add_argument("--n", type=int, default=1000, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=RESOLUTION, help="image side in pixels")
    parser.add_argument("--metadata", action="store_true", help="one metadata.jsonl, not .txt files")
    parser.add_argument("--prompts", help="also write the captions to this file, one a line")
    args = parser.parse_args(argv)
    write_dataset(args.out_dir, args.n, args.seed, args.size, args.metadata)
    if args.prompts:
        write_prompts(args.prompts, args.n, args.seed)
    print(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
