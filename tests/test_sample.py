"""`dmd sample` on tiny SD / SDXL students and a plain tiny pipeline."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from students import make_student
from typer.testing import CliRunner

from dmdcli import runfiles
from dmdcli.cli import app
from dmdcli.models import samplers
from dmdcli.models.samplers import load_sampler
from dmdcli.models.student import find_model
from dmdcli.sample import MAX_SLUG, image_seed, slug

runner = CliRunner()
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory, tiny_sdxl):
    return make_student(tmp_path_factory.mktemp("sdxl") / "run", tiny_sdxl, "sdxl", "lora", 4)


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory, tiny_sd):
    return make_student(tmp_path_factory.mktemp("sd") / "run", tiny_sd, "sd", "full", 1)


def invoke(*args, input=None):
    result = runner.invoke(app, [str(a) for a in args], input=input)
    assert result.exit_code == 0, result.stderr + repr(result.exception)
    return result


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_stdin_prompts_json_lines_and_png_metadata(tmp_path, sdxl_run):
    out = tmp_path / "images"
    result = invoke(
        "sample",
        "--model",
        sdxl_run,
        "--prompts",
        "-",
        "--num-images-per-prompt",
        "2",
        "--seed",
        "10",
        "--out",
        out,
        "--json",
        input="a red circle\n\na blue square / on white\n",
    )
    records = [json.loads(line) for line in result.stdout.splitlines()]  # nothing but JSON on stdout
    assert [(r["prompt"], r["seed"]) for r in records] == [
        ("a red circle", 10),
        ("a red circle", 11),
        ("a blue square / on white", 12),
        ("a blue square / on white", 13),
    ]
    assert all(r["steps"] == 4 for r in records)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{r['seed']:06d}-{slug(r['prompt'])}.png" for r in records)
    for r in records:
        image = Image.open(r["path"])
        assert image.size == (32, 32)
        assert (image.text["prompt"], image.text["seed"], image.text["steps"]) == (r["prompt"], str(r["seed"]), "4")
        assert image.text["model"] == str(sdxl_run) and "Seed: " in image.text["parameters"]
    assert "sampling" in result.stderr


def test_an_image_depends_on_its_seed_only_not_on_the_batch(tmp_path, sdxl_run):
    args = [
        "sample",
        "--model",
        sdxl_run,
        "--prompt",
        "a cat",
        "--prompt",
        "a dog",
        "--num-images-per-prompt",
        "3",
        "--seed",
        "5",
    ]
    invoke(*args, "--batch-size", "1", "--out", tmp_path / "b1")
    invoke(*args, "--batch-size", "4", "--out", tmp_path / "b4")
    names = sorted(p.name for p in (tmp_path / "b1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b4").iterdir()) and len(names) == 6
    for name in names:
        assert np.abs(pixels(tmp_path / "b1" / name) - pixels(tmp_path / "b4" / name)).max() <= 1
    first = pixels(tmp_path / "b1" / names[0])
    assert any(np.abs(first - pixels(tmp_path / "b1" / n)).mean() > 1 for n in names[1:])  # seeds differ
    # Image 2 of prompt 1 has seed 5 + 1·3 + 2 = 10 and comes back alone with --seed 10.
    assert image_seed(5, 1, 2, 3) == 10
    invoke("sample", "--model", sdxl_run, "--prompt", "a dog", "--seed", "10", "--out", tmp_path / "alone")
    assert (
        np.abs(pixels(tmp_path / "alone" / "000010-a-dog.png") - pixels(tmp_path / "b4" / "000010-a-dog.png")).max()
        <= 1
    )


def test_one_unet_call_per_step_and_no_guidance_pass(sdxl_run, sd_run):
    for run, steps in [(sdxl_run, 4), (sd_run, 1)]:
        sampler = load_sampler(find_model(str(run)), torch.device("cpu"), torch.float32)
        batches = []
        sampler.unet.register_forward_hook(
            lambda module, args, kwargs, out: batches.append(args[0].shape[0]), with_kwargs=True
        )
        images = sampler.generate(["a", "b", "c"], [0, 1, 2], None, None, steps)
        assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
        assert batches == [3] * steps


def test_file_names_are_safe_and_bounded(tmp_path, sd_run):
    long = "x" * 500
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"../../etc/passwd\nC:\\Users\\me\n{long}\n{{\"prompt\": \"ünïcode ✓\"}}\n")
    out = tmp_path / "images"
    result = invoke("sample", "--model", sd_run, "--prompts", prompts, "--out", out, "--json", "--format", "jpg")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 4 and len(list(out.iterdir())) == 4
    for r in records:
        path = out / r["path"].rsplit("/", 1)[-1]
        assert str(path) == r["path"] and path.is_file() and path.parent == out
        assert len(path.name) <= MAX_SLUG + len("000000-.jpg")
        assert json.loads(Image.open(path).getexif()[0x010E])["prompt"] == r["prompt"]  # EXIF for JPEG
    assert slug("../../etc/passwd") == "etc-passwd" and slug("✓") == "image"


def test_existing_images_are_kept_unless_overwrite(tmp_path, sd_run):
    args = ["sample", "--model", sd_run, "--prompt", "a cat", "--out", tmp_path, "--format", "webp"]
    invoke(*args)
    target = tmp_path / "000000-a-cat.webp"
    target.write_bytes(b"mine")
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2 and "already exist" in result.stderr and target.read_bytes() == b"mine"
    invoke(*args, "--overwrite")
    assert Image.open(target).size == (32, 32)
    result = runner.invoke(app, [str(a) for a in args[:-4]] + ["--out", str(target), "--overwrite"])  # a file as --out
    assert result.exit_code == 2 and "is a file; it must be a folder" in result.stderr, result.stderr
    result = runner.invoke(app, [str(a) for a in args[:-4]] + ["--out", str(target / "images")])  # below a file
    assert result.exit_code == 2 and f"is below {target}, which is a file" in result.stderr, result.stderr


def test_interrupted_sampling_keeps_announced_images(tmp_path, sdxl_run, monkeypatch):
    real = samplers.StudentSampler.generate
    calls = []

    def generate(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(samplers.StudentSampler, "generate", generate)
    out = tmp_path / "images"
    result = runner.invoke(
        app,
        [
            "sample",
            "--model",
            str(sdxl_run),
            "--prompt",
            "a",
            "--num-images-per-prompt",
            "5",
            "--batch-size",
            "2",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 130
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["seed"] for r in records] == [0, 1]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        r["path"].rsplit("/", 1)[-1] for r in records
    )  # no temp files


def test_plain_pipeline_uses_its_own_scheduler_steps_and_guidance(tmp_path, tiny_sd):
    from diffusers import DiffusionPipeline

    out = tmp_path / "teacher"
    result = invoke(
        "sample",
        "--model",
        tiny_sd,
        "--prompt",
        "a red circle",
        "--steps",
        "3",
        "--guidance-scale",
        "2.5",
        "--seed",
        "4",
        "--out",
        out,
        "--json",
    )
    record = json.loads(result.stdout)
    assert record["steps"] == 3 and record["seed"] == 4
    pipe = DiffusionPipeline.from_pretrained(tiny_sd)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red circle", num_inference_steps=3, guidance_scale=2.5, generator=torch.Generator("cpu").manual_seed(4)
    ).images[0]
    assert np.abs(np.asarray(image).astype(int) - pixels(record["path"])).max() <= 1


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--model", "/no/such/run", "--prompt", "a"], 2, "model not found"),
        (["--model", "{run}"], 2, "no prompts"),
        (["--model", "{run}", "--prompt", "a", "--guidance-scale", "3"], 2, "without classifier-free guidance"),
        (["--model", "{run}", "--prompt", "a", "--height", "30"], 2, "multiple of"),
        (["--model", "{run}", "--prompt", "a", "--format", "gif"], 2, "unknown image format"),
        (["--model", "{empty}", "--prompt", "a"], 1, "no student yet"),
        (["--model", "{run}", "--prompt", "a", "--resolution", "4"], 2, "at least 8"),  # the UNet's last 1×1 would fail
        (["--model", "{run}", "--prompt", "a", "--steps", "1001"], 2, "'--steps'"),
        (["--model", "{run}", "--prompts", "{empty}"], 2, "is a folder, not a prompts file"),
    ],
)
def test_usage_errors(tmp_path, sd_run, args, code, message):
    empty = tmp_path / "run"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    args = [a.format(run=sd_run, empty=empty) for a in args]
    result = runner.invoke(app, ["sample", *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == code, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_mistyped_local_path_is_not_tried_as_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # runs/ is here, so runs/shapes-4stpe is a path, and a missing one
    result = runner.invoke(app, ["sample", "--model", "runs/shapes-4stpe", "--prompt", "a"])
    assert result.exit_code == 2 and result.stderr.strip() == "error: model not found: runs/shapes-4stpe"
    # A hub id that cannot be loaded (offline here): one line, without diffusers' pointer to a stack trace.
    result = runner.invoke(app, ["sample", "--model", "nosuch-org/nosuch-model", "--prompt", "a"])
    assert result.exit_code == 1 and "could not load pipeline nosuch-org/nosuch-model" in result.stderr
    assert "stacktrace" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "samples").exists()


def test_a_prompt_over_the_text_encoders_limit_is_named(tmp_path, sd_run):
    long = " ".join(["a red circle beside a blue square"] * 12)  # 84 words: over CLIP's 77 tokens
    result = invoke("sample", "--model", sd_run, "--prompt", "a cat", "--prompt", long, "--out", tmp_path)
    assert "note: 1 of 2 prompts are longer than the text encoder's 77 tokens" in " ".join(result.stderr.split())
    assert (
        "longer than"
        not in invoke("sample", "--model", sd_run, "--prompt", "a cat", "--out", tmp_path / "short").stderr
    )


def test_an_empty_prompt_is_kept_and_keeps_the_seed_rule(tmp_path, sd_run):
    result = invoke(
        "sample", "--model", sd_run, "--prompt", "", "--prompt", "b", "--out", tmp_path, "--json", "--quiet"
    )
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["prompt"], r["seed"]) for r in records] == [("", 0), ("b", 1)]


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 8.00 GiB total capacity)"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 400000000000000 bytes. Error code 12 (Cannot allocate memory)"
        ),
        MemoryError(),
    ],
)
def test_out_of_memory_is_one_line_and_writes_nothing(tmp_path, sd_run, monkeypatch, error):
    def generate(self, *args):
        raise error

    monkeypatch.setattr(samplers.StudentSampler, "generate", generate)
    result = runner.invoke(
        app, ["sample", "--model", str(sd_run), "--prompt", "a", "--out", str(tmp_path / "out"), "--quiet"]
    )
    assert result.exit_code == 1, result.stderr + repr(result.exception)
    last = result.stderr.strip().splitlines()[-1]  # (transformers' loading bar may come before it under CliRunner)
    assert last.startswith("error: out of memory") and last.endswith("try a smaller --batch-size or --resolution")
    assert result.stderr.count("error") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_distill_run_folder_samples_and_exports(tmp_path, tiny_sdxl, prompts_file):
    run = tmp_path / "run"
    invoke(
        "distill",
        "--recipe",
        "tiny",
        "--iterations",
        "1",
        "--batch-size",
        "2",
        "--teacher",
        tiny_sdxl,
        "--steps",
        "2",
        "--lora-rank",
        "2",
        "--prompts",
        prompts_file,
        "--out",
        run,
        "--sample-every",
        "0",
        "--quiet",
    )
    result = invoke(
        "sample", "--model", run, "--prompts", prompts_file, "--out", tmp_path / "images", "--json", "--quiet"
    )
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 3 and all(r["steps"] == 2 for r in records)
    record = json.loads(invoke("export", "--model", run, "--format", "kohya", "--json", "--quiet").stdout)
    assert record["path"] == str(run / "export" / "kohya.safetensors") and record["timesteps"] == [999, 499]


def test_a_checkpoint_is_the_generator_as_it_was_then(tmp_path, tiny_sd, prompts_file):
    """`--model RUN/checkpoints/iter-N` samples and exports the generator of iteration N."""

    run = tmp_path / "run"
    invoke(
        "distill",
        "--recipe",
        "tiny",
        "--iterations",
        "4",
        "--batch-size",
        "2",
        "--teacher",
        tiny_sd,
        "--steps",
        "2",
        "--fake-updates-per-gen",
        "1",
        "--warmup-steps",
        "0",
        "--lr",
        "1e-2",
        "--prompts",
        prompts_file,
        "--out",
        run,
        "--checkpoint-every",
        "2",
        "--keep-checkpoints",
        "2",
        "--sample-every",
        "0",
        "--teacher-grid-steps",
        "0",
        "--quiet",
    )
    last, earlier = run / "checkpoints" / "iter-000004", run / "checkpoints" / "iter-000002"

    def image(model, name):
        invoke(
            "sample", "--model", model, "--prompt", "a red circle", "--seed", "3", "--out", tmp_path / name, "--quiet"
        )
        return pixels(next((tmp_path / name).iterdir()))

    final = image(run, "final")
    assert np.array_equal(image(last, "last"), final)  # the run's student is its last checkpoint's generator
    assert not np.array_equal(image(earlier, "earlier"), final)
    assert find_model(str(earlier)).info["iterations"] == 2

    record = json.loads(invoke("export", "--model", earlier, "--format", "unet", "--json", "--quiet").stdout)
    exported = run / "export" / "iter-000002-unet.safetensors"  # beside the run's exports, not in the checkpoint
    assert record["path"] == str(exported) and runfiles.read_student_info(exported)["iterations"] == 2
    assert np.array_equal(image(exported, "exported"), image(earlier, "earlier-again"))

    # Checkpoints written before they recorded their student: the run's student file's metadata.
    state = json.loads((earlier / "state.json").read_text())
    del state["student"]
    (earlier / "state.json").write_text(json.dumps(state))
    old = find_model(str(earlier))
    assert old.checkpoint == "iter-000002" and old.info == {
        **runfiles.read_student_info(run / "student.safetensors"),
        "iterations": 2,
    }


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_a_student_is_read_in_the_sampling_dtype_as_an_fp32_read_then_cast(tmp_path, tiny_sd, kind):
    """`dmd sample` reads the network in its dtype straight onto the device, not whole in fp32 on
    the host first: a full student's weights are then exactly the fp32 student cast; a LoRA
    student's of this fp32-stored teacher within bf16's precision of it (its weights are rounded
    before each layer's delta is added in fp32)."""
    from dmdcli.models.samplers import StudentSampler
    from dmdcli.models.student import load_student_network

    source = find_model(str(make_student(tmp_path / "run", tiny_sd, "sd", kind, 1)))
    lean = StudentSampler(source, torch.device("cpu"), torch.bfloat16).unet.state_dict()
    cast = load_student_network(source).to(torch.bfloat16).state_dict()  # read in fp32, fused, cast
    assert lean.keys() == cast.keys() and {v.dtype for v in lean.values()} == {torch.bfloat16}
    if kind == "full":
        assert all(torch.equal(lean[k], cast[k]) for k in lean)
    else:
        differ = [k for k in lean if not torch.equal(lean[k], cast[k])]
        assert differ and all(k.endswith(".weight") for k in differ)  # the fused weights alone
        # The teacher's fp32 weights are rounded before the delta is added (exact for weights stored
        # in bf16: the next test): one bf16 step at the tensor's scale.
        assert all(
            (lean[k].float() - cast[k].float()).abs().max() <= 2**-7 * cast[k].float().abs().max() for k in differ
        )


def test_a_lora_student_of_a_bf16_teacher_reads_as_fp32_fused_then_cast(tmp_path, tiny_sd):
    """Where the teacher stores bf16 (FLUX, FLUX.2, Qwen-Image and Z-Image ship so), the lean reads
    of `dmd sample` and `dmd export --dtype bf16` fuse a LoRA student to the very bits of an fp32
    read fused then cast: each layer's delta is added in fp32 and the sum rounded once (a "safe"
    merge, which rounds the delta to bf16 first, fails this)."""
    import shutil

    from diffusers import UNet2DConditionModel

    from dmdcli.models.samplers import StudentSampler
    from dmdcli.models.student import load_student_network

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_sd, teacher)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").to(torch.bfloat16)
    unet.save_pretrained(teacher / "unet", safe_serialization=True)
    source = find_model(str(make_student(tmp_path / "run", teacher, "sd", "lora", 1)))
    cast = load_student_network(source).to(torch.bfloat16).state_dict()  # read in fp32, fused, cast
    exported = load_student_network(source, dtype=torch.bfloat16).state_dict()
    sampled = StudentSampler(source, torch.device("cpu"), torch.bfloat16).unet.state_dict()
    fused = [k for k in cast if not torch.equal(cast[k], unet.state_dict()[k])]
    assert fused and all(k.endswith(".weight") for k in fused)  # the LoRA moved the targeted weights
    for lean in (exported, sampled):
        assert lean.keys() == cast.keys() and all(torch.equal(lean[k], cast[k]) for k in cast)
