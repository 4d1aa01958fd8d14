"""The shapes-world quality benchmark: does the DMD2 student match its 25-step teacher?

Rows: the built-in teacher at 25 steps with CFG, the same teacher at 4 and at 1 step (what
naive few-step sampling gives), and the 4-step and 1-step DMD2 students distilled from it; with
``--methods dmd2,dmd,progressive`` also DMD (v1) and progressive-distillation students at 4 and
1 step, on the same compute budget in iterations × batch (the recipe's, 400 × 16). Each row is
one `dmd eval --fid shapes` call (FD-shapes, alignment, seconds and UNet evaluations per image,
on N procedural prompts); missing students are distilled first with `dmd distill`, and the
distillation's wall time is recorded beside the report.

    python benchmarks/shapes.py                              # 2000 samples, students in runs/
    python benchmarks/shapes.py --methods dmd2,dmd,progressive
    python benchmarks/shapes.py --teacher shapes-flow        # the flow-matching teacher and its students

Prints a Markdown table (for the README) and the DMD2 paper's targets, met or not. Reports
land in OUT/<row>/ (default benchmarks/results/shapes), the table in OUT/table.md; a row whose
student and report are already there is not made again (delete OUT/<row>/metrics.json to redo it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

GUIDANCE = 4.0  # the teacher rows' sampling CFG (the students' real score: the recipe's, 3 since 2026-12-07)
ITERATIONS = 400  # the shapes recipe's iterations (× batch 16): every student's budget
PROGRESSIVE_TEACHER_STEPS = 32  # first round's teacher: DDIM 32 steps with CFG, halved each round
DMD_PAIRS = 512  # DMD (v1)'s noise→image pairs (the paper: 25k–500k on real teachers)
METHOD_NAMES = {"dmd2": "DMD2", "dmd": "DMD (v1)", "progressive": "progressive"}


def run(cmd: list[str]) -> str:
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"benchmark: '{' '.join(cmd)}' failed with exit code {done.returncode}")
    return done.stdout


def progressive_rounds(steps: int) -> int:
    return (PROGRESSIVE_TEACHER_STEPS // steps).bit_length() - 1


def planned_iterations(method: str, steps: int, iterations: int) -> int:
    """What a run with this budget trains in all (progressive: whole rounds only)."""
    return (
        iterations if method != "progressive" else iterations // progressive_rounds(steps) * progressive_rounds(steps)
    )


def distill_args(method: str, steps: int, iterations: int, recipe: str = "shapes") -> list[str]:
    """`dmd distill` options of one student; progressive splits the budget over its rounds."""
    args = ["--recipe", recipe, "--method", method, "--steps", str(steps)]
    if method == "dmd":  # regression pairs: 25-step DDIM of the teacher, made once and cached
        return args + ["--iterations", str(iterations), "--pairs", str(DMD_PAIRS)]
    if method == "dmd2":
        return args + ["--iterations", str(iterations)]
    per_round = iterations // progressive_rounds(steps)
    return args + ["--teacher-steps", str(PROGRESSIVE_TEACHER_STEPS), "--iterations-per-round", str(per_round)]


def distill(run_dir: Path, method: str, steps: int, iterations: int, record: Path, recipe: str = "shapes") -> None:
    """Distill the student into `run_dir` unless it is there, extending a shorter DMD2/DMD run by
    --resume; the wall time (summed over extensions) goes to `record`."""
    done = json.loads(record.read_text()) if record.is_file() else None
    planned = planned_iterations(method, steps, iterations)
    if (run_dir / "student.safetensors").is_file() and (done is None or done["iterations"] >= planned):
        print(f"reusing the student in {run_dir}", file=sys.stderr)
        return
    if method != "progressive" and (run_dir / "config.toml").is_file():  # stopped earlier or shorter: continue it
        cmd = ["dmd", "distill", "--resume", "--out", str(run_dir), "--iterations", str(iterations)]
    else:
        cmd, done = (
            ["dmd", "distill", *distill_args(method, steps, iterations, recipe), "--out", str(run_dir), "--overwrite"],
            None,
        )
    start = time.perf_counter()
    summary = json.loads(run(cmd + ["--json", "--quiet"]).strip().splitlines()[-1])
    record.parent.mkdir(parents=True, exist_ok=True)
    (record.parent / "metrics.json").unlink(missing_ok=True)  # the student changed: score it again
    record.write_text(
        json.dumps(
            {
                "commands": (done["commands"] if done else []) + [" ".join(cmd)],
                "iterations": summary.get("iterations"),
                "seconds": round(time.perf_counter() - start + (done["seconds"] if done else 0.0), 1),
            }
        )
        + "\n"
    )


def evaluate(model: str, out: Path, num_samples: int, steps: int | None, guidance: float | None) -> dict:
    """The row's metrics: from OUT/metrics.json when an earlier call scored the same model and N."""
    cmd = [
        "dmd",
        "eval",
        "--model",
        model,
        "--fid",
        "shapes",
        "--num-samples",
        str(num_samples),
        "--batch-size",
        "64",
        "--out",
        str(out),
        "--overwrite",
        "--json",
        "--quiet",
    ]
    cmd += ["--steps", str(steps)] if steps else []
    cmd += ["--guidance-scale", str(guidance)] if guidance is not None else []
    saved, key = out / "metrics.json", [a for a in cmd if a != str(out)]  # a copied row folder is reused too
    previous = json.loads(saved.read_text()) if saved.is_file() else {}
    if previous.get("command") == key:
        print(f"reusing {saved}", file=sys.stderr)
        return previous["metrics"]
    metrics = json.loads(run(cmd).strip().splitlines()[-1])["metrics"]
    saved.write_text(json.dumps({"command": key, "metrics": metrics}) + "\n")
    return metrics


