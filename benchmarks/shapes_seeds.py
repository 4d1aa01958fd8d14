"""How far does a shapes student's score move with the training seed alone?

One `shapes.py` row is one student, trained from seed 0. This trains the same student from
several seeds, for one or more variants of the recipe (extra `dmd distill` options), scores each
with `dmd eval --fid shapes` on the benchmark's 2,000 prompts, and prints every score with each
variant's mean and range: a difference between two variants means something only where it is
larger than the spread of one.

    python benchmarks/shapes_seeds.py --variant "lr 1e-4=--lr 1e-4" --variant "lr 5e-5=--lr 5e-5" --seeds 0,1,2,3

Students land in RUNS/<variant>-seed<N> and are reused when there; reports in OUT/<variant>-seed<N>/.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from shapes import evaluate, parse_variants, publish_spread, run, slug


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--variant",
        action="append",
        required=True,
        metavar="NAME=OPTIONS",
        help="a name and the `dmd distill` options it adds to the recipe (repeatable)",
    )
    p.add_argument("--recipe", default="shapes", help="the recipe the variants change (shapes-flow: the flow teacher)")
    p.add_argument("--seeds", default="0,1,2,3", help="training seeds, a comma list")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--runs", type=Path, default=Path("runs/seeds"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/shapes-seeds"))
    p.add_argument(
        "--table", default="table.md", help="the table's file name in OUT (several tables can share one OUT's reports)"
    )
    args = p.parse_args(argv)
    variants = parse_variants(p, args.variant)
    seeds = [int(s) for s in args.seeds.split(",")]

    scores: dict[str, list[dict]] = {}
    for name, options in variants.items():
        for seed in seeds:
            label = f"{slug(name)}-seed{seed}"
            student = args.runs / label
            if not (student / "student.safetensors").is_file():
                run(
                    [
                        "dmd",
                        "distill",
                        "--recipe",
                        args.recipe,
                        *shlex.split(options),
                        "--seed",
                        str(seed),
                        "--out",
                        str(student),
                        "--overwrite",
                        "--json",
                        "--quiet",
                    ]
                )
            scores.setdefault(name, []).append(evaluate(str(student), args.out / label, args.num_samples, None, None))

    title = f"FD-shapes / alignment, {args.num_samples} prompts, one student per cell"
    return publish_spread(scores, [f"seed {s}" for s in seeds], title, args.out, args.table)


if __name__ == "__main__":
    sys.exit(main())
