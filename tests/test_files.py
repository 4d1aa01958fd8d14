"""Atomic writes: a failed write leaves the old file (or none) and an OSError naming the user's path."""

import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import dmdcli.files as files
from dmdcli.errors import describe_os_error


def test_a_failed_write_keeps_the_old_file_and_names_it(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")

    def fill_the_disk(tmp):
        tmp.write_text("ne")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as failure:
        files.atomic_write(path, fill_the_disk)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    assert (
        describe_os_error(failure.value)
        == f"no space left on the device while writing {path}; free some space and run again"
    )
    files.atomic_write(path, lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "new"


def test_safetensors_io_errors_become_os_errors(tmp_path, monkeypatch):
    def full(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(files, "_safetensors_save_file", full)
    with pytest.raises(OSError) as failure:
        files.atomic_save_file({"x": torch.ones(2)}, tmp_path / "w.safetensors")
    assert (failure.value.errno, failure.value.filename) == (errno.ENOSPC, str(tmp_path / "w.safetensors"))
    assert not list(tmp_path.iterdir())

    def not_io(tensors, filename, metadata=None):
        raise SafetensorError("invalid metadata")

    monkeypatch.setattr(files, "_safetensors_save_file", not_io)  # not an I/O failure: left as it is
    with pytest.raises(SafetensorError):
        files.save_file({"x": torch.ones(2)}, tmp_path / "w.safetensors")


def test_saved_tensors_round_trip(tmp_path):
    weights = {"a": torch.arange(6.0).view(2, 3).t(), "b": torch.ones(1, dtype=torch.bfloat16)}  # a is not contiguous
    files.atomic_save_file(weights, tmp_path / "w.safetensors", {"k": "v"})
    loaded = load_file(tmp_path / "w.safetensors")
    assert torch.equal(loaded["a"], weights["a"]) and loaded["b"].dtype == torch.bfloat16


def test_a_closed_pipe_on_stdout_ends_quietly():
    read, write = os.pipe()
    os.close(read)  # `dmd ... --json | head -0`: the reader is gone before the JSON line comes
    done = subprocess.run(
        [sys.executable, "-m", "dmdcli", "distill", "--dry-run", "--json"],
        stdout=write,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    os.close(write)
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr and "error" not in done.stderr.lower(), done.stderr


def test_only_out_of_memory_errors_become_one_line(capsys):
    import typer

    from dmdcli.cli.common import handle_errors

    def command(error):
        @handle_errors
        def run():
            raise error

        return run

    with pytest.raises(typer.Exit) as done:
        command(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail"))()
    assert done.value.exit_code == 1
    err = capsys.readouterr().err
    assert (
        err.strip() == "error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); "
        "try a smaller --batch-size or --resolution"
    )
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):  # a bug stays a traceback
        command(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))()


def test_a_resumed_metrics_log_drops_later_records_and_a_torn_line(tmp_path):
    from dmdcli.train.rundir import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    for iteration in (10, 20, 30):
        log.write({"iteration": iteration, "loss_dm": 0.5})
    with log.path.open("a") as f:
        f.write('{"iteration": 40, "loss')  # a write cut short by a full disk
    log.truncate_after(20)
    assert [json.loads(line)["iteration"] for line in log.path.read_text().splitlines()] == [10, 20]


def test_written_tensors_get_the_umasks_permissions(tmp_path):
    """safetensors writes 0600 files: a student on a shared filesystem must be readable as any new file is."""
    old = os.umask(0o022)
    try:
        path = files.atomic_save_file({"x": torch.ones(2)}, tmp_path / "student.safetensors")
        folder = tmp_path / "pipeline"
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / "weights").write_text("")
        (folder / "unet" / "weights").chmod(0o600)
        folder.chmod(0o700)
        files.share_as_umask(folder)
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert oct(folder.stat().st_mode & 0o777) == oct(0o755)
    assert oct((folder / "unet" / "weights").stat().st_mode & 0o777) == oct(0o644)


def test_a_folder_is_published_whole_once(tmp_path):
    final = tmp_path / "cache" / "key"

    def build(text):
        def write(tmp):
            (tmp / "shard").write_text(text)
            (tmp / "manifest.json").write_text("{}")  # the marker, written last

        return write

    final.mkdir(parents=True)
    (final / "shard").write_text("debris")  # a folder without its marker: replaced
    files.atomic_folder(final, build("first"), "manifest.json")
    assert (final / "shard").read_text() == "first"
    files.atomic_folder(final, build("second"), "manifest.json")  # another process finished first: kept
    assert (final / "shard").read_text() == "first"

    def fails(tmp):
        (tmp / "shard").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        files.atomic_folder(tmp_path / "cache" / "other", fails, "manifest.json")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["key"]  # no temporary folder left
