"""Checkpoints, exact resume, interruption, non-finite losses and bad input for `dmd distill`."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from typer.testing import CliRunner

from dmdcli.cli import app
from dmdcli.core.dmd2 import DMD2
from dmdcli.train.checkpoint import complete_checkpoints
from dmdcli.train.grids import diversity

runner = CliRunner()
BASE = [
    "distill",
    "--recipe",
    "tiny",
    "--batch-size",
    "2",
    "--log-every",
    "1",
    "--sample-every",
    "0",
    "--teacher-grid-steps",
    "2",
    "--checkpoint-every",
    "0",
    "--quiet",
]


def distill(*args):
    return runner.invoke(app, [*BASE, *map(str, args)])


def checkpoint_tensors(out):
    return load_file(complete_checkpoints(out)[-1] / "tensors.safetensors")


def assert_same_tensors(a, b, skip=("rng.",)):
    keys = [k for k in a if not k.startswith(skip)]
    assert keys and sorted(keys) == sorted(k for k in b if not k.startswith(skip))
    different = [k for k in keys if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize(
    "options",
    [[], ["--lora-rank", "4", "--lora-alpha", "8"], ["--batch-size", "1", "--gradient-accumulation-steps", "2"]],
    ids=["full", "lora", "accumulated"],
)
def test_resume_is_bit_exact(tmp_path, tiny_sdxl, prompts_file, image_folder, options):
    common = [
        "--teacher",
        tiny_sdxl,
        "--prompts",
        prompts_file,
        "--data",
        image_folder,
        "--steps",
        "2",
        "--fake-updates-per-gen",
        "2",
        "--diffusion-gan",
        *options,
    ]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert distill(*common, "--iterations", 6, "--out", whole).exit_code == 0
    assert distill(*common, "--iterations", 3, "--out", part).exit_code == 0
    resumed = runner.invoke(app, ["distill", "--out", str(part), "--resume", "--iterations", "6", "--quiet", "--json"])
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads(resumed.stdout)["iterations"] == 6
    assert_same_tensors(checkpoint_tensors(whole), checkpoint_tensors(part), skip=())  # RNG states included
    assert_same_tensors(load_file(whole / "student.safetensors"), load_file(part / "student.safetensors"))
    iterations = [json.loads(line)["iteration"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [i for i in iterations if i > 0] == sorted(i for i in iterations if i > 0)  # no duplicates after resume


def test_the_fused_optimizer_trains_the_same_student_and_older_runs_resume_without_it(tmp_path, tiny_sd, prompts_file):
    from diffusers import UNet2DConditionModel

    loop_recipe = tmp_path / "loop.toml"
    loop_recipe.write_text('extends = "tiny"\nfused_optimizer = false\n')
    common = [
        "--teacher",
        tiny_sd,
        "--prompts",
        prompts_file,
        "--steps",
        "1",
        "--fake-updates-per-gen",
        "2",
        "--lr",
        "1e-3",
    ]
    fused, loop, old = tmp_path / "fused", tmp_path / "loop", tmp_path / "old"
    assert distill(*common, "--iterations", 6, "--out", fused).exit_code == 0
    assert distill(*common, "--recipe", loop_recipe, "--iterations", 6, "--out", loop).exit_code == 0
    assert "fused_optimizer = false" in (loop / "config.toml").read_text()
    teacher = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").state_dict()
    a, b = load_file(fused / "student.safetensors"), load_file(loop / "student.safetensors")
    moved = sum(((a[k] - teacher[k]) ** 2).sum() for k in a).sqrt()
    apart = sum(((a[k] - b[k]) ** 2).sum() for k in a).sqrt()
    assert moved > 1e-3 and apart < 1e-2 * moved  # the same AdamW, other float rounding

    # A run from before the key existed (its config.toml lacks it) used torch's default AdamW: resumed so.
    assert distill(*common, "--recipe", loop_recipe, "--iterations", 3, "--out", old).exit_code == 0
    config = old / "config.toml"
    config.write_text(
        "".join(line for line in config.read_text().splitlines(True) if not line.startswith("fused_optimizer"))
    )
    for state_file in (old / "checkpoints").glob("*/state.json"):  # the configuration each checkpoint records
        state = json.loads(state_file.read_text())
        del state["config"]["fused_optimizer"]
        state_file.write_text(json.dumps(state))
    resumed = runner.invoke(app, ["distill", "--out", str(old), "--resume", "--iterations", "6", "--quiet"])
    assert resumed.exit_code == 0, resumed.stderr
    assert_same_tensors(load_file(loop / "student.safetensors"), load_file(old / "student.safetensors"))


def test_checkpoints_are_pruned_and_rotated(tmp_path, tiny_sd, prompts_file):
    out = tmp_path / "run"
    assert (
        distill(
            "--teacher",
            tiny_sd,
            "--prompts",
            prompts_file,
            "--iterations",
            5,
            "--checkpoint-every",
            1,
            "--keep-checkpoints",
            2,
            "--out",
            out,
        ).exit_code
        == 0
    )
    assert [p.name for p in complete_checkpoints(out)] == ["iter-000004", "iter-000005"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names synced descriptors through /proc")
def test_a_checkpoint_is_on_disk_before_it_is_published(tmp_path, monkeypatch):
    """A rename is atomic, not durable: its files and the folder entries are synced before and after."""
    import dmdcli.files
    from dmdcli.train.checkpoint import staging_dir, write_checkpoint, write_rng

    synced = []
    monkeypatch.setattr(dmdcli.files.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
    run = tmp_path / "run"
    staged = staging_dir(run, 3)
    staged.mkdir(parents=True)
    write_rng(staged, 0)
    final = write_checkpoint(run, 3, {"x": torch.ones(2)}, {"note": 1}, keep=1, staged=staged)
    root = str(run / "checkpoints")
    assert synced[-1] == root  # the rename's entry, last
    before = [Path(p) for p in synced[:-1]]
    assert {p.parent.name for p in before if p.name != before[-1].name} == {
        before[-1].name
    }  # all in the temporary folder
    assert before[-1].name.startswith(".tmp-iter-000003") and str(before[-1].parent) == root
    assert sorted(p.name for p in before[:-1]) == sorted(p.name for p in final.iterdir())


def test_a_checkpoint_missing_a_processes_rng_state_is_not_published(tmp_path):
    from dmdcli.errors import DmdError
    from dmdcli.train.checkpoint import staging_dir, write_checkpoint, write_rng

    run = tmp_path / "run"
    staged = staging_dir(run, 3)
    staged.mkdir(parents=True)
    write_rng(staged, 0)  # process 1 wrote to a run folder of its own node
    with pytest.raises(DmdError, match=r"RNG state of process\(es\) 1 is not in .*every node shares"):
        write_checkpoint(run, 3, {"x": torch.ones(2)}, {}, keep=1, staged=staged, processes=2)
    assert complete_checkpoints(run) == []
    write_rng(staged, 1)
    assert (
        write_checkpoint(run, 3, {"x": torch.ones(2)}, {}, keep=1, staged=staged, processes=2)
        == complete_checkpoints(run)[0]
    )


KILLER = textwrap.dedent("""
    import os, sys, time
    import dmdcli.train.checkpoint as ck
    marker = sys.argv[1]
    real_save = ck.save_file
    calls = {"n": 0}
    def save_then_hang(tensors, path, *a, **k):
        real_save(tensors, path, *a, **k)
        calls["n"] += str(path).endswith("tensors.safetensors")
        if calls["n"] == 3:                      # the third checkpoint: killed half-way through
            with open(marker, "w") as f:
                f.write("in checkpoint")
            time.sleep(600)
    ck.save_file = save_then_hang
    from dmdcli.cli import main
    sys.argv = ["dmd"] + sys.argv[2:]
    main()
