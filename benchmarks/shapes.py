"""The shapes-world quality benchmark: does the DMD2 student match its 25-step teacher?

Rows: the built-in teacher at 25 steps with CFG, the same teacher at 4 and at 1 step (what
naive few-step sampling gives), and the 4-step and 1-step students distilled from it. Each row
is one `dmd eval --fid shapes` call (FD-shapes, alignment, seconds and UNet evaluations per
image, on N procedural prompts); missing students are distilled first with `dmd distill`.

    python benchmarks/shapes.py                              # 2000 samples, students in runs/
    python benchmarks/shapes.py --num-samples 500 --student-iterations 400

Prints a Markdown table (for the README) and the DMD2 paper's targets, met or not. Reports
land in OUT/<row>/ (default benchmarks/results/shapes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

GUIDANCE = 4.0  # the shapes recipe's real-score CFG, and the teacher rows' sampling CFG


def run(cmd: list[str]) -> str:
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"benchmark: '{' '.join(cmd)}' failed with exit code {done.returncode}")
    return done.stdout


def distill(run_dir: Path, steps: int, iterations: int | None) -> None:
    if (run_dir / "student.safetensors").is_file():
        print(f"reusing the student in {run_dir}", file=sys.stderr)
        return
    if (run_dir / "config.toml").is_file():  # stopped earlier: continue it
        cmd = ["dmd", "distill", "--resume", "--out", str(run_dir)]
    else:
        cmd = ["dmd", "distill", "--recipe", "shapes", "--steps", str(steps), "--out", str(run_dir)]
    run(cmd + (["--iterations", str(iterations)] if iterations else []))


def evaluate(model: str, out: Path, num_samples: int, steps: int | None, guidance: float | None) -> dict:
    cmd = ["dmd", "eval", "--model", model, "--fid", "shapes", "--num-samples", str(num_samples),
           "--batch-size", "64", "--out", str(out), "--overwrite", "--json", "--quiet"]
    cmd += ["--steps", str(steps)] if steps else []
    cmd += ["--guidance-scale", str(guidance)] if guidance is not None else []
    return json.loads(run(cmd).strip().splitlines()[-1])["metrics"]


def targets(rows: dict[str, dict]) -> list[tuple[str, bool]]:
    """The issue's targets, from the DMD2 paper's claim that a student can beat its teacher."""
    teacher, s4, s1 = rows["teacher 25 steps"], rows["student 4 steps"], rows["student 1 step"]
    return [
        ("4-step student FD-shapes ≤ 25-step teacher's", s4["fd_shapes"] <= teacher["fd_shapes"]),
        ("1-step student FD-shapes ≤ 1.5 × 25-step teacher's", s1["fd_shapes"] <= 1.5 * teacher["fd_shapes"]),
        ("students' alignment ≥ teacher's − 3 points",
         min(s4["alignment"], s1["alignment"]) >= teacher["alignment"] - 0.03),
        ("students ≥ 10× faster per image than the 25-step CFG teacher",
         max(s4["seconds_per_image"], s1["seconds_per_image"]) * 10 <= teacher["seconds_per_image"]),
    ]


def table(rows: dict[str, dict]) -> str:
    lines = ["| model | FD-shapes ↓ | alignment ↑ | s / image | UNet evals / image |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, m in rows.items():
        lines.append(f"| {name} | {m['fd_shapes']:.2f} | {100 * m['alignment']:.1f}% | "
                     f"{m['seconds_per_image']:.4f} | {m['nfe_per_image']:g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--student-4", type=Path, default=Path("runs/shapes-4step"), help="4-step run (distilled if missing)")
    p.add_argument("--student-1", type=Path, default=Path("runs/shapes-1step"), help="1-step run (distilled if missing)")
    p.add_argument("--student-iterations", type=int, default=None, help="iterations of missing students (recipe's)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/shapes"))
    args = p.parse_args(argv)

    distill(args.student_4, 4, args.student_iterations)
    distill(args.student_1, 1, args.student_iterations)
    plan = {  # row: (model, steps, CFG)
        "teacher 25 steps": ("shapes", 25, GUIDANCE),
        "teacher 4 steps": ("shapes", 4, GUIDANCE),
        "teacher 1 step": ("shapes", 1, GUIDANCE),
        "student 4 steps": (str(args.student_4), None, None),
        "student 1 step": (str(args.student_1), None, None),
    }
    rows = {name: evaluate(model, args.out / name.replace(" ", "-"), args.num_samples, steps, cfg)
            for name, (model, steps, cfg) in plan.items()}
    print(f"shapes world, {args.num_samples} prompts, teacher CFG {GUIDANCE:g}\n")
    print(table(rows))
    print()
    for text, met in targets(rows):
        print(f"- {'met' if met else 'MISSED'}: {text}")
    (args.out / "table.md").write_text(table(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
