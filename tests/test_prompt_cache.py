"""Prompt conditionings encoded once and cached on the CPU (`--cache-prompts`), text encoders released."""

import gc
import os
import weakref

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import dmdcli.data.prompt_cache as prompt_cache
from dmdcli.cli import app
from dmdcli.data.prompt_cache import build_prompt_cache
from dmdcli.errors import UsageError
from dmdcli.models.pipeline import load_teacher
from dmdcli.models.teacher import inspect_teacher
from dmdcli.train.distill import Distillation
from dmdcli.train.recipes import resolve_config
from dmdcli.train.ui import SilentUI

PROMPTS = [
    "a red circle",
    "a blue square on white",
    "a red circle",
    "",
    "a green triangle",
    "two red circles",
    "a blue square on white",
]


def cpu_teacher(folder, dtype=torch.float32):
    return load_teacher(inspect_teacher(str(folder)), torch.device("cpu"), dtype, 32)


@pytest.mark.parametrize("layout", ["sd", "sdxl"])
def test_cached_conditioning_is_bit_identical_to_encode_prompts(request, layout):
    teacher = cpu_teacher(request.getfixturevalue(f"tiny_{layout}"))
    cache, size = build_prompt_cache(teacher.encode_prompts, PROMPTS, teacher.dtype, teacher.device, batch_size=2)
    distinct = list(dict.fromkeys(PROMPTS))
    assert len(cache) == len(distinct) == 5 and size == cache.nbytes > 0
    for start in range(0, len(distinct), 2):  # the batches the cache was encoded in
        chunk = distinct[start : start + 2]
        direct, cached = teacher.encode_prompts(chunk), cache.encode(chunk)
        assert (
            sorted(cached)
            == sorted(direct)
            == sorted(["encoder_hidden_states"] + (["text_embeds", "time_ids"] if layout == "sdxl" else []))
        )
        for k in direct:
            assert cached[k].dtype == direct[k].dtype == torch.float32 and torch.equal(cached[k], direct[k]), k
    # Rows are found by index: a duplicate prompt maps to its one row.
    assert cache.rows(PROMPTS).tolist() == [0, 1, 0, 2, 3, 4, 1]


def test_masked_text_is_cached_up_to_the_longest_prompt(tiny_qwen_image):
    """Qwen-Image pads every prompt to 512 positions and masks the padding: the cache keeps the
    positions up to the longest prompt's last, widening as longer batches come (batches of 2 here),
    with the values encode_prompts gives there and zeros after."""
    teacher = cpu_teacher(tiny_qwen_image)
    prompts = ["a red circle", "a large blue square at the top left of a white background", "", "two"]
    cache, size = build_prompt_cache(teacher.encode_prompts, prompts, teacher.dtype, teacher.device, batch_size=2)
    longest = int(teacher.encode_prompts(prompts)["encoder_hidden_states_mask"].sum(dim=1).max())
    assert cache.table["encoder_hidden_states"].shape == (4, longest, 64) and longest < 512
    assert size == cache.nbytes < 4 * 512 * (64 + 1) * 4 / 4  # under a quarter of 512 positions (fp32)
    for start in (0, 2):  # the batches the cache was encoded in
        chunk = prompts[start : start + 2]
        direct, cached = teacher.encode_prompts(chunk), cache.encode(chunk)
        for k in direct:
            assert torch.equal(cached[k], direct[k][:, :longest]), k
            assert direct[k][:, longest:].abs().sum() == 0, k  # what was cut is padding


def test_bf16_encoders_are_cached_in_bf16_losslessly(tiny_sdxl):
    teacher = cpu_teacher(tiny_sdxl, torch.bfloat16)
    cache, _ = build_prompt_cache(teacher.encode_prompts, PROMPTS[:3], teacher.dtype, teacher.device)
    assert cache.table["encoder_hidden_states"].dtype == torch.bfloat16  # half the host memory of float32
    direct, cached = teacher.encode_prompts(PROMPTS[:2]), cache.encode(PROMPTS[:2])
    assert all(torch.equal(cached[k], direct[k]) for k in direct)


