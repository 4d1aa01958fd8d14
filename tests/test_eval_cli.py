"""`dmd eval` end to end on a tiny student and a tiny pipeline: offline, with a tiny TorchScript
feature extractor made here, a small captioned folder and a fake COCO layout."""

import json
import math
import shutil

import numpy as np
import pytest
from extractors import save_tiny_extractor
from PIL import Image, ImageDraw
from students import make_student
from typer.testing import CliRunner

from dmdcli import runfiles
from dmdcli.cli import app
from dmdcli.errors import UsageError
from dmdcli.eval import run as eval_run
from dmdcli.eval.features import FeatureExtractor
from dmdcli.eval.protocol import select_coco
from dmdcli.sample import slug

runner = CliRunner()
pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning",
    "ignore:__array__ implementation:DeprecationWarning",
    "ignore:The `disp` argument:DeprecationWarning",
    "ignore:Matrix is singular",
)  # FID of 3 images in 11 dimensions
COLORS = ["red", "blue", "green"]
N = 8
WIDE = {"COLUMNS": "250"}  # rich tables fit long model paths on one line


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return save_tiny_extractor(tmp_path_factory.mktemp("extractor") / "tiny.pt")


@pytest.fixture(scope="module")
def student(tmp_path_factory, tiny_sd):
    """A 2-step full-weight student run folder (student.safetensors only)."""
    return make_student(tmp_path_factory.mktemp("student") / "run", tiny_sd, "sd", "full", 2)


@pytest.fixture
def run(tmp_path, student):
    """A fresh copy of the run folder: evaluating a run writes into it."""
    return shutil.copytree(student, tmp_path / "run")


