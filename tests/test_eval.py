"""Tests for dmdcli.eval: protocol sets, preprocessing, FID/KID/patch FID, CLIP score, the
reference cache and the report. Offline, with a tiny TorchScript feature extractor made here."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from extractors import TinyFeatures, save_tiny_extractor
from PIL import Image, ImageDraw
from rich.console import Console

from dmdcli.errors import DmdError, UsageError
from dmdcli.eval import (
    ClipScorer,
    StatsCache,
    extract,
    load_extractor,
    load_reference_set,
    read_report,
    render_table,
    score,
    write_report,
)
from dmdcli.eval.features import INCEPTION_FILE, clean_fid_inception
from dmdcli.eval.metrics import clip_scores, feature_stats, fid, kid
from dmdcli.eval.preprocess import (
    center_crop_box,
    clean_resize,
    patch_crop,
    protocol_resize,
    to_uint8_rgb,
)
from dmdcli.eval.protocol import select_coco

# torch.jit (the test extractor) and SciPy (inside clean-fid's own compute_fid) warn about deprecations
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*torch.jit.*:FutureWarning", "ignore:The `disp` argument:DeprecationWarning"
)

N_IMAGES = 16
SIZE = (48, 40)  # (width, height): non-square, so the long-edge crop matters

# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def features_file(tmp_path_factory):
    return Path(save_tiny_extractor(tmp_path_factory.mktemp("extractor") / "tiny.pt"))


def disc_image(rng: np.random.Generator, size=SIZE) -> Image.Image:
    """A random-coloured ellipse at a random place on a random flat background."""
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
    x, y = (int(v) for v in rng.integers(0, min(size) // 2, 2))
    ImageDraw.Draw(image).ellipse(
        [x, y, x + size[0] // 2, y + size[1] // 2], fill=tuple(int(v) for v in rng.integers(0, 256, 3))
    )
    return image


def make_folder(root: Path, seed: int = 0, n: int = N_IMAGES, size=SIZE) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        disc_image(rng, size).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"a disc number {i}")
    return root


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "refs")


def noise_images(n: int = N_IMAGES, seed: int = 1) -> np.ndarray:
    """uint8 [n, H, W, 3] uniform noise."""
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE[1], SIZE[0], 3), dtype=np.uint8)


class Counting:
    """Wraps an extractor's model; counts the images it sees."""

    def __init__(self, model):
        self.model = model
        self.images = 0

    def __call__(self, x):
        self.images += x.shape[0]
        return self.model(x)


COCO_IDS = [391, 42, 7, 1000, 555, 13, 2718, 88, 3141, 64, 999, 5]