def test_training_runs_the_encoders_in_fp32_and_rounds_their_output_once(tiny_sdxl):
    """As the DMD2 reference: fp32 CLIPs, their output rounded to bf16 once (what the UNets' linear
    layers read under autocast), so the cache holds it in bf16 with nothing lost."""
    spec = inspect_teacher(str(tiny_sdxl))
    teacher = load_teacher(spec, torch.device("cpu"), torch.bfloat16, 32, encoder_dtype=torch.float32)
    assert {p.dtype for te in teacher.text_encoders for p in te.parameters()} == {torch.float32}
    exact = load_teacher(spec, torch.device("cpu"), torch.float32, 32).encode_prompts(PROMPTS[:2])
    direct = teacher.encode_prompts(PROMPTS[:2])
    for k in ("encoder_hidden_states", "text_embeds"):
        assert torch.equal(direct[k], exact[k].to(torch.bfloat16).float()), k
    cache, _ = build_prompt_cache(teacher.encode_prompts, PROMPTS[:2], teacher.dtype, teacher.device)
    assert cache.table["encoder_hidden_states"].dtype == torch.bfloat16
    assert all(torch.equal(cache.encode(PROMPTS[:2])[k], direct[k]) for k in direct)


def test_sdxl_unconditional_input_follows_the_pipelines_flag(tiny_sdxl, tmp_path):
    import json
    import shutil

    empty = cpu_teacher(tiny_sdxl).empty_cond()  # the reference's and SDXL base's: zeros
    assert not empty["encoder_hidden_states"].any() and not empty["text_embeds"].any()
    folder = shutil.copytree(tiny_sdxl, tmp_path / "teacher")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    teacher = cpu_teacher(folder)
    encoded = teacher.encode_prompts([""])
    assert all(torch.equal(teacher.empty_cond()[k], encoded[k]) for k in encoded) and encoded["text_embeds"].any()


def test_values_the_storage_dtype_would_round_are_kept_in_float32():
    values = iter([torch.tensor([[1.0]]), torch.tensor([[1.0 + 2**-12]])])  # the second is not a bf16 number
    cache, _ = build_prompt_cache(
        lambda prompts: {"x": next(values)}, ["a", "b"], torch.bfloat16, torch.device("cpu"), batch_size=1
    )
    assert cache.table["x"].dtype == torch.float32
    assert cache.encode(["b", "a"])["x"].flatten().tolist() == [1.0 + 2**-12, 1.0]


def test_release_drops_the_text_encoders(tiny_sdxl):
    teacher = cpu_teacher(tiny_sdxl)
    alive = [weakref.ref(m) for m in teacher.text_encoders]
    teacher.release_text_encoders()
    gc.collect()
    assert teacher.text_encoders_released and not any(ref() is not None for ref in alive)  # nothing keeps their memory
    with pytest.raises(RuntimeError, match="prompt cache"):
        teacher.encode_prompts(["a red circle"])


def test_real_latents_do_not_depend_on_the_global_rng(tiny_sd):
    """Two teachers encode the same images to the same posterior samples whatever the global RNG
    holds, and encoding leaves the global RNG where it was (a cache build must not shift a run)."""
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    torch.manual_seed(1)
    first = cpu_teacher(tiny_sd).encode_images(images)
    torch.manual_seed(2)
    state = torch.get_rng_state()
    teacher = cpu_teacher(tiny_sd)
    assert torch.equal(teacher.encode_images(images), first)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(teacher.encode_images(images), first)  # a sample, not the mean: the stream goes on


def run_config(tmp_path, teacher, prompts_file, image_folder, name, **overrides):
    return resolve_config(
        "tiny",
        {
            "teacher": str(teacher),
            "prompts": str(prompts_file),
            "data": str(image_folder),
            "iterations": 3,
            "steps": 2,
            "fake_updates_per_gen": 2,
            "batch_size": 2,
            "sample_every": 0,
            "teacher_grid_steps": 2,
            "checkpoint_every": 0,
            "out": str(tmp_path / name),
            **overrides,
        },
    )


def test_a_run_caches_every_prompt_and_releases_the_encoders(tmp_path, tiny_sdxl, prompts_file, image_folder):
    run = Distillation(run_config(tmp_path, tiny_sdxl, prompts_file, image_folder, "on"), SilentUI())
    cached = set(run.data.cache.row_of)
    assert cached == {"", *run.data.prompts, *run.data.real.captions, *run.grid.prompts}
    assert run.teacher.text_encoders_released
    batch = run.data.batch(run.teacher, 0, 0, 3, None)
    assert (
        batch.cond["encoder_hidden_states"].device == run.accelerator.device
        and batch.real_cond["text_embeds"].shape[0] == 3
    )

    off = Distillation(
        run_config(tmp_path, tiny_sdxl, prompts_file, image_folder, "off", cache_prompts=False), SilentUI()
    )
    assert off.data.cache is None and not off.teacher.text_encoders_released
    assert all(p.device == off.accelerator.device for te in off.teacher.text_encoders for p in te.parameters())