""")


def test_sigkill_during_a_checkpoint_resumes_from_the_previous_one(tmp_path, tiny_sd, prompts_file):
    out, marker = tmp_path / "run", tmp_path / "marker"
    args = [
        *BASE,
        "--teacher",
        str(tiny_sd),
        "--prompts",
        str(prompts_file),
        "--iterations",
        "8",
        "--checkpoint-every",
        "2",
        "--keep-checkpoints",
        "5",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", KILLER, str(marker), *args], env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
    deadline = time.time() + 300
    while not marker.exists():
        assert child.poll() is None, log.read_text()
        assert time.time() < deadline, "the run never reached its third checkpoint"
        time.sleep(0.2)
    child.send_signal(signal.SIGKILL)
    child.wait()
    # Iterations 2 and 4 are complete; the one of iteration 6 was cut short and is invisible.
    assert [p.name for p in complete_checkpoints(out)] == ["iter-000002", "iter-000004"]
    assert any(p.name.startswith(".tmp-iter-000006") for p in (out / "checkpoints").iterdir())
    resumed = runner.invoke(app, ["distill", "--out", str(out), "--resume", "--json", "--quiet"])
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads(resumed.stdout)["iterations"] == 8
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # the cut-short write: removed
    whole = tmp_path / "whole"
    assert distill("--teacher", tiny_sd, "--prompts", prompts_file, "--iterations", 8, "--out", whole).exit_code == 0
    assert_same_tensors(load_file(whole / "student.safetensors"), load_file(out / "student.safetensors"))


def interrupt_at(monkeypatch, iteration):
    """Press Ctrl-C during `iteration` (from 1); undo() puts the real objective back."""
    real = DMD2.fake_score_losses
    calls = {"n": 0}

    def interrupting(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == iteration:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: handled between iterations
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DMD2, "fake_score_losses", interrupting)
    return lambda: monkeypatch.setattr(DMD2, "fake_score_losses", real)


def test_sigint_checkpoints_and_exits_130(tmp_path, tiny_sd, prompts_file, monkeypatch):
    undo = interrupt_at(monkeypatch, 3)
    out = tmp_path / "run"
    result = distill("--teacher", tiny_sd, "--prompts", prompts_file, "--iterations", 10, "--out", out)
    assert result.exit_code == 130, result.stderr
    assert "interrupted at iteration 3" in result.stderr and "--resume" in result.stderr
    assert [p.name for p in complete_checkpoints(out)] == ["iter-000003"]
    assert (out / "student.safetensors").is_file()
    undo()
    assert runner.invoke(app, ["distill", "--out", str(out), "--resume", "--quiet"]).exit_code == 0
    assert complete_checkpoints(out)[-1].name == "iter-000010"
    # The metrics a resumed run logs are the straight run's, the generator's last losses included
    # on the lines between its updates (TTUR 5: the resumed lines 4 and 5 carry iteration 1's).
    whole = tmp_path / "whole"
    assert distill("--teacher", tiny_sd, "--prompts", prompts_file, "--iterations", 10, "--out", whole).exit_code == 0
    timeless = lambda run: [
        {k: v for k, v in json.loads(line).items() if k != "sec_per_iter"}  # noqa: E731
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    assert timeless(out) == timeless(whole) and "loss_dm" in timeless(out)[4]


def test_a_stop_asked_during_the_last_iteration_finishes_the_run(tmp_path, tiny_sd, prompts_file, monkeypatch):
    interrupt_at(monkeypatch, 3)
    out = tmp_path / "run"
    result = distill("--teacher", tiny_sd, "--prompts", prompts_file, "--iterations", 3, "--out", out)
    assert result.exit_code == 0, result.stderr  # its final grid and checkpoint, not a stop one short of them
    assert (out / "samples" / "iter-000003.png").is_file() and complete_checkpoints(out)[-1].name == "iter-000003"


def test_a_signal_delivered_twice_is_one_request_and_a_later_ctrl_c_stops_at_once(monkeypatch):
    """torchrun forwards the Ctrl-C (or a scheduler's SIGTERM) that already reached its workers:
    that must not skip the checkpoint. A second Ctrl-C, later, is a person asking twice."""
    from dmdcli.train.stop import StopOnSignal

    monkeypatch.setattr(StopOnSignal, "ESCALATE_AFTER", 0.2)
    for first, again in (
        (signal.SIGINT, signal.SIGINT),
        (signal.SIGTERM, signal.SIGTERM),
        (signal.SIGTERM, signal.SIGINT),
    ):
        with StopOnSignal() as stop:
            os.kill(os.getpid(), first)
            os.kill(os.getpid(), again)  # at once: the same request
            assert stop.signal == first
    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's repeat: still wait for the checkpoint
        assert stop.signal == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C later: stop now
            time.sleep(0.1)


def logged(out, key):
    return [row[key] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in row]


def test_a_decaying_lr_is_resumed_exactly_and_says_when_its_span_changes(tmp_path, tiny_sd, prompts_file, monkeypatch):
    common = [
        "--teacher",
        tiny_sd,
        "--prompts",
        prompts_file,
        "--iterations",
        10,
        "--fake-updates-per-gen",
        2,
        "--warmup-steps",
        2,
        "--lr-schedule",
        "cosine",
    ]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert distill(*common, "--out", whole).exit_code == 0
    lr_fake = logged(whole, "lr_fake")
    assert len(lr_fake) == 10 and max(lr_fake) == lr_fake[1] and lr_fake[-1] < 0.01 * lr_fake[1]  # warm-up, then decay
    # The generator, updated on every 2nd iteration, follows the same curve: schedules count
    # iterations (as the reference's), not each optimizer's updates.
    assert logged(whole, "lr_generator") == lr_fake

    undo = interrupt_at(monkeypatch, 4)
    assert distill(*common, "--out", part).exit_code == 130
    undo()
    resumed = runner.invoke(app, ["distill", "--out", str(part), "--resume"])
    assert resumed.exit_code == 0, resumed.stderr
    assert "LR decay" not in resumed.stderr
    assert_same_tensors(checkpoint_tensors(whole), checkpoint_tensors(part), skip=())

    longer = runner.invoke(app, ["distill", "--out", str(part), "--resume", "--iterations", "12"])
    assert longer.exit_code == 0, longer.stderr
    assert "cosine LR decay now spans 12 iterations instead of 10" in longer.stderr


def nan_at(monkeypatch, iteration):
    real = DMD2.fake_score_losses
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        terms = real(self, *args, **kwargs)
        if calls["n"] == iteration:
            terms["denoise"] = terms["denoise"] * float("nan")
        return terms

    monkeypatch.setattr(DMD2, "fake_score_losses", poisoned)


def test_non_finite_loss_stops_naming_iteration_and_term(tmp_path, tiny_sd, prompts_file, monkeypatch):
    nan_at(monkeypatch, 4)
    out = tmp_path / "run"
    result = distill(
        "--teacher", tiny_sd, "--prompts", prompts_file, "--iterations", 6, "--checkpoint-every", 2, "--out", out
    )
    assert result.exit_code == 1
    assert "non-finite loss_denoise in the fake update at iteration 4" in result.stderr
    assert [p.name for p in complete_checkpoints(out)] == ["iter-000002"]
    assert all(torch.isfinite(v).all() for v in checkpoint_tensors(out).values() if v.is_floating_point())


def test_skip_nonfinite_counts_skipped_updates(tmp_path, tiny_sd, prompts_file, monkeypatch):
    nan_at(monkeypatch, 2)
    out = tmp_path / "run"
    result = distill(
        "--teacher", tiny_sd, "--prompts", prompts_file, "--iterations", 4, "--skip-nonfinite", "--out", out
    )
    assert result.exit_code == 0, result.stderr
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "loss_dm" in line][-1]
    assert last["skipped_updates"] == 1
    assert all(torch.isfinite(v).all() for v in load_file(out / "student.safetensors").values())


def test_resume_refuses_a_contradicting_configuration(tmp_path, tiny_sd, prompts_file):
    out = tmp_path / "run"
    assert distill("--teacher", tiny_sd, "--prompts", prompts_file, "--iterations", 2, "--out", out).exit_code == 0
    result = runner.invoke(app, ["distill", "--out", str(out), "--resume", "--steps", "4", "--lr", "0.5"])
    assert result.exit_code == 2
    assert "contradicts the checkpoint" in result.stderr and "steps 1 → 4" in result.stderr and "lr" in result.stderr
    nothing = runner.invoke(app, ["distill", "--out", str(tmp_path / "empty"), "--resume"])
    assert nothing.exit_code == 2 and "nothing to resume" in nothing.stderr
    both = runner.invoke(app, ["distill", "--out", str(out), "--resume", "--init-from", str(out)])
    assert both.exit_code == 2 and "drop --overwrite/--recipe/--init-from" in both.stderr
    # Spelling out a default that follows another option (fake lr = lr) is no change.
    lr = tomllib.loads((out / "config.toml").read_text())["lr"]
    same = runner.invoke(app, ["distill", "--out", str(out), "--resume", "--fake-lr", str(lr), "--quiet"])
    assert same.exit_code == 0, same.stderr
    # A finished run extends with a larger --iterations (and is left alone with the same one).
    again = runner.invoke(app, ["distill", "--out", str(out), "--resume", "--quiet"])
    assert again.exit_code == 0 and complete_checkpoints(out)[-1].name == "iter-000002"
    longer = runner.invoke(app, ["distill", "--out", str(out), "--resume", "--iterations", "3", "--quiet"])
    assert longer.exit_code == 0 and complete_checkpoints(out)[-1].name == "iter-000003"
    # Done already, or asked for fewer iterations than done: said before loading, and nothing rewritten.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    done = runner.invoke(app, ["distill", "--out", str(out), "--resume"])
    assert done.exit_code == 0 and "already at iteration 3; raise --iterations" in done.stderr, done.stderr
    fewer = runner.invoke(app, ["distill", "--out", str(out), "--resume", "--iterations", "2"])
    assert fewer.exit_code == 2 and "already at iteration 3, past --iterations 2" in fewer.stderr, fewer.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    # The run stopped between its last checkpoint and its student (a full disk, a kill): --resume
    # writes the student from that checkpoint rather than calling the run finished.
    student = load_file(out / "student.safetensors")
    (out / "student.safetensors").unlink()
    repaired = runner.invoke(app, ["distill", "--out", str(out), "--resume"])
    assert repaired.exit_code == 0 and "written from checkpoint iter-000003" in repaired.stderr, repaired.stderr
    again = load_file(out / "student.safetensors")
    assert again.keys() == student.keys() and all(torch.equal(again[k], student[k]) for k in student)
    (out / "config.toml").write_text("steps = [")  # a hand edit gone wrong
    broken = runner.invoke(app, ["distill", "--out", str(out), "--resume"])
    assert (
        broken.exit_code == 1
        and f"cannot read {out / 'config.toml'}" in broken.stderr
        and "Traceback" not in broken.stderr
    )


def test_collapse_watch(tmp_path, tiny_sd, prompts_file, monkeypatch):
    same = torch.zeros(4, 3, 8, 8)
    assert diversity(same, 2) == 0.0
    two = torch.cat([torch.full((1, 3, 8, 8), -1.0), torch.full((1, 3, 8, 8), 1.0)])
    assert diversity(two, 2) == pytest.approx(1.0)  # black vs white: RMS distance 1 in [0, 1] pixels
    import dmdcli.train.distill as distill_module

    monkeypatch.setattr(distill_module.Distillation, "teacher_diversity", lambda self: 1e6)
    result = runner.invoke(
        app,
        [
            *BASE[:-1],
            "--teacher",
            str(tiny_sd),
            "--prompts",
            str(prompts_file),
            "--iterations",
            "1",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert "possible mode collapse" in result.stderr


# -- bad input: one clear line, exit 2 for usage and 1 for the rest, nothing half-written ------


def broken_teacher(tmp_path, tiny, how):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny, teacher)
    weights = teacher / "unet" / "diffusion_pytorch_model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "missing-shard":  # a sharded download that stopped before its last shard
        index = {"weight_map": {"a": weights.name, "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
        (weights.parent / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    else:  # weights only in the pickle format: a .bin stands where the .safetensors was
        weights.unlink()
        (teacher / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    return teacher


@pytest.mark.parametrize(
    "how,message",
    [
        ("truncated", "could not load unet"),
        ("missing-shard", "diffusion_pytorch_model-00002-of-00002.safetensors is missing"),
        ("pickle", "--allow-pickle"),
    ],
)
def test_broken_teacher_weights(tmp_path, tiny_sd, prompts_file, how, message, monkeypatch):
    """Said in one line before any prompt is encoded (the network itself is read only after that)."""
    from dmdcli.models.families import get_family

    def encode(*args):
        raise AssertionError("prompts encoded before the broken weights were found")

    monkeypatch.setattr(get_family("sd").teacher, "encode_prompts", encode)
    teacher = broken_teacher(tmp_path, tiny_sd, how)
    out = tmp_path / "run"
    result = distill("--teacher", teacher, "--prompts", prompts_file, "--out", out)
    assert result.exit_code == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "make,args,code,message",
    [
        ("empty-prompts", [], 2, "holds no prompts"),
        ("no-images", [], 2, "no images with captions"),
        (None, ["--resolution", "30"], 2, "--resolution 30 must be a multiple of 4 and at least 8"),
        (None, ["--iterations", "0"], 2, "--iterations must be at least 1"),
        (None, ["--guidance-scale", "0.5"], 2, "--guidance-scale must be"),
        (None, ["--data", "/no/such/folder"], 2, "image folder not found"),
    ],
)
def test_bad_input_one_line(tmp_path, tiny_sd, prompts_file, make, args, code, message):
    extra = ["--prompts", str(prompts_file)]
    if make == "empty-prompts":
        empty = tmp_path / "empty.txt"
        empty.write_text("\n\n")
        extra = ["--prompts", str(empty)]
    elif make == "no-images":
        folder = tmp_path / "nothing"
        folder.mkdir()
        (folder / "notes.txt").write_text("no images here")
        extra += ["--data", str(folder)]
    out = tmp_path / "run"
    result = distill("--teacher", tiny_sd, *extra, *args, "--out", out)
    assert result.exit_code == code, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_unreadable_images_are_skipped_counted_and_reported(tmp_path, tiny_sd, image_folder):
    (image_folder / "broken.png").write_bytes(b"\x89PNG not really")
    (image_folder / "broken.txt").write_text("a broken image")
    result = runner.invoke(
        app,
        [
            "distill",
            "--recipe",
            "tiny",
            "--teacher",
            str(tiny_sd),
            "--data",
            str(image_folder),
            "--iterations",
            "1",
            "--teacher-grid-steps",
            "0",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert "real images: 8 from" in result.stderr and "(1 skipped)" in result.stderr
    assert "broken.png" in result.stderr


def test_no_pickle_and_no_remote_code_in_the_package():
    package = Path(__file__).resolve().parent.parent / "dmdcli"
    offenders = []
    for path in package.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"import pickle|pickle\.load|trust_remote_code\s*=\s*True", line) or (
                "torch.load(" in line and "weights_only=True" not in line
            ):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, offenders


@pytest.mark.parametrize("fails", ["rng-rank0.safetensors", "tensors.safetensors", "student.safetensors"])
def test_a_full_disk_stops_in_one_line_keeps_the_last_checkpoint_and_resumes(
    tmp_path, tiny_sd, prompts_file, monkeypatch, fails
):
    import dmdcli.files as files

    real_save = files._safetensors_save_file

    seen = {"iteration_4": False}

    def disk_fills_at_iteration_4(tensors, filename, metadata=None):
        seen["iteration_4"] |= "000004" in filename
        if seen["iteration_4"] and fails in filename:
            Path(filename).write_bytes(b"half a file")  # what a full disk leaves behind
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(files, "_safetensors_save_file", disk_fills_at_iteration_4)
    out = tmp_path / "run"
    result = distill(
        "--teacher", tiny_sd, "--prompts", prompts_file, "--iterations", 6, "--checkpoint-every", 2, "--out", out
    )
    assert result.exit_code == 1
    message = result.stderr.strip().splitlines()[-1]  # (above it: the library's own loading bars)
    assert message.startswith("error: ") and "Traceback" not in result.output, result.output
    continue_from = "iter-000004" if fails == "student.safetensors" else "iter-000002"
    assert "no space left on the device" in message and fails in message, message
    assert continue_from in message and f"dmd distill --out {out} --resume" in message, message
    assert complete_checkpoints(out)[-1].name == continue_from
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.is_file() and p.read_bytes() == b"half a file"]

    monkeypatch.setattr(files, "_safetensors_save_file", real_save)  # space freed
    resumed = runner.invoke(app, ["distill", "--out", str(out), "--resume", "--json", "--quiet"])
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads(resumed.stdout)["iterations"] == 6


def test_a_second_stage_starts_from_the_first_stages_networks(tmp_path, tiny_sd, prompts_file, image_folder):
    teacher = ["--teacher", tiny_sd, "--prompts", prompts_file]
    stage1 = tmp_path / "stage1"
    assert distill(*teacher, "--iterations", 3, "--out", stage1).exit_code == 0  # no --data: no GAN head
    first = checkpoint_tensors(stage1)

    def stage2(out, *extra):  # an LR so small that one update leaves the weights where they start
        args = [*teacher, "--data", image_folder, "--iterations", 1, "--lr", "1e-12", "--out", out, *extra]
        return runner.invoke(app, [a for a in BASE if a != "--quiet"] + list(map(str, args)))

    result = stage2(tmp_path / "stage2", "--init-from", stage1)
    assert result.exit_code == 0, result.stderr
    assert f"generator, fake score from {complete_checkpoints(stage1)[-1]}" in result.stderr
    second = checkpoint_tensors(tmp_path / "stage2")
    for prefix in ("generator.", "fake_score."):
        names = [k for k in first if k.startswith(prefix)]
        assert names and all(torch.allclose(second[k], first[k], atol=1e-8) for k in names), prefix
    assert any(k.startswith("discriminator.") for k in second)  # the GAN head stage 1 lacked starts fresh
    assert stage2(tmp_path / "fresh").exit_code == 0
    fresh = checkpoint_tensors(tmp_path / "fresh")
    assert not all(torch.allclose(fresh[k], first[k], atol=1e-8) for k in first if k.startswith("generator."))


@pytest.mark.parametrize(
    "source,extra,message",
    [
        ("nothing", [], "neither a checkpoint (RUN/checkpoints/iter-N) nor a run folder holding one"),
        ("stage1", ["--lora-rank", "4"], "its networks are not this run's (lora_rank 0 there, 4 here)"),
        (
            "stage1",
            ["--data", "IMAGES", "--resolution", "64"],
            "its weights do not fit this run's networks",
        ),  # the GAN head's size
    ],
)
def test_init_from_what_does_not_fit_is_one_line_and_makes_no_run(
    tmp_path, tiny_sd, prompts_file, image_folder, source, extra, message
):
    teacher = ["--teacher", tiny_sd, "--prompts", prompts_file]
    stage1 = tmp_path / "stage1"
    assert distill(*teacher, "--data", image_folder, "--iterations", 1, "--out", stage1).exit_code == 0
    extra = [str(image_folder) if a == "IMAGES" else a for a in extra]
    result = distill(
        *teacher, "--iterations", 1, "--init-from", tmp_path / source, "--out", tmp_path / "stage2", *extra
    )
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    ours = [
        line for line in result.stderr.splitlines() if line.strip() and not line.startswith(("\r", "Loading weights"))
    ]  # transformers' bar
    assert len(ours) == 1 and not (tmp_path / "stage2").exists(), result.stderr
