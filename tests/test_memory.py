"""`dmd distill --dry-run`: the memory estimate from config files alone, on full-size architectures."""

import json

import pytest
import torch
from typer.testing import CliRunner

from dmdcli.cli import app
from dmdcli.models.config_only import write_config_only_pipeline
from dmdcli.models.sd import UNET_LORA_TARGETS
from dmdcli.models.teacher import inspect_teacher
from dmdcli.train.activations import meta_network, saved_activations, training_network
from dmdcli.train.config import DistillConfig
from dmdcli.train.memory import estimate_memory

runner = CliRunner()


@pytest.fixture(scope="module")
def sdxl_configs(tmp_path_factory):
    """The SDXL architecture as config files only: no weights exist, so nothing heavy can load."""
    return write_config_only_pipeline(tmp_path_factory.mktemp("sdxl"), "sdxl")


def dry_run(teacher, *args):
    result = runner.invoke(
        app,
        [
            "distill",
            "--teacher",
            str(teacher),
            "--prompts",
            "p.txt",
            "--data",
            "images/",
            "--mixed-precision",
            "bf16",
            "--batch-size",
            "1",
            "--dry-run",
            "--json",
            *args,
        ],
    )
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["memory_gib"]


def test_dry_run_sdxl_layouts(sdxl_configs, tmp_path):
    shared = dry_run(
        sdxl_configs,
        "--steps",
        "4",
        "--lora-rank",
        "64",
        "--lora-alpha",
        "8",
        "--gradient-checkpointing",
        "--out",
        str(tmp_path / "run"),
    )
    reference = dry_run(
        sdxl_configs,
        "--steps",
        "4",
        "--lora-rank",
        "64",
        "--lora-alpha",
        "8",
        "--no-shared-base",
        "--gradient-checkpointing",
    )
    full = dry_run(sdxl_configs, "--steps", "4", "--no-gradient-checkpointing")  # (its recipe, sdxl-4step, checkpoints)
    # Shared-base LoRA holds one copy of the UNet (2.57B parameters, bf16 ≈ 4.8 GiB).
    assert shared["parameters"]["teacher network (frozen)"] == pytest.approx(2.567e9 * 2 / 2**30, rel=0.01)
    assert shared["peak"] < 24, "the issue's goal: SDXL 1024², 4-step, LoRA, batch 1 in 24 GB"
    assert reference["peak"] > 2.5 * shared["peak"]  # the reference's LoRA keeps a full fp32 fake score
    assert full["peak"] > 80  # the reference could not fit full SDXL on one 80 GB GPU either
    assert (
        full["activations_per_sample"] > 5 * shared["activations_per_sample"]
    )  # gradient checkpointing (9.5x on an H200)
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_dry_run_prints_the_resolved_configuration(sdxl_configs):
    result = runner.invoke(
        app,
        ["distill", "--recipe", "sdxl-4step-lora", "--teacher", str(sdxl_configs), "--prompts", "p.txt", "--dry-run"],
    )
    assert result.exit_code == 0, result.stderr
    assert "lora_rank = 64" in result.stderr and "estimated peak" in result.stderr
    assert result.stdout == ""