@pytest.mark.parametrize("layout", ["sd", "sdxl", "qwen_image"])
def test_a_disk_cache_holds_the_rows_of_the_host_cache(request, tmp_path, layout):
    """Shards of two prompts each, bf16 where lossless (SDXL's time ids are not, at fp32 encoders):
    every row as the in-memory cache gives it, up to the padding of masked text (cut per shard)."""
    from dmdcli.data.prompt_cache import DiskPromptCache, _cut_padding, write_disk_prompt_cache

    teacher = cpu_teacher(request.getfixturevalue(f"tiny_{layout}"))
    # Encoded two at a time in both (SDXL's pooled CLIP output on CPU depends on the batch's size).
    host, _ = build_prompt_cache(teacher.encode_prompts, PROMPTS, torch.bfloat16, teacher.device, batch_size=2)
    write_disk_prompt_cache(tmp_path, teacher.encode_prompts, PROMPTS, torch.bfloat16, batch_size=2, shard_bytes=1)
    disk = DiskPromptCache(tmp_path, PROMPTS, teacher.device)
    assert len(disk.files) == 3 and disk.row_of == host.row_of  # 5 distinct prompts, 2 a shard
    for rows in ([0], [4, 1, 1], [3, 2, 0, 4]):
        a, b = _cut_padding(host.take(torch.tensor(rows))), _cut_padding(disk.take(torch.tensor(rows)))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rows


def run_messages(tmp_path, teacher, prompts_file, out):
    messages = []
    ui = SilentUI()
    ui.message = messages.append
    run = Distillation(
        resolve_config("tiny", {"teacher": str(teacher), "prompts": str(prompts_file), "out": str(tmp_path / out)}), ui
    )
    return run, next(m for m in messages if m.startswith("prompt cache:"))


def test_too_many_prompts_for_host_memory_are_cached_on_disk_once(tmp_path, tiny_sd, prompts_file, monkeypatch):
    monkeypatch.setattr(prompt_cache, "HOST_LIMIT", 1000)  # bytes: less than one prompt's conditioning
    monkeypatch.setenv("DMD_CACHE", str(tmp_path / "cache"))
    run, said = run_messages(tmp_path, tiny_sd, prompts_file, "a")
    assert isinstance(run.data.cache, prompt_cache.DiskPromptCache) and run.teacher.text_encoders_released
    assert said.startswith("prompt cache: 4 prompts would take") and "on disk instead" in said and "made in" in said
    assert run.data.cache.folder.parent == tmp_path / "cache" / "prompts"
    again, said = run_messages(tmp_path, tiny_sd, prompts_file, "b")
    assert "reused in" in said and again.data.cache.folder == run.data.cache.folder
    batch = again.data.batch(again.teacher, 0, 0, 3, None)
    assert batch.cond["encoder_hidden_states"].shape[0] == 3


