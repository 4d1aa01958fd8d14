"""Tests for dmdcli.data: prompt files, image folder scan, image loading, latent cache."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from dmdcli.data.images import load_image, scan_image_folder
from dmdcli.data.latents import MANIFEST_FILE, RealLatents, latent_cache_key, load_or_build_latents
from dmdcli.data.prompts import read_prompts
from dmdcli.errors import DmdError, UsageError

# ----------------------------------------------------------------------------- helpers


def write_image(path: Path, size=(24, 16), color=(200, 30, 40), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def captioned_folder(root: Path, n: int = 5) -> Path:
    """n images with distinct colours, captions in .txt files beside them."""
    for i in range(n):
        img = write_image(root / f"img{i}.png", color=(40 * i, 255 - 40 * i, 7 * i))
        img.with_suffix(".txt").write_text(f"caption {i}\n")
    return root


class CountingEncoder:
    """Fake VAE: [B,3,R,R] -> [B,3,R/4,R/4]; counts calls and images."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls = 0
        self.images = 0
        self.fail_on_call = fail_on_call

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_on_call == self.calls:
            raise RuntimeError("simulated crash")
        assert not torch.is_grad_enabled()
        self.images += x.shape[0]
        return x[:, :, ::4, ::4] * 0.5


def never_encode(x):
    raise AssertionError("encode must not be called on a cache hit")


# ----------------------------------------------------------------------------- prompts


def test_prompts_text_strips_and_skips_blank_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("  a cat  \n\n\t\na dog on a log\n   \n")
    assert read_prompts(f) == ["a cat", "a dog on a log"]
    assert read_prompts(str(f)) == ["a cat", "a dog on a log"]


def test_prompts_jsonl_fields_and_mixed_lines(tmp_path):
    f = tmp_path / "p.jsonl"
    lines = [
        json.dumps({"prompt": " first ", "id": 1}),
        "",
        json.dumps({"text": "second"}),
        json.dumps({"caption": "third"}),
        "plain fourth",
    ]
    f.write_text("\n".join(lines) + "\n")
    assert read_prompts(f) == ["first", "second", "third", "plain fourth"]