def test_without_cuda_the_dry_run_says_how_to_estimate_a_gpu_run(sdxl_configs, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["distill", "--teacher", str(sdxl_configs), "--prompts", "p.txt", "--lora-rank", "64", "--dry-run"]
    here = runner.invoke(app, args)
    assert here.exit_code == 0 and "fp32" in here.stderr and "--mixed-precision bf16 estimates a GPU run" in here.stderr
    gpu = runner.invoke(app, [*args, "--mixed-precision", "bf16"])
    assert gpu.exit_code == 0 and "--mixed-precision bf16 estimates" not in gpu.stderr


def test_cached_prompts_take_the_text_encoders_out_of_the_peak(sdxl_configs):
    cached = dry_run(sdxl_configs, "--steps", "4", "--lora-rank", "64")
    resident = dry_run(sdxl_configs, "--steps", "4", "--lora-rank", "64", "--no-cache-prompts")
    text = resident["parameters"]["text encoders (fp32)"]
    assert text == pytest.approx(0.817e9 * 4 / 2**30, rel=0.02)  # CLIP ViT-L + OpenCLIP bigG in fp32, as the reference
    assert not any(k.startswith("text encoders") for k in cached["parameters"])
    assert cached["startup_only"] == {"text encoders (fp32, dropped once prompts are cached)": text}
    assert cached["peak"] == pytest.approx(resident["peak"] - text)
    # while they encode, the VAE is there too, not the teacher's network (read after the prompts)
    vae = cached["parameters"]["VAE (fp32)"]
    assert cached["startup_peak"] == pytest.approx(text + vae) and resident["startup_peak"] == 0


def test_a_run_whose_prompt_encoding_needs_more_than_the_gpu_has_says_so(monkeypatch):
    """The GPU check compares the start-up peak too, when it is the larger one (text encoders in
    fp32 beside the VAE, while the prompts are encoded): said as such, without training levers."""
    import dmdcli.train.memory as memory
    from dmdcli.train.recipes import resolve_config

    monkeypatch.setattr(memory, "device_memory", lambda device: (int(20 * 2**30), int(24 * 2**30)))
    monkeypatch.setattr(
        memory,
        "estimate_memory",
        lambda *a: memory.MemoryEstimate({}, 0, 0, 0, 0, 18.0, "fake score", {"x": 21.0}, 21.5),
    )
    config = resolve_config(None, {"teacher": "sd15", "lora_rank": 64, "prompts": "prompts.txt"})
    note = memory.over_memory_note(None, config, 512, torch.device("cuda"), 1)
    assert note.startswith("note: while the prompts are encoded") and "21.5 GiB, more than the 20.0 GiB free" in note
    monkeypatch.setattr(memory, "device_memory", lambda device: (int(30 * 2**30), int(40 * 2**30)))
    assert memory.over_memory_note(None, config, 512, torch.device("cuda"), 1) is None


def test_dry_run_fsdp_divides_the_sharded_state_by_the_process_count(sdxl_configs):
    full = dry_run(sdxl_configs, "--steps", "4", "--gradient-checkpointing")
    result = runner.invoke(
        app,
        [
            "distill",
            "--recipe",
            "sdxl-4step-fsdp",
            "--teacher",
            str(sdxl_configs),
            "--prompts",
            "p.txt",
            "--data",
            "images/",
            "--mixed-precision",
            "bf16",
            "--batch-size",
            "1",
            "--dry-run",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert "GiB, 8 processes" in result.stderr
    by = json.loads(result.stdout)["memory_gib_by_processes"]
    for n, estimate in by.items():
        assert estimate["processes"] == int(n)
        assert estimate["parameters"]["generator"] == pytest.approx(full["parameters"]["generator"] / int(n))
        assert estimate["optimizer_states"] == pytest.approx(full["optimizer_states"] / int(n))
        assert estimate["parameters"]["VAE (fp32)"] == full["parameters"]["VAE (fp32)"]  # not sharded
        assert estimate["gathered"] < full["parameters"]["teacher network (frozen)"] / 2  # a few units, not a UNet
        # Gradients and AdamW's step temporaries (foreach, on CUDA) are of the shards too.
        assert estimate["optimizer_step"] in (0, pytest.approx(estimate["gradients"]))
    # With 2 and 4 processes the fake score's AdamW step sets the peak; with 8 its forward and
    # backward do, with whole units gathered.
    assert (
        by["2"]["phase"] == "fake score's AdamW step" and by["8"]["phase"] == "fake score" and by["8"]["gathered"] > 0
    )
    assert full["peak"] > by["2"]["peak"] > by["4"]["peak"] > by["8"]["peak"]
    assert by["8"]["peak"] < 24  # full-weight SDXL, batch 1: eight 24 GB GPUs


def test_an_alias_out_of_reach_is_estimated_from_its_bundled_configs(sdxl_configs, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub cannot be reached, as on a machine without network
    args = ["--steps", "4", "--lora-rank", "64", "--lora-alpha", "8", "--gradient-checkpointing"]
    result = runner.invoke(
        app,
        [
            "distill",
            "--teacher",
            "sdxl",
            "--prompts",
            "p.txt",
            "--data",
            "images/",
            "--mixed-precision",
            "bf16",
            "--batch-size",
            "1",
            "--dry-run",
            "--json",
            *args,
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert "estimating with the public sdxl architecture" in result.stderr
    assert json.loads(result.stdout)["memory_gib"] == dry_run(sdxl_configs, *args)
    other = runner.invoke(app, ["distill", "--teacher", "org/unknown-model", "--prompts", "p.txt", "--dry-run"])
    assert (
        other.exit_code == 1 and "could not read model_index.json" in other.stderr
    )  # no bundled configs: the error stands


# Peaks (torch.cuda.max_memory_allocated, GiB) of benchmarks/memory_speed.py on an H200, bf16, 4 steps,
# batch 1, GAN on, without the VAE: benchmarks/results/gpu-h200/.
H200_PEAKS = [
    ("sdxl", 1024, dict(lora_rank=64, lora_alpha=8, shared_base=True), True, 12.82),
    ("sdxl", 1024, dict(lora_rank=64, lora_alpha=8, shared_base=False), True, 67.00),
    ("sdxl", 1024, dict(lora_rank=0), True, 84.12),
    ("sdxl", 1024, dict(lora_rank=64, lora_alpha=8, shared_base=True), False, 28.10),
    ("sd15", 512, dict(lora_rank=64, lora_alpha=8, shared_base=True), False, 6.52),
]


@pytest.mark.parametrize("arch, resolution, layout, checkpointing, measured", H200_PEAKS)
def test_the_estimate_is_within_ten_percent_of_the_peak_measured_on_a_gpu(
    tmp_path, arch, resolution, layout, checkpointing, measured
):
    spec = inspect_teacher(str(write_config_only_pipeline(tmp_path, arch)))
    config = DistillConfig(
        teacher=arch,
        steps=4,
        batch_size=1,
        gradient_checkpointing=checkpointing,
        fake_updates_per_gen=1,
        data="random",
        gan_generator_weight=1e-3,  # what those runs had (the code defaults then)
        gan_discriminator_weight=1e-2,
        guidance_scale=8.0,
        mixed_precision="bf16",
        **layout,
    )
    estimate = estimate_memory(spec, config, resolution, bf16=True, device_type="cuda")
    assert estimate.peak - estimate.parameters["VAE (fp32)"] == pytest.approx(measured, rel=0.10)


def _saved_by_a_real_forward(spec, adapter, resolution: int) -> int:
    """Bytes autograd keeps for a real CPU forward under bf16 autocast, per storage, without the
    weights and without autocast's casts of the trained fp32 weights (the estimate lists those apart)."""
    from diffusers import UNet2DConditionModel

    from dmdcli.models.lora import add_generator_lora

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(meta_network(spec).config)
    if adapter:
        add_generator_lora(unet.to(torch.bfloat16), adapter[0], adapter[1], UNET_LORA_TARGETS, adapter_name=adapter[2])
    else:
        unet.requires_grad_(True)
    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    side = resolution // spec.vae_scale_factor
    added = None
    if spec.layout == "sdxl":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, pooled), "time_ids": torch.randn(1, 6)}
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = unet(
            torch.randn(1, spec.latent_channels, side, side),
            torch.tensor([500]),
            torch.randn(1, 77, unet.config.cross_attention_dim),
            added_cond_kwargs=added,
        ).sample
    assert out.requires_grad
    casts = sum(2 * p.numel() for p in unet.parameters() if p.requires_grad)
    return sum(saved.values()) - casts


@pytest.mark.parametrize("layout", ["sd", "sdxl"])
@pytest.mark.parametrize("adapter", [None, (4, 4, "fake_score")], ids=["full", "lora"])
def test_meta_activations_match_a_real_forward(layout, adapter):
    """The estimate's meta forward (autocast's dtypes by hand, attention as a fused kernel keeps it)
    against real tensors: what the CPU's autocast and flash attention keep."""
    from dmdcli.models.tiny import tiny_pipeline_cached

    spec = inspect_teacher(str(tiny_pipeline_cached(layout)))
    meta, _ = saved_activations(
        training_network(spec, torch.bfloat16, adapter, UNET_LORA_TARGETS),
        spec,
        256,
        torch.bfloat16,
        "cpu",
        checkpointing=False,
    )
    real = _saved_by_a_real_forward(spec, adapter, 256)
    # The full layout's real count subtracts casts of norm weights that CPU autocast does not make: up to 5% over.
    assert real <= meta <= real * 1.06


def test_checkpointing_keeps_block_inputs_and_one_recomputed_block():
    from dmdcli.models.tiny import tiny_pipeline_cached

    spec = inspect_teacher(str(tiny_pipeline_cached("sd")))
    unet = lambda: training_network(spec, torch.bfloat16, (4, 4, "fake_score"), UNET_LORA_TARGETS)  # noqa: E731
    whole, down = saved_activations(unet(), spec, 256, torch.bfloat16, "cuda", checkpointing=False)
    kept, kept_down = saved_activations(unet(), spec, 256, torch.bfloat16, "cuda", checkpointing=True)
    assert 0 < kept < whole / 2 and 0 < kept_down < down < whole
    cpu_rules, _ = saved_activations(unet(), spec, 256, torch.bfloat16, "cpu", checkpointing=False)
    assert whole > 1.2 * cpu_rules  # CUDA's autocast runs the norms in fp32, and keeps fp32 copies


@pytest.mark.parametrize("free_gib", [0.001, 1000.0])
def test_a_run_says_at_once_when_its_estimate_is_more_than_the_gpu_has_free(
    tmp_path, tiny_sd, prompts_file, monkeypatch, free_gib
):
    """Before the teacher loads, the run compares the --dry-run estimate with the GPU's free memory
    (stood in for here: the CPU has none to query) and names what would lower it; it still runs."""
    import dmdcli.train.memory as memory

    monkeypatch.setattr(memory, "device_memory", lambda device: (int(free_gib * 2**30), int(80 * 2**30)))
    args = ["distill", "--recipe", "tiny", "--teacher", str(tiny_sd), "--prompts", str(prompts_file)]
    result = runner.invoke(app, [*args, "--iterations", "1", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.stderr
    said = " ".join(result.stderr.split())
    if free_gib > 1:
        assert "estimated peak" not in said
    else:
        assert "is more than the 0.0 GiB free on this GPU (of 80.0): --gradient-checkpointing, --lora-rank 64" in said
        assert "--batch-size 1 --gradient-accumulation-steps 4 (the same batch an update) would lower it" in said
        assert said.index("estimated peak") < said.index("teacher:")  # before the teacher loads
    assert (tmp_path / "run" / "student.safetensors").is_file()


def test_the_memory_note_of_a_lora_run_names_a_lower_rank(tmp_path, tiny_sd, prompts_file, monkeypatch):
    """A shared-base LoRA run with checkpointing at batch 1 (FLUX.2 [dev]'s recipe on an 80 GB GPU)
    has one lever left: the rank."""
    import dmdcli.train.memory as memory

    monkeypatch.setattr(memory, "device_memory", lambda device: (2**20, 80 * 2**30))
    args = ["distill", "--recipe", "tiny", "--teacher", str(tiny_sd), "--prompts", str(prompts_file), "--iterations", 1]
    options = ["--lora-rank", 64, "--gradient-checkpointing", "--batch-size", 1]
    result = runner.invoke(app, [*map(str, args + options), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.stderr
    assert "(of 80.0): a lower --lora-rank would lower it" in " ".join(result.stderr.split())