def _fake_cache(root, name, size, used):
    """A complete disk cache folder of `size` bytes, last used at `used` (its index's mtime)."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "rows-00000.safetensors").write_bytes(b"x" * size)
    (folder / prompt_cache.DISK_INDEX).write_text("")  # (its bytes count too: none here)
    os.utime(folder / prompt_cache.DISK_INDEX, (used, used))
    return folder


def test_disk_caches_over_the_limit_lose_the_least_recently_used(tmp_path):
    root = tmp_path / "prompts"
    old, older, recent, new = (
        _fake_cache(root, n, 1000, t) for n, t in [("a", 200), ("b", 100), ("c", 300), ("d", 50)]
    )
    (root / ".e.tmp-1-x").mkdir()  # being written by another process: no index
    (root / ".e.tmp-1-x" / "rows-00000.safetensors").write_bytes(b"x" * 5000)
    # d was just written (kept whatever its age); b then a are the least recently used
    assert prompt_cache.evict_disk_caches(root, new, limit=2500) == (2, 2000)
    assert sorted(p.name for p in root.iterdir()) == [".e.tmp-1-x", "c", "d"]
    assert prompt_cache.evict_disk_caches(root, new, limit=2000) == (0, 0)  # already within
    assert prompt_cache.evict_disk_caches(root, new, limit=0) == (1, 1000) and new.is_dir()


def test_a_new_disk_cache_makes_room_under_the_limit(tmp_path, tiny_sd, prompts_file, monkeypatch):
    """A run's new disk cache removes the caches used longest ago when together they pass
    $DMD_PROMPT_CACHE_GIB; a reused cache counts as just used; a limit that is not a size is one line."""
    monkeypatch.setattr(prompt_cache, "HOST_LIMIT", 1000)
    monkeypatch.setenv("DMD_CACHE", str(tmp_path / "cache"))
    stale = _fake_cache(tmp_path / "cache" / "prompts", "stale", 10_000_000, 100)
    monkeypatch.setenv("DMD_PROMPT_CACHE_GIB", str(5_000_000 / 2**30))  # room for the run's cache, not for both
    run, _ = run_messages(tmp_path, tiny_sd, prompts_file, "a")
    assert not stale.exists() and run.data.cache.folder.is_dir()
    index = run.data.cache.folder / prompt_cache.DISK_INDEX
    os.utime(index, (100, 100))
    run_messages(tmp_path, tiny_sd, prompts_file, "b")
    assert index.stat().st_mtime > 100  # reused: just used

    monkeypatch.setenv("DMD_PROMPT_CACHE_GIB", "lots")
    with pytest.raises(UsageError, match="DMD_PROMPT_CACHE_GIB='lots' is not a size in GiB"):
        run_messages(tmp_path, tiny_sd, prompts_file, "c")


def test_the_network_is_read_after_the_prompts_are_cached(tmp_path, tiny_sd, prompts_file, monkeypatch):
    """The text encoders (fp32) and the teacher's network are never on the device together: the
    network is read on first use, after the encoders are released."""
    from dmdcli.models.pipeline import PipelineTeacher

    read_before_release = []
    release = PipelineTeacher.release_text_encoders

    def spy(teacher):
        read_before_release.append(teacher._network is not None)
        release(teacher)

    monkeypatch.setattr(PipelineTeacher, "release_text_encoders", spy)
    run, _ = run_messages(tmp_path, tiny_sd, prompts_file, "a")
    assert read_before_release == [False] and run.teacher._network is not None


def test_a_disk_that_cannot_hold_the_cache_encodes_on_the_fly(tmp_path, tiny_sd, prompts_file, monkeypatch):
    import dmdcli.train.data as data

    def full(folder, *args, **kwargs):
        raise OSError(28, "No space left on device", str(folder))

    monkeypatch.setattr(prompt_cache, "HOST_LIMIT", 1000)
    monkeypatch.setenv("DMD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "write_disk_prompt_cache", full)
    run, said = run_messages(tmp_path, tiny_sd, prompts_file, "a")
    assert run.data.cache is None and not run.teacher.text_encoders_released
    assert "could not be written" in said and "No space left on device" in said and "on the fly" in said
    assert not (tmp_path / "cache" / "prompts").exists() or not any((tmp_path / "cache" / "prompts").iterdir())


@pytest.mark.parametrize("layout,batch", [("sd", "2"), ("sdxl", "4"), ("qwen_image", "2")])
def test_caching_on_and_off_train_the_same_student(
    request, tmp_path, prompts_file, image_folder, layout, batch, monkeypatch
):
    """Per prompt, CLIP's output does not depend on the batch it is encoded in (on CPU: SDXL's pooled
    projection does for batches of fewer than 4 rows, hence batch 4 there). Qwen-Image's cached text
    is cut to the longest prompt, its on-the-fly text is 512 positions: the same student; so is the
    cache on disk (over the host limit)."""
    teacher = request.getfixturevalue(f"tiny_{layout}")
    monkeypatch.setenv("DMD_CACHE", str(tmp_path / "cache"))
    students = []
    for switch in ("--cache-prompts", "--no-cache-prompts", "disk"):
        if switch == "disk":
            monkeypatch.setattr(prompt_cache, "HOST_LIMIT", 1000)
            switch = "--cache-prompts"
        out = tmp_path / f"{switch}-{len(students)}"
        result = CliRunner().invoke(
            app,
            [
                "distill",
                "--recipe",
                "tiny",
                "--teacher",
                str(teacher),
                "--prompts",
                str(prompts_file),
                "--data",
                str(image_folder),
                "--iterations",
                "3",
                "--steps",
                "2",
                "--fake-updates-per-gen",
                "2",
                "--batch-size",
                batch,
                "--sample-every",
                "0",
                "--teacher-grid-steps",
                "0",
                "--checkpoint-every",
                "0",
                "--out",
                str(out),
                switch,
                "--quiet",
            ],
        )
        assert result.exit_code == 0, result.stderr + repr(result.exception)
        assert ("cache_prompts = true" in (out / "config.toml").read_text()) == (switch == "--cache-prompts")
        students.append(load_file(out / "student.safetensors"))
    assert any((tmp_path / "cache" / "prompts").iterdir())  # the third run's cache was on disk
    for other in students[1:]:
        assert students[0].keys() == other.keys()
        assert all(torch.equal(students[0][k], other[k]) for k in students[0])