def coco_annotations() -> dict:
    """Fake captions_val2014.json: 12 captioned images (1 to 4 captions each, annotation ids in a
    scrambled order), one image whose only caption is blank, one with no caption at all."""
    images = [
        {"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "width": 40, "height": 30} for i in COCO_IDS + [77, 4242]
    ]
    annotations = []
    for k, image_id in enumerate(COCO_IDS):
        for j in range(k % 4 + 1):
            annotations.append({"image_id": image_id, "caption": f" image {image_id}  caption {j}\n"})
    annotations.append({"image_id": 77, "caption": "   "})
    for n, record in enumerate(annotations):
        record["id"] = (n * 37) % 101 + 1000  # distinct, not in list order
    annotations.reverse()
    return {"info": {}, "images": images, "annotations": annotations}


@pytest.fixture
def coco_root(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2014").mkdir()
    annotations = coco_annotations()
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(annotations))
    rng = np.random.default_rng(0)
    for image in annotations["images"]:
        disc_image(rng, (40, 30)).save(root / "val2014" / image["file_name"])
    return root


# ----------------------------------------------------------------------------- COCO protocol


def test_coco_selection_is_pinned_one_caption_per_image_and_prefix_stable():
    annotations = coco_annotations()
    full = select_coco(annotations, 12, seed=123)
    # Stored values: a change here changes every published-protocol number dmd eval reports.
    assert full[:5] == [
        ("COCO_val2014_000000000013.jpg", "image 13 caption 0"),
        ("COCO_val2014_000000000999.jpg", "image 999 caption 2"),
        ("COCO_val2014_000000000005.jpg", "image 5 caption 1"),
        ("COCO_val2014_000000002718.jpg", "image 2718 caption 0"),
        ("COCO_val2014_000000000555.jpg", "image 555 caption 0"),
    ]
    assert select_coco(annotations, 12, seed=0)[0] == ("COCO_val2014_000000001000.jpg", "image 1000 caption 3")
    files = [name for name, _ in full]
    assert len(set(files)) == 12 and sorted(files) == sorted(f"COCO_val2014_{i:012d}.jpg" for i in COCO_IDS)
    for name, caption in full:  # the caption belongs to its image; whitespace normalized
        assert caption.startswith(f"image {int(name[13:25])} caption ")
    assert select_coco(annotations, 12, seed=123) == full  # deterministic
    assert select_coco(annotations, 5, seed=123) == full[:5]  # a prefix never depends on the rest
    assert select_coco(annotations, 12, seed=0) != full


def test_coco_sets_from_the_layout(coco_root):
    annotations = coco_annotations()
    ten = load_reference_set("coco10k", coco_root=coco_root, num_samples=5)
    assert (ten.name, ten.resolution, ten.num_samples, ten.set_size) == ("coco10k", 512, 5, 10_000)
    expected = select_coco(annotations, 12, seed=123)[:5]
    assert [(p.name, c) for p, c in ten.items] == expected
    assert all(p.parent == coco_root / "val2014" and p.is_file() for p in ten.paths)
    thirty = load_reference_set("coco30k", coco_root=coco_root, num_samples=4)
    assert (thirty.resolution, thirty.prompts) == (256, [c for _, c in select_coco(annotations, 12, seed=0)[:4]])
    assert load_reference_set("coco30k", coco_root=coco_root, num_samples=4, resolution=128).resolution == 128
    described = ten.describe()
    assert described["num_samples"] == 5 and "default_rng(123)" in described["selection"]


def test_coco_errors(coco_root, tmp_path):
    with pytest.raises(UsageError, match="--coco-root"):
        load_reference_set("coco30k")
    with pytest.raises(UsageError, match="not found"):
        load_reference_set("coco30k", coco_root=tmp_path / "nowhere")
    with pytest.raises(UsageError, match="unknown COCO protocol"):
        load_reference_set("coco5k", coco_root=coco_root)
    with pytest.raises(DmdError, match="lists 12 captioned images; coco30k needs 30000.*--num-samples"):
        load_reference_set("coco30k", coco_root=coco_root)
    with pytest.raises(DmdError, match="needs 13"):
        load_reference_set("coco30k", coco_root=coco_root, num_samples=13)
    with pytest.raises(UsageError, match="at least 2"):
        load_reference_set("coco30k", coco_root=coco_root, num_samples=1)
    first = load_reference_set("coco30k", coco_root=coco_root, num_samples=3).paths[1]
    first.unlink()
    with pytest.raises(DmdError, match=f"1 of 3 selected COCO images are missing.*{first.name}"):
        load_reference_set("coco30k", coco_root=coco_root, num_samples=3)
    (coco_root / "annotations" / "captions_val2014.json").unlink()
    with pytest.raises(DmdError, match="captions_val2014.json"):
        load_reference_set("coco30k", coco_root=coco_root, num_samples=3)
    bad = tmp_path / "bad"
    (bad / "val2014").mkdir(parents=True)
    (bad / "captions_val2014.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DmdError, match="no 'annotations' list"):
        load_reference_set("coco10k", coco_root=bad, num_samples=2)


def test_folder_set_prefix_and_errors(folder, tmp_path):
    full = load_reference_set(str(folder))
    assert (full.name, full.resolution, full.num_samples, full.set_size) == ("folder", 256, N_IMAGES, N_IMAGES)
    part = load_reference_set(str(folder), num_samples=5, resolution=64)
    assert part.items == full.items[:5] and part.resolution == 64
    assert part.prompts[3] == "a disc number 3"
    with pytest.raises(UsageError, match="more than the 16"):
        load_reference_set(str(folder), num_samples=17)
    with pytest.raises(UsageError, match="image folder not found"):
        load_reference_set(str(tmp_path / "missing"))
    renamed = folder.rename(tmp_path / "coco_refs")  # a folder, not an unknown COCO protocol
    assert load_reference_set(renamed).num_samples == N_IMAGES


# ----------------------------------------------------------------------------- preprocessing


def test_protocol_resize_crops_the_long_edge_and_uses_lanczos():
    # 60×40: 10-pixel red band left, blue band right, a gradient square in the middle.
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, :10] = (255, 0, 0)
    image[:, 50:] = (0, 0, 255)
    image[:, 10:50, 1] = np.arange(40, dtype=np.uint8)[:, None] * 6
    assert np.array_equal(protocol_resize(image, 40), image[:, 10:50])  # crop only, no resize
    small = protocol_resize(image, 16)
    lanczos = np.asarray(Image.fromarray(image[:, 10:50]).resize((16, 16), Image.LANCZOS))
    assert small.shape == (16, 16, 3) and np.array_equal(small, lanczos)
    assert not np.array_equal(small, np.asarray(Image.fromarray(image[:, 10:50]).resize((16, 16), Image.BICUBIC)))
    assert small[..., 0].max() == 0 and small[..., 2].max() == 0  # the bands were cut away
    tall = protocol_resize(image.transpose(1, 0, 2), 40)  # 40 wide, 60 high: crop rows
    assert np.array_equal(tall, image.transpose(1, 0, 2)[10:50])


@pytest.mark.parametrize(
    "width,height,size", [(43, 40, 40), (45, 40, 40), (40, 47, 40), (400, 350, 299), (401, 351, 299)]
)
def test_center_crop_rounds_like_torchvision(width, height, size):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    left, top, right, bottom = center_crop_box(width, height, size)
    assert np.array_equal(np.asarray(image)[top:bottom, left:right], np.asarray(TF.center_crop(image, size)))


def test_patch_crop_full_resolution_center_and_small_images():
    image = np.random.default_rng(0).integers(0, 256, (350, 400, 3), dtype=np.uint8)
    patch = patch_crop(image)
    assert patch.shape == (299, 299, 3)
    assert np.array_equal(patch, image[26:325, 50:349])  # offsets round(25.5) = 26, round(50.5) = 50
    small = image[:40, :60]  # shorter than 299: its centered square, which clean_resize scales up
    assert np.array_equal(patch_crop(small), small[:, 10:50])
    resized = clean_resize(patch_crop(small))
    assert resized.shape == (299, 299, 3) and resized.dtype == np.float32
    assert np.array_equal(clean_resize(patch), patch.astype(np.float32))  # 299² passes through unchanged


def test_to_uint8_rgb_accepts_pil_arrays_tensors_paths(tmp_path):
    hwc = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(hwc).save(tmp_path / "a.png")
    for item in (
        hwc,
        Image.fromarray(hwc),
        torch.from_numpy(hwc),
        torch.from_numpy(hwc).permute(2, 0, 1),
        tmp_path / "a.png",
        str(tmp_path / "a.png"),
    ):
        assert np.array_equal(to_uint8_rgb(item), hwc)
    gray = to_uint8_rgb(hwc[..., 0])
    assert gray.shape == (5, 7, 3) and np.array_equal(gray[..., 2], hwc[..., 0])
    with pytest.raises(ValueError, match="uint8"):
        to_uint8_rgb(hwc.astype(np.float32) / 255)
    with pytest.raises(DmdError, match="cannot read image"):
        to_uint8_rgb(tmp_path / "missing.png")


# ----------------------------------------------------------------------------- extractors


def test_extractor_loading(features_file, tmp_path, monkeypatch):
    extractor = load_extractor(features=features_file)
    assert extractor.identity.startswith("torchscript:")
    batch = torch.rand(2, 3, 299, 299) * 255
    assert np.allclose(extractor(batch), TinyFeatures()(batch).numpy(), atol=1e-6)
    with pytest.raises(UsageError, match="not found"):
        load_extractor(features=tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torchscript archive")
    with pytest.raises(UsageError, match="not a TorchScript module"):
        load_extractor(features=tmp_path / "junk.pt")
    with pytest.raises(UsageError, match="not both"):
        load_extractor(features=features_file, inception=features_file)
    with pytest.raises(UsageError, match=INCEPTION_FILE):
        load_extractor(inception=features_file)  # wrong file name

    # --inception: a stand-in with clean-fid's layout (a `layers` module giving [B, 2048]).
    class Layers(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3)).repeat(1, 2048 // 3 + 1)[:, :2048]

    class Base(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x)

    torch.jit.script(Base()).save(str(tmp_path / INCEPTION_FILE))
    for path in (tmp_path, tmp_path / INCEPTION_FILE):
        inception = load_extractor(inception=path)
        assert inception.identity.startswith("inception:")
        features = inception(batch)
        assert features.shape == (2, 2048)  # clean-fid normalizes (x - 128) / 128 itself
        assert np.allclose(features[:, 0], ((batch - 128) / 128).mean(dim=(2, 3))[:, 0].numpy(), atol=1e-5)

    import cleanfid.inception_torchscript as its

    def offline(**kwargs):
        raise OSError("no network")

    monkeypatch.setattr(its, "check_download_inception", offline)
    with pytest.raises(DmdError, match="--inception PATH"):
        clean_fid_inception()


def test_extract_accepts_every_image_kind_and_workers(features_file, folder, tmp_path):
    extractor = load_extractor(features=features_file)
    paths = sorted(folder.glob("*.png"))[:4]
    arrays = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    by_path = extract(paths, extractor, batch_size=3)
    assert by_path.shape == (4, 11) and by_path.dtype == np.float32
    assert np.array_equal(extract(arrays, extractor), by_path)
    assert np.array_equal(extract([Image.open(p) for p in paths], extractor), by_path)
    assert np.array_equal(extract(torch.from_numpy(arrays).permute(0, 3, 1, 2), extractor), by_path)
    assert np.array_equal(extract(paths, extractor, num_workers=2, batch_size=2), by_path)
    sizes = []
    extract(paths, extractor, sizes=sizes)
    assert sizes == [(40, 48)] * 4
    broken = tmp_path / "broken.png"
    broken.write_bytes(paths[0].read_bytes()[:100])  # truncated
    for workers in (0, 1):  # the same one line from a worker process, not its traceback
        with pytest.raises(DmdError) as caught:
            extract([*paths, broken], extractor, num_workers=workers, batch_size=2)
        assert str(caught.value).startswith(f"cannot read image {broken}") and "\n" not in str(caught.value)


# ----------------------------------------------------------------------------- metrics


def test_fid_and_patch_fid_of_a_folder_with_itself_is_zero_and_with_noise_large(features_file, folder, tmp_path):
    reference = load_reference_set(str(folder), resolution=32)
    extractor = load_extractor(features=features_file)
    cache = StatsCache(tmp_path / "cache")
    same = score(reference.paths, reference.prompts, reference, extractor, cache=cache)["metrics"]
    noise = score(noise_images(), reference.prompts, reference, extractor, cache=cache)["metrics"]
    assert noise["fid"] > 0.1 and noise["patch_fid"] > 0.1
    assert abs(same["fid"]) < 1e-3 * noise["fid"]
    assert abs(same["patch_fid"]) < 1e-3 * noise["patch_fid"]


def test_fid_matches_clean_fid_with_the_reference_transform(features_file, folder, tmp_path):
    """Our pipeline = clean-fid's compute_fid (clean mode) with the DMD2 reference's
    center-crop-long-edge + LANCZOS transform, written here independently with torchvision."""
    from cleanfid import fid as cleanfid

    other = make_folder(tmp_path / "other", seed=5)
    reference = load_reference_set(str(folder), resolution=24)
    extractor = load_extractor(features=features_file)
    ours = score(
        sorted(other.glob("*.png")),
        reference.prompts,
        reference,
        extractor,
        patch_fid=False,
        cache=StatsCache(tmp_path / "cache"),
    )["metrics"]["fid"]

    def reference_transform(image_np):
        image = Image.fromarray(image_np)
        image = TF.center_crop(image, min(image.size))
        return np.array(image.resize((24, 24), Image.LANCZOS))

    model = TinyFeatures()
    theirs = cleanfid.compute_fid(
        str(other),
        str(folder),
        mode="clean",
        num_workers=0,
        batch_size=5,
        device=torch.device("cpu"),
        custom_feat_extractor=lambda x: model(x),
        custom_image_tranform=reference_transform,
        verbose=False,
    )
    assert ours > 1e-4  # not trivially zero
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_kid_is_clean_fids_kernel_distance_seeded_and_separates_noise(features_file, folder):
    from cleanfid.fid import kernel_distance

    extractor = load_extractor(features=features_file)
    real = extract(sorted(folder.glob("*.png")), extractor)
    rng = np.random.default_rng(7)
    fresh = extract([disc_image(rng) for _ in range(N_IMAGES)], extractor)  # same distribution
    noise = extract(noise_images(), extractor)
    for seed in (0, 3):
        np.random.seed(seed)
        expected = kernel_distance(fresh.astype(np.float64), real.astype(np.float64))
        assert kid(fresh, real, seed=seed) == pytest.approx(expected, rel=1e-12)
    assert kid(fresh, real, seed=3) == kid(fresh, real, seed=3)
    assert kid(noise, real) > 20 * abs(kid(fresh, real))
    # FID as well separates a fresh draw of the same distribution from noise
    assert fid(feature_stats(noise), feature_stats(real)) > 5 * fid(feature_stats(fresh), feature_stats(real))


def test_clip_scores_scales():
    scores = clip_scores(np.array([0.3, -0.1, 0.2]))
    assert scores["clip_score"] == pytest.approx(0.4 / 3)
    assert scores["clip_score_100"] == pytest.approx(50 / 3)


# ----------------------------------------------------------------------------- cache


def test_reference_statistics_are_cached_and_reused(features_file, folder, tmp_path):
    reference = load_reference_set(str(folder), resolution=32)
    extractor = load_extractor(features=features_file)
    counter = extractor.model = Counting(extractor.model)
    cache = StatsCache(tmp_path / "cache")
    first = score(noise_images(), reference.prompts, reference, extractor, cache=cache)
    assert counter.images == 4 * N_IMAGES  # reference + generated, for FID and patch FID
    assert not first["reference_stats"]["fid"]["cached"] and not first["reference_stats"]["patch"]["cached"]
    assert len(list(cache.root.glob("*.safetensors"))) == 2 and len(list(cache.root.glob("*.json"))) == 2
    assert not list(cache.root.glob(".*"))  # no temporary files left behind

    counter.images = 0
    second = score(noise_images(), reference.prompts, reference, extractor, cache=cache)
    assert counter.images == 2 * N_IMAGES  # only the generated images
    assert second["reference_stats"]["fid"]["cached"] and second["reference_stats"]["patch"]["cached"]
    assert second["metrics"] == first["metrics"]

    # a fresh cache gives the same numbers; another resolution or a changed image a new entry
    fresh = score(noise_images(), reference.prompts, reference, extractor, cache=StatsCache(tmp_path / "c2"))
    assert fresh["metrics"] == first["metrics"]
    counter.images = 0
    other_res = load_reference_set(str(folder), resolution=24)
    score(noise_images(), reference.prompts, other_res, extractor, cache=cache)
    assert counter.images == 3 * N_IMAGES  # the patch statistics do not depend on the resolution
    disc_image(np.random.default_rng(99)).save(reference.paths[0])
    os.utime(reference.paths[0], ns=(1, 1))
    counter.images = 0
    score(noise_images(), reference.prompts, reference, extractor, cache=cache)
    assert counter.images == 4 * N_IMAGES


def test_corrupt_cache_entry_is_a_one_line_error(features_file, folder, tmp_path):
    reference = load_reference_set(str(folder), resolution=32)
    extractor = load_extractor(features=features_file)
    cache = StatsCache(tmp_path / "cache")
    score(noise_images(), reference.prompts, reference, extractor, cache=cache, patch_fid=False)
    entry = next(cache.root.glob("*.safetensors"))
    entry.write_bytes(b"garbage")
    with pytest.raises(DmdError, match="delete the file"):
        score(noise_images(), reference.prompts, reference, extractor, cache=cache, patch_fid=False)


def test_default_cache_dir_follows_dmd_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DMD_CACHE", str(tmp_path))
    assert StatsCache().root == tmp_path / "eval"
    monkeypatch.delenv("DMD_CACHE")
    assert StatsCache().root == Path.home() / ".cache" / "dmd" / "eval"


# ----------------------------------------------------------------------------- report


def test_report_json_round_trip_and_determinism(features_file, folder, tmp_path):
    reference = load_reference_set(str(folder), resolution=32, num_samples=12)
    extractor = load_extractor(features=features_file)
    cache = StatsCache(tmp_path / "cache")
    images = list(noise_images(12))
    report = score(
        images,
        reference.prompts,
        reference,
        extractor,
        cache=cache,
        model="runs/a",
        seed=7,
        seconds_per_image=0.25,
        nfe_per_image=4,
        generation={"steps": 4},
    )
    again = score(
        images,
        reference.prompts,
        reference,
        extractor,
        cache=StatsCache(tmp_path / "other"),
        model="runs/a",
        seed=7,
        seconds_per_image=0.25,
        nfe_per_image=4,
    )
    assert again["metrics"] == report["metrics"]  # same images and seed: the same numbers

    report["metrics"]["clip_score"] = float("nan")  # written as null
    path = write_report(tmp_path / "out" / "report.json", report)
    loaded = read_report(path)
    assert json.loads(path.read_text()) == loaded
    assert loaded["metrics"]["clip_score"] is None
    assert loaded["model"] == "runs/a" and loaded["seed"] == 7 and loaded["num_samples"] == 12
    assert loaded["protocol"]["name"] == "folder" and loaded["protocol"]["resolution"] == 32
    assert loaded["protocol"]["num_samples"] == 12 and loaded["protocol"]["set_size"] == N_IMAGES
    assert loaded["extractor"] == extractor.identity and loaded["generation"] == {"steps": 4}
    assert loaded["image_size"] == [40, 48] and loaded["patch_fid_upsampled"] == 12
    assert set(loaded["metrics"]) == {
        "fid",
        "kid",
        "patch_fid",
        "clip_score",
        "clip_score_100",
        "seconds_per_image",
        "nfe_per_image",
    }
    assert loaded["metrics"]["fid"] == report["metrics"]["fid"] and loaded["metrics"]["nfe_per_image"] == 4
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(DmdError, match="not a dmd eval report"):
        read_report(tmp_path / "other.json")
    with pytest.raises(ValueError, match="11 images"):
        score(images[:11], reference.prompts, reference, extractor, cache=cache)


def test_render_table_side_by_side():
    base = {"format": "dmd-eval/1", "num_samples": 30000, "protocol": {"name": "coco30k", "resolution": 256}}
    reports = [
        {
            **base,
            "model": "teacher",
            "metrics": {
                "fid": 12.345,
                "kid": 0.00321,
                "patch_fid": None,
                "clip_score": 0.3212,
                "seconds_per_image": 2.5,
                "nfe_per_image": 50,
            },
        },
        {
            **base,
            "model": "student",
            "metrics": {
                "fid": 9.87,
                "kid": 0.0011,
                "patch_fid": 14.2,
                "clip_score": None,
                "seconds_per_image": 0.061,
                "nfe_per_image": 1,
            },
        },
    ]
    console = Console(record=True, width=200)
    console.print(render_table(reports))
    text = console.export_text()
    teacher = next(line for line in text.splitlines() if "teacher" in line)
    student = next(line for line in text.splitlines() if "student" in line)
    for cell in ("coco30k@256", "30000", "12.35", "0.0032", "–", "0.3212", "2.5", "50"):
        assert cell in teacher
    for cell in ("9.87", "0.0011", "14.20", "0.061", "1"):
        assert cell in student


# ----------------------------------------------------------------------------- CLIP score


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random-weight CLIPModel + processor saved to a folder (32² images, 16-d embeddings)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from dmdcli.models.tiny import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    text = dict(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_clip_score_prefix_preprocessing_and_report(tiny_clip, features_file, folder, tmp_path):
    scorer = ClipScorer.load(str(tiny_clip))
    images = [Image.open(p) for p in sorted(folder.glob("*.png"))[:5]]
    prompts = [f"a disc number {i}" for i in range(5)]
    cosines = scorer.cosines(images, prompts, batch_size=2)
    assert cosines.shape == (5,) and np.all(np.abs(cosines) <= 1.0)

    # by hand: 256² center crop + LANCZOS, the processor, "A photo depicts " + prompt, cosine
    for i in (0, 3):
        square = TF.center_crop(images[i].convert("RGB"), min(images[i].size)).resize((256, 256), Image.LANCZOS)
        inputs = scorer.processor(
            text=["A photo depicts " + prompts[i]], images=[square], return_tensors="pt", padding=True
        )
        with torch.no_grad():
            out = scorer.model(**inputs)
        assert cosines[i] == pytest.approx(float((out.image_embeds * out.text_embeds).sum()), abs=1e-5)
    scorer.prefix = ""
    assert not np.allclose(scorer.cosines(images, prompts), cosines)
    scorer.prefix = "A photo depicts "

    reference = load_reference_set(str(folder), resolution=32, num_samples=5)
    report = score(
        images,
        prompts,
        reference,
        load_extractor(features=features_file),
        clip=scorer,
        cache=StatsCache(tmp_path / "cache"),
        patch_fid=False,
    )
    assert report["metrics"]["clip_score"] == pytest.approx(float(cosines.mean()))
    assert report["clip_model"] == str(tiny_clip) and report["protocol"]["clip"]["prefix"] == "A photo depicts "
    with pytest.raises(UsageError, match="CLIP model not found"):
        ClipScorer.load(str(tmp_path / "no-clip"))
    with pytest.raises(DmdError, match="cannot load the CLIP model"):
        ClipScorer.load(str(tmp_path))  # a folder, but no CLIP in it


def test_clip_scores_in_float32_with_pil_preprocessing(tiny_clip, tmp_path):
    """As the reference (clip.float(), open_clip's PIL resize), whatever the checkpoint's dtype."""
    from transformers import CLIPModel, CLIPProcessor

    CLIPModel.from_pretrained(tiny_clip).half().save_pretrained(tmp_path / "fp16")
    CLIPProcessor.from_pretrained(tiny_clip).save_pretrained(tmp_path / "fp16")
    scorer = ClipScorer.load(str(tmp_path / "fp16"))
    assert {p.dtype for p in scorer.model.parameters()} == {torch.float32}
    assert type(scorer.processor.image_processor).__name__ == "CLIPImageProcessorPil"


def test_clip_weights_stored_as_pickle_need_allow_pickle(tiny_clip, tmp_path):
    import shutil

    pickled = Path(shutil.copytree(tiny_clip, tmp_path / "pickled"))
    state = ClipScorer.load(str(tiny_clip)).model.state_dict()
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    with pytest.raises(DmdError, match="--allow-pickle"):
        ClipScorer.load(str(pickled))
    loaded = ClipScorer.load(str(pickled), allow_pickle=True)
    assert torch.equal(loaded.model.state_dict()["visual_projection.weight"], state["visual_projection.weight"])