def targets(rows: dict[str, dict]) -> list[tuple[str, bool]]:
    """The issue's targets, from the DMD2 paper's claim that a student can beat its teacher."""
    teacher, s4, s1 = rows["teacher 25 steps"], rows["DMD2 4 steps"], rows["DMD2 1 step"]
    return [
        ("4-step student FD-shapes ≤ 25-step teacher's", s4["fd_shapes"] <= teacher["fd_shapes"]),
        ("1-step student FD-shapes ≤ 1.5 × 25-step teacher's", s1["fd_shapes"] <= 1.5 * teacher["fd_shapes"]),
        (
            "students' alignment ≥ teacher's − 3 points",
            min(s4["alignment"], s1["alignment"]) >= teacher["alignment"] - 0.03,
        ),
        (
            "students ≥ 10× faster per image than the 25-step CFG teacher",
            max(s4["seconds_per_image"], s1["seconds_per_image"]) * 10 <= teacher["seconds_per_image"],
        ),
    ]


def table(rows: dict[str, dict], training: dict[str, dict]) -> str:
    lines = [
        "| model | FD-shapes ↓ | alignment ↑ | s / image | UNet evals / image | distillation (CPU, 2 threads) |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, m in rows.items():
        t = training.get(name)
        cost = f"{t['iterations']} its × 16, {t['seconds'] / 60:.1f} min" if t else ""
        lines.append(
            f"| {name} | {m['fd_shapes']:.2f} | {100 * m['alignment']:.1f}% | "
            f"{m['seconds_per_image']:.4f} | {m['nfe_per_image']:g} | {cost} |"
        )
    return "\n".join(lines)


def step_name(steps: int) -> str:
    return f"{steps} step{'s' if steps > 1 else ''}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--teacher",
        choices=("shapes", "shapes-flow"),
        default="shapes",
        help="the built-in teacher (UNet or flow-matching transformer); students use the recipe of its name",
    )
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--methods", default="dmd2", help="students to compare: a comma list of dmd2, dmd, progressive")
    p.add_argument(
        "--runs",
        type=Path,
        default=Path("runs"),
        help="students in RUNS/<teacher>-<method>-<steps>step (distilled if missing)",
    )
    p.add_argument("--iterations", type=int, default=ITERATIONS, help="each student's training iterations (batch 16)")
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/<teacher>")
    args = p.parse_args(argv)
    teacher = args.teacher
    args.out = args.out or Path("benchmarks/results") / teacher
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "dmd2" not in methods or any(m not in METHOD_NAMES for m in methods):
        p.error(f"--methods must list dmd2 and any of {', '.join(METHOD_NAMES)} (got {args.methods!r})")

    plan = {  # row: (model, steps, CFG)
        "teacher 25 steps": (teacher, 25, GUIDANCE),
        "teacher 4 steps": (teacher, 4, GUIDANCE),
        "teacher 1 step": (teacher, 1, GUIDANCE),
    }
    for method in methods:
        for steps in (4, 1):
            name, run_dir = f"{METHOD_NAMES[method]} {step_name(steps)}", args.runs / f"{teacher}-{method}-{steps}step"
            distill(run_dir, method, steps, args.iterations, args.out / slug(name) / "distill.json", teacher)
            plan[name] = (str(run_dir), None, None)
    rows = {
        name: evaluate(model, args.out / slug(name), args.num_samples, steps, cfg)
        for name, (model, steps, cfg) in plan.items()
    }
    training = {
        name: json.loads((args.out / slug(name) / "distill.json").read_text())
        for name in rows
        if (args.out / slug(name) / "distill.json").is_file()
    }
    print(f"shapes world, teacher {teacher}, {args.num_samples} prompts, teacher CFG {GUIDANCE:g}\n")
    print(table(rows, training))
    print()
    for text, met in targets(rows):
        print(f"- {'met' if met else 'MISSED'}: {text}")
    (args.out / "table.md").write_text(table(rows, training) + "\n")
    return 0


