"""`dmd export` on tiny SD / SDXL students: every format reloads in plain diffusers and gives the student back."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from students import ALPHA, RANK, make_student, unet_inputs
from typer.testing import CliRunner

from dmdcli.cli import app
from dmdcli.models.student import find_model, load_student_network
from dmdcli.models.student_schedulers import TIMESTEP_SCALING, student_scheduler
from dmdcli.models.teacher import inspect_teacher

runner = CliRunner()
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def students(tmp_path_factory, tiny_sd, tiny_sdxl):
    """Run folders holding a student: (layout, kind, steps) → folder."""
    root = tmp_path_factory.mktemp("students")
    cases = [("sd", "full", 4), ("sd", "lora", 1), ("sdxl", "lora", 1), ("sdxl", "full", 4), ("sdxl", "lora", 4)]
    teachers = {"sd": tiny_sd, "sdxl": tiny_sdxl}
    return {c: make_student(root / "-".join(map(str, c)), teachers[c[0]], *c) for c in cases}


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr + repr(result.exception)
    return result


def load_pipeline(path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_scheduler_gives_the_students_timesteps_and_pure_x0(tiny_sd, tiny_sdxl):
    from diffusers import DDPMScheduler

    # Beta schedules LCMScheduler builds itself, and one it does not (then the betas are written out).
    for beta_schedule in ("linear", "squaredcos_cap_v2", "sigmoid"):
        config = {"num_train_timesteps": 1000, "beta_schedule": beta_schedule, "beta_start": 0.00085, "beta_end": 0.012}
        scheduler = student_scheduler(config, [999, 749, 499, 249])
        assert torch.equal(scheduler.alphas_cumprod, DDPMScheduler.from_config(config).alphas_cumprod)

    for teacher, timesteps in [
        (tiny_sd, [999, 749, 499, 249]),
        (tiny_sd, [999, 499]),
        (tiny_sd, [999]),
        (tiny_sdxl, [399]),
    ]:
        config = inspect_teacher(str(teacher)).scheduler_config
        scheduler = student_scheduler(config, timesteps)
        assert scheduler.config.original_inference_steps == scheduler.config.num_train_timesteps
        scheduler.set_timesteps(len(timesteps))  # plain num_inference_steps=N, nothing else
        assert scheduler.timesteps.tolist() == timesteps
        teacher_alphas = DDPMScheduler.from_config(config).alphas_cumprod
        assert torch.equal(scheduler.alphas_cumprod, teacher_alphas[: len(scheduler.alphas_cumprod)])
        for t in timesteps:  # LCM's boundary condition reduces to x0 at float32 resolution
            c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
            assert float(c_skip) < 1e-12 and float(c_out) == 1.0
    assert TIMESTEP_SCALING > 10


@pytest.mark.parametrize("case", [("sd", "full", 4), ("sdxl", "lora", 1), ("sdxl", "full", 4)])
def test_diffusers_export_reproduces_dmd_sample(tmp_path, students, case):
    run, steps = students[case], case[2]
    out = tmp_path / "pipeline"
    result = invoke("export", "--model", run, "--format", "diffusers", "--out", out, "--json")
    record = json.loads(result.stdout)
    assert record["path"] == str(out) and record["format"] == "diffusers" and (out / "model_index.json").is_file()
    assert not list(tmp_path.glob(".*tmp*"))  # the scratch folder is gone
    assert all(not p.name.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")) for p in out.rglob("*"))
    snippet = result.stderr[result.stderr.index("import torch") :].strip()
    # One line of ours while it works: no bar stuck at "0/?", no transformers bar for the text encoders.
    assert (
        "exporting diffusers" in result.stderr
        and "0/?" not in result.stderr
        and "Writing model shards" not in result.stderr
    )

    invoke("sample", "--model", run, "--prompt", "a photo of a cat", "--seed", "0", "--out", tmp_path / "ours")
    ours = np.asarray(Image.open(next((tmp_path / "ours").glob("*.png"))).convert("RGB")).astype(int)

    # Plain diffusers, as the README says, and as the printed snippet does.
    pipe = load_pipeline(out)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    image = pipe(
        "a photo of a cat", num_inference_steps=steps, guidance_scale=0, generator=torch.Generator("cpu").manual_seed(0)
    ).images[0]
    assert np.abs(np.asarray(image).astype(int) - ours).mean() <= 2.0
    assert pipe.scheduler.timesteps.tolist() == ([999, 749, 499, 249] if steps == 4 else [399])
    namespace = {}
    exec(snippet, namespace)  # noqa: S102 - our own printed snippet
    assert np.abs(np.asarray(namespace["image"]).astype(int) - ours).mean() <= 2.0
    # ...and dmd sample reads the exported folder too.
    invoke("sample", "--model", out, "--prompt", "a photo of a cat", "--seed", "0", "--out", tmp_path / "again")
    again = np.asarray(Image.open(next((tmp_path / "again").glob("*.png"))).convert("RGB")).astype(int)
    assert np.abs(again - ours).mean() <= 2.0


def test_a_student_with_a_ladder_of_its_own_exports_to_the_same_image(tmp_path, tiny_sd):
    """--student-timesteps 999,599,199: LCM's num_inference_steps=3 gives 999, 666, 333, so the
    exported pipeline is called with timesteps= (the printed snippet does), as dmd sample steps."""
    run = make_student(tmp_path / "run", tiny_sd, "sd", "full", 3, timesteps=[999, 599, 199])
    out = tmp_path / "pipeline"
    result = invoke("export", "--model", run, "--format", "diffusers", "--out", out)
    snippet = result.stderr[result.stderr.index("import torch") :].strip()
    assert "timesteps=[999, 599, 199]" in snippet
    invoke("sample", "--model", run, "--prompt", "a photo of a cat", "--seed", "0", "--out", tmp_path / "ours")
    ours = np.asarray(Image.open(next((tmp_path / "ours").glob("*.png"))).convert("RGB")).astype(int)
    namespace = {}
    exec(snippet, namespace)  # noqa: S102 - our own printed snippet
    assert np.abs(np.asarray(namespace["image"]).astype(int) - ours).mean() <= 2.0
    assert namespace["pipe"].scheduler.timesteps.tolist() == [999, 599, 199]


def test_v_prediction_student_exports_to_the_same_image(tmp_path):
    from dmdcli.models.tiny import tiny_pipeline_cached

    run = make_student(tmp_path / "run", tiny_pipeline_cached("sd", "v_prediction"), "sd", "full", 2)
    invoke("export", "--model", run, "--format", "diffusers", "--out", tmp_path / "pipeline")
    record = json.loads(
        invoke(
            "sample", "--model", run, "--prompt", "a cat", "--seed", "9", "--out", tmp_path / "ours", "--json"
        ).stdout
    )
    pipe = load_pipeline(tmp_path / "pipeline")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    image = pipe(
        "a cat", num_inference_steps=2, guidance_scale=0, generator=torch.Generator("cpu").manual_seed(9)
    ).images[0]
    ours = np.asarray(Image.open(record["path"]).convert("RGB")).astype(int)
    assert np.abs(np.asarray(image).astype(int) - ours).mean() <= 2.0


@pytest.mark.parametrize("layout", ["sd", "sdxl"])
@pytest.mark.parametrize("fmt", ["lora", "kohya"])
def test_lora_files_load_into_the_teacher_and_reproduce_the_student(
    tmp_path, students, tiny_sd, tiny_sdxl, layout, fmt
):
    from peft.tuners.tuners_utils import BaseTunerLayer

    run = students[(layout, "lora", 1 if layout == "sd" else 4)]
    out = tmp_path / f"{fmt}.safetensors"
    record = json.loads(invoke("export", "--model", run, "--format", fmt, "--out", out, "--json").stdout)
    assert record["files"] == [str(out)]
    weights = load_file(out)
    n_modules = len(load_file(run / "student.safetensors")) // 2
    if fmt == "kohya":
        assert all(
            k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
            for k in weights
        )
        alphas = [v for k, v in weights.items() if k.endswith(".alpha")]
        assert len(alphas) == n_modules and all(float(a) == ALPHA for a in alphas)
    else:
        assert all(k.startswith("unet.") for k in weights)
        with safe_open(str(out), framework="pt") as f:
            assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.lora_alpha"] == ALPHA != RANK

    x, t, kwargs = unet_inputs(layout)
    with torch.no_grad():
        student = load_student_network(find_model(str(run)))(x, t, **kwargs).sample
        pipe = load_pipeline(tiny_sd if layout == "sd" else tiny_sdxl)
        teacher = pipe.unet(x, t, **kwargs).sample
        pipe.load_lora_weights(str(out))
        loaded = pipe.unet(x, t, **kwargs).sample
    assert sum(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules()) == n_modules  # no key dropped
    assert (teacher - student).abs().max() > 0.1  # the LoRA matters...
    assert (loaded - student).abs().max() < 1e-4  # ...and comes back whole, alpha included (α = 2, r = 4)


def test_unet_export_in_fp16_is_the_fused_student(tmp_path, students, tiny_sdxl):
    from diffusers import UNet2DConditionModel

    run = students[("sdxl", "lora", 4)]
    out = tmp_path / "unet.safetensors"
    result = invoke("export", "--model", run, "--format", "unet", "--dtype", "fp16", "--out", out)
    assert result.stdout == ""
    weights = load_file(out)
    assert {v.dtype for v in weights.values()} == {torch.float16}
    assert not any("lora" in k for k in weights)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(tiny_sdxl, subfolder="unet"))
    unet.load_state_dict(weights)
    x, t, kwargs = unet_inputs("sdxl")
    with torch.no_grad():
        student = load_student_network(find_model(str(run)))(x, t, **kwargs).sample
        got = unet(x, t, **kwargs).sample
    assert (got - student).abs().max() < 2e-2  # fp16 weights
    namespace = {}
    exec(result.stderr[result.stderr.index("import torch") :].strip(), namespace)  # noqa: S102 - the printed snippet runs
    assert namespace["pipe"].unet.dtype == torch.float16 and namespace["image"].size[0] > 0
    # The file is also a (full) student that dmd sample takes.
    sample = invoke("sample", "--model", out, "--prompt", "a cat", "--out", tmp_path / "images", "--json")
    assert json.loads(sample.stdout)["steps"] == 4


def test_export_errors_are_one_line(tmp_path, students):
    full = students[("sd", "full", 4)]
    result = runner.invoke(
        app, ["export", "--model", str(full), "--format", "lora", "--out", str(tmp_path / "x.safetensors")]
    )
    assert result.exit_code == 2 and "full fine-tune" in result.stderr and "Traceback" not in result.stderr
    result = runner.invoke(app, ["export", "--model", str(full), "--format", "ckpt"])
    assert result.exit_code == 2 and "unknown export format 'ckpt'" in result.stderr
    empty = tmp_path / "run"
    empty.mkdir()
    (empty / "config.toml").write_text('teacher = "x"\n')
    result = runner.invoke(app, ["export", "--model", str(empty)])
    assert result.exit_code == 1 and "no student yet" in result.stderr
    result = runner.invoke(app, ["export", "--model", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "model not found" in result.stderr


def test_export_never_overwrites_unless_asked(tmp_path, students):
    run = students[("sd", "lora", 1)]
    out = tmp_path / "k.safetensors"
    invoke("export", "--model", run, "--format", "kohya", "--out", out)
    before = out.read_bytes()
    result = runner.invoke(
        app, ["export", "--model", str(run), "--format", "kohya", "--out", str(out), "--dtype", "fp16"]
    )
    assert result.exit_code == 2 and "already exists" in result.stderr and out.read_bytes() == before
    invoke("export", "--model", run, "--format", "kohya", "--out", out, "--dtype", "fp16", "--overwrite")
    assert out.read_bytes() != before
    # A folder that is not a pipeline is never replaced, even with --overwrite.
    result = runner.invoke(
        app, ["export", "--model", str(run), "--format", "diffusers", "--out", str(run), "--overwrite"]
    )
    assert (
        result.exit_code == 2 and "not a pipeline folder" in result.stderr and (run / "student.safetensors").is_file()
    )
    # Below a file: refused before anything loads, the file untouched.
    result = runner.invoke(
        app, ["export", "--model", str(run), "--format", "unet", "--out", str(out / "unet.safetensors")]
    )
    assert result.exit_code == 2 and "which is a file" in result.stderr and out.read_bytes() != before
    # The default place is inside the run folder.
    record = json.loads(invoke("export", "--model", run, "--format", "lora", "--json").stdout)
    assert record["path"] == str(run / "export" / "lora.safetensors")


def test_non_square_sdxl_images_match_the_pipeline(tmp_path, students):
    run = students[("sdxl", "full", 4)]
    out = tmp_path / "pipeline"
    invoke("export", "--model", run, "--format", "diffusers", "--out", out)
    record = json.loads(
        invoke(
            "sample",
            "--model",
            run,
            "--prompt",
            "a cat",
            "--height",
            "32",
            "--width",
            "48",
            "--seed",
            "3",
            "--out",
            tmp_path / "ours",
            "--json",
        ).stdout
    )
    assert (record["width"], record["height"]) == (48, 32)
    ours = np.asarray(Image.open(record["path"]).convert("RGB")).astype(int)
    pipe = load_pipeline(out)
    image = pipe(
        "a cat",
        height=32,
        width=48,
        num_inference_steps=4,
        guidance_scale=0,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    assert np.abs(np.asarray(image).astype(int) - ours).mean() <= 2.0


def test_help_names_the_default_files_and_shows_no_value_for_flags():
    wide = {"COLUMNS": "400"}  # one help line per option
    result = runner.invoke(app, ["export", "--help"], env=wide)
    assert result.exit_code == 0
    out_line = next(line for line in result.stdout.splitlines() if "Where to write" in line)
    assert "MODEL/export/<format>.safetensors for lora, kohya and unet" in out_line
    for command in ([], ["distill"], ["sample"], ["export"], ["eval"]):
        text = runner.invoke(app, [*command, "--help"], env=wide).stdout
        assert "--overwrite" in text or "--debug" in text
        assert "<bool>" not in text  # --overwrite, --json, -q, --debug, --version, --help take no value