def disc(color: str, size=(40, 40)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).ellipse([8, 8, size[0] - 8, size[1] - 8], fill=color)
    return image


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Eight captioned 40×40 discs (caption in a .txt beside each image)."""
    folder = tmp_path_factory.mktemp("refs") / "refs"
    folder.mkdir()
    for i in range(N):
        disc(COLORS[i % 3]).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {COLORS[i % 3]} circle")
    return folder


@pytest.fixture
def counted(monkeypatch):
    """Counts the images every feature extractor sees."""
    seen = {"images": 0}
    real = FeatureExtractor.__call__

    def call(self, batch):
        seen["images"] += batch.shape[0]
        return real(self, batch)

    monkeypatch.setattr(FeatureExtractor, "__call__", call)
    return seen


def invoke(*args, code=0, env=None):
    result = runner.invoke(app, ["eval", *[str(a) for a in args]], env=env)
    assert result.exit_code == code, result.stderr + repr(result.exception)
    return result


def png_text(path):
    with Image.open(path) as image:
        return dict(image.text)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_run_folder_report_grid_cache_reuse_and_same_numbers(run, refs, features, tmp_path, counted):
    cache = tmp_path / "cache"
    args = ["--model", run, "--fid", refs, "--features", features, "--cache-dir", cache, "--json"]
    first = json.loads(invoke(*args).stdout)  # one JSON line, nothing else on stdout
    report_path = run / f"eval-folder-refs-{N}.json"  # default --out: the run folder
    assert json.loads(report_path.read_text()) == first
    metrics = first["metrics"]
    for key in ("fid", "kid", "patch_fid", "seconds_per_image"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key])
    assert metrics["fid"] > 0 and metrics["patch_fid"] > 0 and metrics["seconds_per_image"] > 0
    assert metrics["nfe_per_image"] == 2 and first["generation"]["denoiser_calls"] == 2 * 2  # 2 batches × 2 steps
    assert first["model"] == str(run) and first["seed"] == 0 and first["num_samples"] == N
    assert first["protocol"]["name"] == "folder" and first["protocol"]["resolution"] == 256
    assert first["extractor"].startswith("torchscript:") and first["clip_model"] is None
    assert first["generation"]["steps"] == 2 and first["generation"]["timesteps"] == [999, 499]
    assert not first["reference_stats"]["fid"]["cached"] and not first["reference_stats"]["patch"]["cached"]
    assert counted["images"] == 4 * N  # reference and generated, for FID and for patch FID

    images = run / f"eval-folder-refs-{N}"
    files = sorted(images.iterdir())
    assert [f.name for f in files] == [f"{i:06d}-a-{COLORS[i % 3]}-circle.png" for i in range(N)]
    assert [(png_text(f)["prompt"], png_text(f)["seed"]) for f in files] == [
        (f"a {COLORS[i % 3]} circle", str(i)) for i in range(N)
    ]  # image i: prompt i, seed 0 + i
    grid = Image.open(run / f"eval-folder-refs-{N}-grid.png")
    assert grid.size == (4 * 32, 2 * 32)
    assert first["files"] == {
        "report": str(report_path),
        "grid": str(run / f"eval-folder-refs-{N}-grid.png"),
        "images": str(images),
    }

    # An existing report is never replaced silently, and nothing is loaded to find that out.
    before = report_path.read_bytes()
    result = invoke(*args, code=2)
    assert "already exists" in result.stderr and "--overwrite" in result.stderr and result.stdout == ""
    assert report_path.read_bytes() == before

    # Again with --overwrite: the reference statistics come from the cache (not recomputed, the
    # cache files untouched), and the same model with the same seed gives the same numbers.
    entries = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in cache.iterdir()}
    assert len(entries) == 4
    counted["images"] = 0
    old_pixels = [pixels(f) for f in files]
    second = json.loads(invoke(*args, "--overwrite").stdout)
    assert counted["images"] == 2 * N  # only the generated images
    assert second["reference_stats"]["fid"]["cached"] and second["reference_stats"]["patch"]["cached"]
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in cache.iterdir()} == entries
    same = lambda m: {k: v for k, v in m.items() if k != "seconds_per_image"}  # noqa: E731
    assert same(second["metrics"]) == same(metrics)
    assert all(np.array_equal(old, pixels(f)) for old, f in zip(old_pixels, files))

    # Another seed: other images, other numbers, its own report name.
    third = json.loads(invoke(*args, "--seed", "100").stdout)
    assert third["seed"] == 100 and third["metrics"]["fid"] != metrics["fid"]
    assert png_text(run / f"eval-folder-refs-{N}-seed100" / "000100-a-red-circle.png")["seed"] == "100"


def test_two_models_two_reports_and_a_table(student, tiny_sd, refs, features, tmp_path):
    out = tmp_path / "out"
    result = invoke(
        "--model",
        student,
        "--model",
        tiny_sd,
        "--fid",
        refs,
        "--num-samples",
        "4",
        "--steps",
        "2",
        "--features",
        features,
        "--cache-dir",
        tmp_path / "cache",
        "--out",
        out,
        "--json",
        env=WIDE,
    )
    student_report, teacher_report = [json.loads(line) for line in result.stdout.splitlines()]
    assert (student_report["model"], teacher_report["model"]) == (str(student), str(tiny_sd))
    for report in (student_report, teacher_report):
        path = out / slug(report["model"]) / "eval-folder-refs-4-2steps.json"
        assert json.loads(path.read_text()) == report and report["num_samples"] == 4
    # a student: one UNet call per step; the pipeline: CFG (its default scale 7.5) doubles its batch
    assert student_report["metrics"]["nfe_per_image"] == 2 and student_report["generation"]["guidance_scale"] is None
    assert teacher_report["metrics"]["nfe_per_image"] == 4 and teacher_report["generation"]["guidance_scale"] == 7.5
    assert teacher_report["generation"]["kind"] == "pipeline"
    # computed once, before either model loaded (so neither report found them in the disk cache)
    assert student_report["reference_stats"] == teacher_report["reference_stats"]
    assert not teacher_report["reference_stats"]["fid"]["cached"]
    table = result.stderr[result.stderr.index("dmd eval") :]
    for report in (student_report, teacher_report):
        row = next(line for line in table.splitlines() if report["model"] in line)
        assert "folder@256" in row and f"{report['metrics']['fid']:.2f}" in row
        assert f"{report['metrics']['nfe_per_image']:g}" in row


def test_fake_coco_layout_scores_a_prefix(student, features, tmp_path):
    ids = [391, 42, 7, 1000, 555, 13]
    annotations = {
        "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in ids],
        "annotations": [
            {"id": 10 * k + j, "image_id": i, "caption": f"a {COLORS[(k + j) % 3]} disc {j}"}
            for k, i in enumerate(ids)
            for j in range(k % 3 + 1)
        ],
    }
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(annotations))
    (root / "val2014").mkdir()
    for k, image in enumerate(annotations["images"]):
        disc(COLORS[k % 3], (48, 36)).save(root / "val2014" / image["file_name"])

    out = tmp_path / "out"
    report = json.loads(
        invoke(
            "--model",
            student,
            "--fid",
            "coco30k",
            "--coco-root",
            root,
            "--num-samples",
            "3",
            "--features",
            features,
            "--cache-dir",
            tmp_path / "cache",
            "--out",
            out,
            "--json",
        ).stdout
    )
    assert report["num_samples"] == 3 and json.loads((out / "eval-coco30k-3.json").read_text()) == report
    assert (report["protocol"]["name"], report["protocol"]["set_size"], report["protocol"]["resolution"]) == (
        "coco30k",
        30000,
        256,
    )
    prompts = [caption for _, caption in select_coco(annotations, 3, seed=0)]
    images = sorted((out / "eval-coco30k-3").iterdir())
    assert [png_text(p)["prompt"] for p in images] == prompts
    assert math.isfinite(report["metrics"]["fid"]) and math.isfinite(report["metrics"]["patch_fid"])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--fid", "{missing}"], "no such folder"),
        (["--fid", "coco30k"], "--coco-root"),
        (["--fid", "coco10k", "--coco-root", "{missing}"], "not found"),
        (["--fid", "{refs}", "--num-samples", "9"], "more than the 8"),
        (["--fid", "{refs}", "--guidance-scale", "3"], "without classifier-free guidance"),
        (["--fid", "{refs}", "--features", "{missing}/tiny.pt"], "feature extractor not found"),
        (["--fid", "{refs}", "--num-samples", "1"], "--num-samples must be at least 2"),
        (["--fid", "shapes", "--num-samples", "-5"], "--num-samples must be at least 2"),  # every set, not only folders
        (["--fid", "{empty}"], "no images with captions"),  # as much a usage error as a missing folder
        ([], "--fid is required: coco30k or coco10k (with --coco-root), a captioned image folder, or shapes"),
        (
            ["--fid", "shapes", "--eval-resolution", "128"],
            "--eval-resolution, --features: for reference sets",
        ),  # not ignored
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(run, refs, features, tmp_path, args, message):
    missing = tmp_path / "no-such-folder"
    empty = tmp_path / "uncaptioned"
    empty.mkdir()
    disc("red").save(empty / "0.png")  # an image without a caption
    args = [a.format(missing=missing, refs=refs, empty=empty) for a in args]
    if "--features" not in args:
        args += ["--features", str(features)]
    before = sorted(p.name for p in run.iterdir())
    result = invoke("--model", run, *args, "--cache-dir", tmp_path / "cache", code=2)
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert sorted(p.name for p in run.iterdir()) == before  # no report, grid or image folder in the run
    assert not (tmp_path / "cache").exists()
    result = invoke("--model", run, *args, "--out", tmp_path / "out", code=2)
    assert not (tmp_path / "out").exists()


def test_models_of_the_built_in_teacher_default_to_its_set(tmp_path):
    """No --fid: the shapes teacher's own set (refusing a reference set's option, before anything loads)."""
    from dmdcli.shapes import teacher_path

    result = invoke("--model", teacher_path(), "--eval-resolution", "128", "--out", tmp_path / "out", code=2)
    assert "--eval-resolution: for reference sets; --fid shapes scores" in result.stderr


@pytest.mark.parametrize("n", [1, 0, -5])
def test_every_set_refuses_fewer_than_two_samples_before_it_is_built(n):
    """The shapes set read --num-samples 0 as "all 2000" and hung on 1; none of it may be built."""
    with pytest.raises(UsageError, match="at least 2"):
        eval_run.open_benchmark("shapes", eval_run.EvalOptions(num_samples=n))


def test_steps_beyond_the_schedule_and_mistyped_paths_are_usage_errors(run, refs, tmp_path, monkeypatch):
    result = invoke("--model", run, "--fid", refs, "--steps", "2000", "--out", tmp_path / "out", code=2)
    assert "'--steps'" in result.stderr and not (tmp_path / "out").exists()
    monkeypatch.chdir(tmp_path)  # holds run/: run/typo is a missing local path, not a hub id
    result = invoke("--model", "run/typo", "--fid", refs, code=2)
    assert result.stderr.strip() == "error: model not found: run/typo"


def test_a_benchmark_that_is_not_inception_based_plugs_in(student, tmp_path, monkeypatch):
    """The extension point: a registered --fid name gets the generated images and writes the report."""
    calls = []

    class Redness:
        label = "redness"
        prompts = ["a red circle", "a blue circle", "a green circle"]

        def __init__(self, options):
            calls.append(("open", options.num_samples))

        def describe(self):
            return "mean red channel"

        def prepare(self, progress=None):
            calls.append(("prepare",))

        def score(self, generation, progress):
            calls.append(("score", [p.name for p in generation.paths]))
            red = float(np.mean([pixels(p)[..., 0].mean() for p in generation.paths]))
            return {
                "format": "redness/1",
                "model": generation.model,
                "num_samples": len(generation.paths),
                "metrics": {
                    "red": red,
                    "seconds_per_image": generation.seconds_per_image,
                    "nfe_per_image": generation.nfe_per_image,
                },
            }

    monkeypatch.setitem(eval_run.BENCHMARKS, "redness", Redness)
    report = json.loads(invoke("--model", student, "--fid", "redness", "--out", tmp_path, "--json").stdout)
    assert calls[:2] == [("open", None), ("prepare",)]
    assert calls[2] == ("score", ["000000-a-red-circle.png", "000001-a-blue-circle.png", "000002-a-green-circle.png"])
    assert report["metrics"]["nfe_per_image"] == 2 and 0 <= report["metrics"]["red"] <= 255
    assert json.loads((tmp_path / "eval-redness-3.json").read_text()) == report


def test_a_checkpoint_is_scored_into_its_run_folder(run, refs, features, tmp_path):
    """A checkpoint's report sits in the run folder beside the student's, named after it."""
    import torch
    from safetensors.torch import load_file, save_file

    checkpoint = run / "checkpoints" / "iter-000002"
    checkpoint.mkdir(parents=True)
    weights = load_file(run / runfiles.STUDENT_FILE)
    save_file(
        {**{f"generator.{k}": v for k, v in weights.items()}, "fake_score.x": torch.zeros(3)},
        checkpoint / "tensors.safetensors",
    )
    info = {**runfiles.read_student_info(run / runfiles.STUDENT_FILE), "iterations": 2}
    (checkpoint / "state.json").write_text(json.dumps({"iteration": 2, "student": info}))
    args = ["--fid", refs, "--features", features, "--cache-dir", tmp_path / "cache", "--json"]
    of_checkpoint = json.loads(invoke("--model", checkpoint, *args).stdout)
    of_student = json.loads(invoke("--model", run, *args).stdout)
    assert of_checkpoint["files"]["report"] == str(run / f"eval-folder-refs-{N}-iter-000002.json")
    assert of_student["files"]["report"] == str(run / f"eval-folder-refs-{N}.json")
    same = lambda m: {k: v for k, v in m.items() if k != "seconds_per_image"}  # noqa: E731
    assert same(of_checkpoint["metrics"]) == same(of_student["metrics"])  # the same generator weights
    # Side by side, each report goes where it goes alone; the same model twice is refused.
    both = invoke("--model", run, "--model", checkpoint, *args, "--overwrite").stdout.splitlines()
    assert [json.loads(line)["files"]["report"] for line in both] == [
        of_student["files"]["report"],
        of_checkpoint["files"]["report"],
    ]
    twice = invoke("--model", run, "--model", run / ".." / "run", *args, "--overwrite", code=2)
    assert "names a model given before" in twice.stderr


def test_another_eval_resolution_gets_its_own_report(refs):
    """Scores at another --eval-resolution are another protocol: a report beside the default's, not a clash."""
    assert eval_run.open_benchmark(str(refs), eval_run.EvalOptions()).label == "folder-refs"
    assert eval_run.open_benchmark(str(refs), eval_run.EvalOptions(eval_resolution=64)).label == "folder-refs-at64px"