def slug(name: str) -> str:
    return name.replace(" ", "-").replace("(", "").replace(")", "")


# -- shared by shapes_seeds.py and shapes_checkpoints.py: variants of the recipe, one row each --


def parse_variants(parser: argparse.ArgumentParser, given: list[str]) -> dict[str, str]:
    """`--variant NAME=OPTIONS` values → {name: the `dmd distill` options it adds}."""
    if any("=" not in v for v in given):
        parser.error("--variant takes NAME=OPTIONS, e.g. \"lr 5e-5=--lr 5e-5\" (NAME= for the recipe as it is)")
    return dict(v.split("=", 1) for v in given)


def publish_spread(
    scores: dict[str, list[dict]], columns: list[str], title: str, out: Path, name: str = "table.md"
) -> int:
    """Print the spread table under `title` and keep it as OUT/<name>."""
    text = f"{title}\n\n{spread_table(scores, columns)}"
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(text + "\n")
    return 0


def spread_table(scores: dict[str, list[dict]], columns: list[str]) -> str:
    """A Markdown row per variant: FD-shapes / alignment per column, then their mean and range, then the network
    evaluations and the seconds per image (mean over the columns: timings move with the machine's load)."""
    lines = [
        "| variant | " + " | ".join(columns) + " | mean | range | NFE / image | s / image |",
        "| --- | " + " | ".join("---:" for _ in columns) + " | ---: | ---: | ---: | ---: |",
    ]
    for name, rows in scores.items():
        fd, align = [r["fd_shapes"] for r in rows], [100 * r["alignment"] for r in rows]
        cells = [f"{f:.2f} / {a:.1f}%" for f, a in zip(fd, align)]
        nfe = statistics.mean(r["nfe_per_image"] for r in rows)
        seconds = statistics.mean(r["seconds_per_image"] for r in rows)
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {statistics.mean(fd):.2f} / {statistics.mean(align):.1f}% | "
            f"{min(fd):.2f}–{max(fd):.2f} / {min(align):.1f}–{max(align):.1f}% | {nfe:g} | {seconds:.4f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
