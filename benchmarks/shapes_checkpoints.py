"""How does a shapes student's score move over one run? Every checkpoint scored.

Trains each variant of the shapes recipe (extra `dmd distill` options) for ITERATIONS, keeping
every checkpoint, then scores each checkpoint with `dmd eval --model RUN/checkpoints/iter-N
--fid shapes` on the benchmark's 2,000 prompts, and prints a row per variant: whether training
longer helps, and how far one checkpoint lies from the next.

    python benchmarks/shapes_checkpoints.py --variant "recipe=" --variant "diffusion GAN=--diffusion-gan" \
        --variant "no GAN=--gan-generator-weight 0 --gan-discriminator-weight 0" --iterations 1200 --every 200

Runs land in RUNS/<variant> and are reused when their checkpoints are there; each checkpoint's
report is the one `dmd eval` writes into the run folder (eval-shapes-N-iter-N.json), reused too.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from shapes import parse_variants, publish_spread, run, slug


def checkpoint(run_folder: Path, iteration: int) -> Path:
    return run_folder / "checkpoints" / f"iter-{iteration:06d}"


def score(run_folder: Path, iteration: int, num_samples: int) -> dict:
    report = run_folder / f"eval-shapes-{num_samples}-iter-{iteration:06d}.json"
    if report.is_file():
        print(f"reusing {report}", file=sys.stderr)
        return json.loads(report.read_text())["metrics"]
    out = run(
        [
            "dmd",
            "eval",
            "--model",
            str(checkpoint(run_folder, iteration)),
            "--fid",
            "shapes",
            "--num-samples",
            str(num_samples),
            "--batch-size",
            "64",
            "--json",
            "--quiet",
        ]
    )
    return json.loads(out.strip().splitlines()[-1])["metrics"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--variant",
        action="append",
        required=True,
        metavar="NAME=OPTIONS",
        help="a name and the `dmd distill` options it adds to the shapes recipe (repeatable; NAME= for none)",
    )
    p.add_argument("--iterations", type=int, default=1200)
    p.add_argument("--every", type=int, default=200, help="score every N-th iteration's checkpoint")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--runs", type=Path, default=Path("runs/checkpoints"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/shapes-checkpoints"))
    args = p.parse_args(argv)
    variants = parse_variants(p, args.variant)
    iterations = list(range(args.every, args.iterations + 1, args.every))

    scores: dict[str, list[dict]] = {}
    for name, options in variants.items():
        folder = args.runs / slug(name)
        if not all(checkpoint(folder, i).is_dir() for i in iterations):
            run(
                [
                    "dmd",
                    "distill",
                    "--recipe",
                    "shapes",
                    *shlex.split(options),
                    "--iterations",
                    str(args.iterations),
                    "--checkpoint-every",
                    str(args.every),
                    "--keep-checkpoints",
                    str(len(iterations)),
                    "--out",
                    str(folder),
                    "--overwrite",
                    "--json",
                    "--quiet",
                ]
            )
        scores[name] = [score(folder, i, args.num_samples) for i in iterations]

    title = (
        f"FD-shapes / alignment of each checkpoint, {args.num_samples} prompts, "
        "training seed 0 unless the variant sets one"
    )
    return publish_spread(scores, [f"{i} its" for i in iterations], title, args.out)


if __name__ == "__main__":
    sys.exit(main())