def test_prompts_bad_json_names_line_number(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n\n{"prompt": oops}\n')
    with pytest.raises(UsageError, match=r"line 3") as err:
        read_prompts(f)
    assert str(f) in str(err.value)


def test_prompts_json_without_field_names_line_number(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"label": "no prompt here"}\n')
    with pytest.raises(UsageError, match=r"line 2"):
        read_prompts(f)


def test_prompts_empty_and_missing_files(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("\n  \n\n")
    with pytest.raises(UsageError, match="holds no prompts"):
        read_prompts(f)
    with pytest.raises(UsageError, match="prompts file not found"):
        read_prompts(tmp_path / "nope.txt")


def _fifo_with(tmp_path, text: str) -> Path:
    """A named pipe that a thread fills with `text` once (a reader blocks until then)."""
    import threading

    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)
    threading.Thread(target=lambda: fifo.write_text(text), daemon=True).start()
    return fifo


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_prompts_from_a_pipe_a_device_and_not_a_folder(tmp_path):
    assert read_prompts(_fifo_with(tmp_path, 'one\n{"prompt": "two"}\n')) == ["one", "two"]
    with pytest.raises(UsageError, match="prompts file /dev/null holds no prompts"):  # read, not "not found"
        read_prompts("/dev/null")
    with pytest.raises(UsageError, match="is a folder, not a prompts file"):
        read_prompts(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_a_run_keeps_prompts_read_from_a_pipe_and_resumes_from_them(tmp_path, tiny_sd):
    from typer.testing import CliRunner

    from dmdcli.cli import app

    runner, run = CliRunner(), tmp_path / "run"
    fifo = _fifo_with(tmp_path, "a red circle\na blue square\n")
    args = ["distill", "--recipe", "tiny", "--teacher", str(tiny_sd), "--prompts", str(fifo), "--quiet"]
    result = runner.invoke(app, [*args, "--iterations", "2", "--checkpoint-every", "1", "--out", str(run)])
    assert result.exit_code == 0, result.stderr
    kept = run / "prompts.jsonl"
    assert read_prompts(kept) == ["a red circle", "a blue square"] and str(kept) in (run / "config.toml").read_text()
    resumed = runner.invoke(app, ["distill", "--out", str(run), "--resume", "--iterations", "3", "--quiet"])
    assert resumed.exit_code == 0, resumed.stderr  # the pipe is gone; its copy is read


def test_prompts_from_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO('one\n{"text": "two"}\n'))
    assert read_prompts("-") == ["one", "two"]


# ----------------------------------------------------------------------------- folder scan


def test_scan_txt_captions_sorted_recursive_and_uncaptioned_skipped(tmp_path):
    root = tmp_path / "imgs"
    write_image(root / "b.png").with_suffix(".txt").write_text("  bee \n")
    write_image(root / "a.JPG", fmt="JPEG").with_suffix(".txt").write_text("ay")
    write_image(root / "sub" / "c.webp").with_suffix(".txt").write_text("sea\nshore")
    write_image(root / "nocap.bmp")
    (root / "notes.md").write_text("not an image")
    write_image(root / ".hidden" / "x.png").with_suffix(".txt").write_text("hidden")

    scan = scan_image_folder(root)
    rel = [(p.relative_to(root).as_posix(), c) for p, c in scan.items]
    assert rel == [("a.JPG", "ay"), ("b.png", "bee"), ("sub/c.webp", "sea shore")]
    assert [(p.name, r) for p, r in scan.skipped] == [("nocap.bmp", "no caption")]


def test_scan_metadata_jsonl(tmp_path):
    root = tmp_path / "imgs"
    write_image(root / "x.png").with_suffix(".txt").write_text("ignored: metadata wins")
    write_image(root / "train" / "y.png")
    write_image(root / "z.png")
    with open(root / "metadata.jsonl", "w") as f:
        f.write(json.dumps({"file_name": "x.png", "text": "ex"}) + "\n")
        f.write(json.dumps({"file_name": "train/y.png", "caption": "why"}) + "\n")
        f.write(json.dumps({"file_name": "gone.png", "prompt": "missing"}) + "\n")

    scan = scan_image_folder(root)
    rel = [(p.relative_to(root).as_posix(), c) for p, c in scan.items]
    assert rel == [("train/y.png", "why"), ("x.png", "ex")]
    reasons = {p.name: r for p, r in scan.skipped}
    assert reasons["z.png"] == "no caption"
    assert "gone.png" in reasons and "not found" in reasons["gone.png"]


def test_scan_bad_metadata_line_is_usage_error(tmp_path):
    root = tmp_path / "imgs"
    write_image(root / "x.png")
    (root / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "ok"}\n{broken\n')
    with pytest.raises(UsageError, match="line 2"):
        scan_image_folder(root)


def test_scan_corrupt_image_is_skipped_and_counted(tmp_path):
    root = captioned_folder(tmp_path / "imgs", n=2)
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (root / "bad.txt").write_text("a broken picture")
    scan = scan_image_folder(root)
    assert len(scan.items) == 2
    assert len(scan.skipped) == 1
    path, reason = scan.skipped[0]
    assert path.name == "bad.png" and reason.startswith("unreadable")


def test_scan_errors(tmp_path):
    with pytest.raises(UsageError, match="image folder not found"):
        scan_image_folder(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(UsageError, match="no images with captions in"):  # exit 2, as an empty prompts file
        scan_image_folder(empty)
    uncaptioned = tmp_path / "uncaptioned"
    write_image(uncaptioned / "a.png")
    with pytest.raises(UsageError, match="no images with captions"):
        scan_image_folder(uncaptioned)


# ----------------------------------------------------------------------------- load_image


def banded(width: int, height: int, horizontal: bool) -> Image.Image:
    """Red | green | blue bands along the long edge; the centred square is all green."""
    a = np.zeros((height, width, 3), dtype=np.uint8)
    long = width if horizontal else height
    short = min(width, height)
    edge = (long - short) // 2
    bands = [(slice(0, edge), 0), (slice(edge, edge + short), 1), (slice(edge + short, long), 2)]
    for span, channel in bands:
        if horizontal:
            a[:, span, channel] = 255
        else:
            a[span, :, channel] = 255
    return Image.fromarray(a)


@pytest.mark.parametrize("size,horizontal", [((40, 20), True), ((20, 40), False)])
def test_load_image_center_crop(tmp_path, size, horizontal):
    path = tmp_path / "banded.png"
    banded(*size, horizontal=horizontal).save(path)
    x = load_image(path, 8)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    green = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 8, 8)
    # A crop from either end (or no crop) would bring red or blue in.
    assert torch.allclose(x, green, atol=1e-6)


def test_load_image_range_and_modes(tmp_path):
    rng = np.random.default_rng(0)
    noisy = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(noisy)
    x = load_image(noisy, 16)
    assert x.shape == (3, 16, 16)
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() < -0.5 and x.max() > 0.5

    gray = tmp_path / "gray.png"
    Image.new("L", (10, 10), 255).save(gray)  # converted to RGB
    assert torch.equal(load_image(gray, 10), torch.ones(3, 10, 10))
    black = tmp_path / "black.png"
    Image.new("RGBA", (10, 10), (0, 0, 0, 255)).save(black)
    assert torch.equal(load_image(black, 10), -torch.ones(3, 10, 10))
    ramp = np.tile(np.linspace(0, 255, 10).round().astype(np.uint8), (10, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp8.png")
    Image.fromarray(ramp.astype(np.uint16) * 257).save(tmp_path / "ramp16.png")  # 16-bit greyscale: mode I;16
    assert Image.open(tmp_path / "ramp16.png").mode.startswith("I")
    assert torch.equal(
        load_image(tmp_path / "ramp16.png", 10), load_image(tmp_path / "ramp8.png", 10)
    )  # scaled, not clipped


def test_load_image_unreadable_is_dmd_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(DmdError, match="bad.png"):
        load_image(bad, 8)


# ----------------------------------------------------------------------------- latent cache


def test_latent_cache_builds_then_reuses(tmp_path):
    root = captioned_folder(tmp_path / "imgs", n=5)
    enc = CountingEncoder()
    seen = []
    data, scan = load_or_build_latents(
        root, 16, enc, "fake-vae", batch_size=2, shard_size=2, progress=lambda d, t: seen.append((d, t))
    )
    assert enc.calls == 3 and enc.images == 5
    assert seen == [(2, 5), (4, 5), (5, 5)]
    assert isinstance(data, RealLatents) and len(data) == 5
    assert data.captions == [f"caption {i}" for i in range(5)]
    latent, caption = data[3]
    assert latent.shape == (3, 4, 4) and latent.dtype == torch.float32 and caption == "caption 3"
    expected = load_image(root / "img3.png", 16)[:, ::4, ::4] * 0.5
    assert torch.equal(latent, expected)

    # On disk: default cache folder, 3 shards, captions in the shard metadata, manifest.
    key = latent_cache_key(scan, "fake-vae", 16)
    folder = root / ".dmd-cache" / key
    assert data.cache_path == folder and len(key) == 16
    assert sorted(p.name for p in folder.iterdir()) == [
        "latents-00000.safetensors",
        "latents-00001.safetensors",
        "latents-00002.safetensors",
        MANIFEST_FILE,
    ]
    with safe_open(str(folder / "latents-00001.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["captions"]) == ["caption 2", "caption 3"]
        assert f.get_tensor("latents").dtype == torch.float32
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["count"] == 5 and manifest["resolution"] == 16 and manifest["encoder_id"] == "fake-vae"

    again, scan2 = load_or_build_latents(root, 16, never_encode, "fake-vae", batch_size=2, shard_size=2)
    assert torch.equal(again.latents, data.latents)
    assert again.captions == data.captions
    assert [p for p, _ in scan2.items] == [p for p, _ in scan.items]


def test_images_smaller_than_the_resolution_are_counted_on_build_and_on_hit(tmp_path):
    root = captioned_folder(tmp_path / "imgs", n=3)  # 24×16: short side 16
    write_image(root / "img1.png", size=(40, 32))
    assert load_or_build_latents(root, 16, CountingEncoder(), "fake-vae")[0].upscaled == 0
    built, _ = load_or_build_latents(root, 32, CountingEncoder(), "fake-vae")
    assert built.upscaled == 2
    assert load_or_build_latents(root, 32, never_encode, "fake-vae")[0].upscaled == 2


def test_latent_cache_key_changes(tmp_path):
    root = captioned_folder(tmp_path / "imgs", n=3)
    cache = tmp_path / "cache"
    enc = CountingEncoder()
    load_or_build_latents(root, 16, enc, "fake-vae", cache_dir=cache)
    assert enc.calls == 1
    base = latent_cache_key(scan_image_folder(root), "fake-vae", 16)

    # Another resolution: new key, encodes again, latents of the new size.
    data8, _ = load_or_build_latents(root, 8, enc, "fake-vae", cache_dir=cache)
    assert enc.calls == 2 and data8.latents.shape == (3, 3, 2, 2)
    assert latent_cache_key(scan_image_folder(root), "fake-vae", 8) != base
    # Another encoder: new key.
    assert latent_cache_key(scan_image_folder(root), "other-vae", 16) != base

    # Another caption: new key, encodes again, and the new caption is served.
    (root / "img1.txt").write_text("a changed caption")
    assert latent_cache_key(scan_image_folder(root), "fake-vae", 16) != base
    data, _ = load_or_build_latents(root, 16, enc, "fake-vae", cache_dir=cache)
    assert enc.calls == 3 and data.captions[1] == "a changed caption"
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 3


def test_leftover_temporary_or_partial_folder_is_not_a_cache(tmp_path):
    root = captioned_folder(tmp_path / "imgs", n=3)
    cache = tmp_path / "cache"
    key = latent_cache_key(scan_image_folder(root), "fake-vae", 16)
    # An interrupted build: a temporary folder with a (bogus) manifest and a final-named
    # folder holding a shard but no manifest. Neither may be read.
    tmp = cache / f".{key}.tmp-12345-deadbeef"
    tmp.mkdir(parents=True)
    (tmp / MANIFEST_FILE).write_text(json.dumps({"shards": [{"file": "latents-00000.safetensors", "count": 1}]}))
    (tmp / "latents-00000.safetensors").write_bytes(b"junk")
    (cache / key).mkdir()
    (cache / key / "latents-00000.safetensors").write_bytes(b"junk")

    enc = CountingEncoder()
    data, _ = load_or_build_latents(root, 16, enc, "fake-vae", cache_dir=cache)
    assert enc.calls == 1 and len(data) == 3
    assert (cache / key / MANIFEST_FILE).is_file()
    again, _ = load_or_build_latents(root, 16, never_encode, "fake-vae", cache_dir=cache)
    assert torch.equal(again.latents, data.latents)


def test_crash_during_build_leaves_no_cache(tmp_path):
    root = captioned_folder(tmp_path / "imgs", n=4)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="simulated crash"):
        load_or_build_latents(root, 16, CountingEncoder(fail_on_call=2), "fake-vae", cache_dir=cache, batch_size=2)
    assert not cache.exists() or not any((p / MANIFEST_FILE).exists() for p in cache.iterdir())
    enc = CountingEncoder()
    data, _ = load_or_build_latents(root, 16, enc, "fake-vae", cache_dir=cache, batch_size=2)
    assert enc.calls == 2 and len(data) == 4


def test_corrupt_shard_is_dmd_error_naming_file(tmp_path):
    root = captioned_folder(tmp_path / "imgs", n=2)
    data, _ = load_or_build_latents(root, 16, CountingEncoder(), "fake-vae")
    shard = data.cache_path / "latents-00000.safetensors"
    shard.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(DmdError, match="latents-00000.safetensors") as err:
        load_or_build_latents(root, 16, never_encode, "fake-vae")
    assert "delete" in str(err.value)
    # Deleting the cache folder, as the message says, fixes it.
    shutil.rmtree(data.cache_path)
    fixed, _ = load_or_build_latents(root, 16, CountingEncoder(), "fake-vae")
    assert torch.equal(fixed.latents, data.latents)


def test_image_that_fails_to_decode_is_skipped_on_build_and_on_hit(tmp_path):
    root = captioned_folder(tmp_path / "imgs", n=2)
    buf = io.BytesIO()
    noise = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "JPEG")
    raw = buf.getvalue()
    (root / "trunc.jpg").write_bytes(raw[: len(raw) * 3 // 4])  # passes verify(), fails to decode
    (root / "trunc.txt").write_text("truncated")
    assert len(scan_image_folder(root).items) == 3

    data, scan = load_or_build_latents(root, 16, CountingEncoder(), "fake-vae")
    assert len(data) == 2 and "truncated" not in data.captions
    assert [p.name for p, _ in scan.items] == ["img0.png", "img1.png"]
    assert [p.name for p, _ in scan.skipped] == ["trunc.jpg"]
    _, scan2 = load_or_build_latents(root, 16, never_encode, "fake-vae")
    assert [p.name for p, _ in scan2.skipped] == ["trunc.jpg"]
    assert scan2.skipped[0][1].startswith("unreadable")