def test_reference_trouble_fails_before_generation_and_overwrite_drops_the_old_report(
    run, refs, features, tmp_path, monkeypatch
):
    bad = shutil.copytree(refs, tmp_path / "bad")
    disc("red").save(bad / "3.jpg")
    (bad / "3.jpg").write_bytes((bad / "3.jpg").read_bytes()[:-50])  # passes PIL's verify, fails to load
    (bad / "3.png").rename(bad / "3.png.off")
    for args, code, message in (
        ([bad], 1, f"error: cannot read image {bad / '3.jpg'}: image file is truncated"),
        ([refs, "--cache-dir", refs / "0.png"], 2, f"error: --cache-dir {refs / '0.png'} is a file"),
    ):
        result = invoke("--model", run, "--fid", *args, "--features", features, code=code)
        errors = [line for line in result.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and errors[0].startswith(message) and "Traceback" not in result.stderr, result.stderr
        assert not list(run.glob("eval-*"))  # found before any image was generated

    args = ["--model", run, "--fid", refs, "--features", features, "--cache-dir", tmp_path / "cache"]
    invoke(*args)
    report = run / f"eval-folder-refs-{N}.json"
    assert report.is_file()

    def fail(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_run, "generate", fail)  # --overwrite, stopped while generating
    runner.invoke(app, ["eval", *map(str, args), "--overwrite"])
    assert not report.exists()  # not the old report beside new images
