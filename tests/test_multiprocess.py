"""`dmd distill` with two CPU processes (torchrun, gloo), as users launch it on GPUs: data-parallel (DDP) and sharded
(FSDP)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from dmdcli.cli import app
from dmdcli.train.checkpoint import complete_checkpoints

# Runs under torchrun: distill, then every process writes a digest of its trainable weights.
DRIVER = textwrap.dedent("""
    import hashlib, json, sys
    import torch
    from dmdcli.train.recipes import resolve_config
    from dmdcli.train.distill import Distillation
    from dmdcli.train.ui import SilentUI
    out, digests, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    run = Distillation(resolve_config("tiny", {**overrides, "out": out}), SilentUI())
    picks = run.data.batch(run.teacher, run.config.seed, 0, 2, None, run.accelerator.process_index).cond
    run.run()
    h = hashlib.sha256()
    for p in run.nets.generator_params + run.nets.fake_params:
        h.update(p.detach().cpu().numpy().tobytes())
    rank = run.accelerator.process_index
    with open(f"{digests}/rank{rank}.json", "w") as f:
        json.dump({"weights": h.hexdigest(), "first_batch": picks["encoder_hidden_states"].sum().item()}, f)
""")


def _launch(command: list[str], port: int, **env: str) -> None:
    """torchrun of `command` (what follows torchrun's own options) with 2 CPU processes (gloo)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **env}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    result = subprocess.run([*launcher, *command], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_processes_keep_identical_weights_and_shard_data(tmp_path, tiny_sdxl, prompts_file, image_folder):
    out, digests = tmp_path / "run", tmp_path / "digests"
    digests.mkdir()
    overrides = {
        "teacher": str(tiny_sdxl),
        "prompts": str(prompts_file),
        "data": str(image_folder),
        "steps": 2,
        "iterations": 4,
        "fake_updates_per_gen": 2,
        "batch_size": 2,
        "gradient_accumulation_steps": 2,  # DDP averages over processes once, in the last micro-batch's backward
        "lora_rank": 4,
        "teacher_grid_steps": 2,
        "checkpoint_every": 2,
        "sample_every": 0,
        "log_every": 1,
    }
    _launch(["--no-python", sys.executable, "-c", DRIVER, str(out), str(digests), json.dumps(overrides)], 29517)
    ranks = [json.loads((digests / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"], "the processes' weights diverged"
    assert ranks[0]["first_batch"] != ranks[1]["first_batch"], "both processes drew the same prompts"
    # Only the main process writes the run folder; every process's RNG state is in the checkpoint.
    checkpoint = complete_checkpoints(out)[-1]
    assert sorted(p.name for p in checkpoint.glob("rng-rank*.safetensors")) == [
        "rng-rank0.safetensors",
        "rng-rank1.safetensors",
    ]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len([line for line in lines if "loss_denoise" in line]) == 4  # one writer, not two
    assert all(torch.isfinite(v).all() for v in load_file(out / "student.safetensors").values())
    # A checkpoint of two processes resumes only with two.
    resumed = CliRunner().invoke(app, ["distill", "--out", str(out), "--resume", "--iterations", "6"])
    assert resumed.exit_code == 2 and "same number of processes" in resumed.stderr


def _torchrun(args: list[str], port: int) -> None:
    """`torchrun --nproc_per_node 2 -m dmdcli ARGS` on CPU (gloo), as a user launches it."""
    _launch(["-m", "dmdcli", *args, "--quiet"], port)


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_fsdp_trains_what_data_parallel_trains_and_resumes_exactly(tmp_path, tiny_sdxl, prompts_file, image_folder):
    common = [
        "distill",
        "--recipe",
        "tiny",
        "--teacher",
        str(tiny_sdxl),
        "--prompts",
        str(prompts_file),
        "--data",
        str(image_folder),
        "--steps",
        "2",
        "--iterations",
        "4",
        "--fake-updates-per-gen",
        "2",
        "--batch-size",  # the update of 2 as two accumulated micro-batches (FSDP reduces each backward's gradients)
        "1",
        "--gradient-accumulation-steps",
        "2",
        "--lr",
        "1e-4",
        "--warmup-steps",
        "1",
        "--teacher-grid-steps",
        "2",
        "--checkpoint-every",
        "2",
        "--sample-every",
        "2",
    ]
    _torchrun([*common, "--out", str(tmp_path / "ddp")], 29521)
    _torchrun([*common, "--fsdp", "--out", str(tmp_path / "fsdp")], 29522)
    student = lambda run: load_file(tmp_path / run / "student.safetensors")  # noqa: E731
    tensors = lambda run, it: load_file(tmp_path / run / "checkpoints" / f"iter-{it:06d}" / "tensors.safetensors")  # noqa: E731

    # The same updates: FSDP's sharded gradients and optimizer give DDP's student up to float
    # rounding (Adam magnifies it where gradients are near zero), far below what training moved.
    teacher = load_file(tiny_sdxl / "unet" / "diffusion_pytorch_model.safetensors")
    moved = _max_difference(student("ddp"), {k: teacher[k] for k in student("ddp")})
    assert moved > 1e-5
    assert _max_difference(student("fsdp"), student("ddp")) < 0.1 * moved
    # One checkpoint layout: whole tensors under the same names (the classifier head included).
    assert tensors("fsdp", 4).keys() == tensors("ddp", 4).keys()
    assert (tmp_path / "fsdp" / "samples" / "iter-000002.png").is_file()

    # Resumed from iteration 2 under FSDP: bit for bit the uninterrupted run. A checkpoint moves
    # between the layouts both ways: its weights and optimizer states are loaded, so the run
    # continues as the uninterrupted one up to rounding.
    for run, flag in (("fsdp", []), ("ddp", ["--fsdp"]), ("fsdp", ["--no-fsdp"])):
        resumed = tmp_path / f"{run}-resumed{''.join(flag)}"
        shutil.copytree(tmp_path / run, resumed)
        shutil.rmtree(resumed / "checkpoints" / "iter-000004")
        _torchrun(["distill", "--out", str(resumed), "--resume", *flag], 29523)
        if not flag:
            assert _max_difference(tensors(resumed.name, 4), tensors("fsdp", 4)) == 0
        else:
            assert _max_difference(student(resumed.name), student(run)) < 0.1 * moved


def test_fsdp_in_bf16_gathers_bf16_and_saves_fp32(tmp_path, tiny_sd, prompts_file, image_folder):
    """The GPU's precision layout sharded: bf16 gathering under autocast (over gloo here, NCCL on
    GPUs), fp32 shards, gradients reduced in fp32, a whole fp32 student saved."""
    out = tmp_path / "run"
    _torchrun(
        [
            "distill",
            "--recipe",
            "tiny",
            "--teacher",
            str(tiny_sd),
            "--prompts",
            str(prompts_file),
            "--data",
            str(image_folder),
            "--iterations",
            "2",
            "--fake-updates-per-gen",
            "1",
            "--teacher-grid-steps",
            "0",
            "--sample-every",
            "0",
            "--log-every",
            "1",
            "--fsdp",
            "--mixed-precision",
            "bf16",
            "--out",
            str(out),
        ],
        29524,
    )
    student = load_file(out / "student.safetensors")
    teacher = load_file(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in student.values()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in student.values())
    assert _max_difference(student, {k: teacher[k] for k in student}) > 0  # trained
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in losses if "loss_gan_d" in r] == [1, 2]


def test_fsdp_starts_from_another_runs_networks(tmp_path, tiny_sd, prompts_file, image_folder):
    """--init-from under FSDP: process 0 reads the first stage's checkpoint, every process gets its
    shards; the first stage had no GAN head, so this run's starts fresh."""
    base = [
        "distill",
        "--recipe",
        "tiny",
        "--teacher",
        str(tiny_sd),
        "--prompts",
        str(prompts_file),
        "--teacher-grid-steps",
        "0",
        "--sample-every",
        "0",
        "--quiet",
    ]
    assert CliRunner().invoke(app, [*base, "--iterations", "2", "--out", str(tmp_path / "stage1")]).exit_code == 0
    _torchrun(
        [
            *base,
            "--data",
            str(image_folder),
            "--iterations",
            "1",
            "--lr",
            "1e-12",
            "--fsdp",
            "--init-from",
            str(tmp_path / "stage1"),
            "--out",
            str(tmp_path / "stage2"),
        ],
        29525,
    )
    first, second = (
        load_file(complete_checkpoints(tmp_path / run)[-1] / "tensors.safetensors") for run in ("stage1", "stage2")
    )
    names = [k for k in first if k.startswith(("generator.", "fake_score."))]
    assert names and _max_difference({k: second[k] for k in names}, {k: first[k] for k in names}) < 1e-8
    assert any(k.startswith("discriminator.") for k in second)


def test_fsdp_usage_errors(tmp_path, tiny_sd, prompts_file):
    runner = CliRunner()
    base = [
        "distill",
        "--teacher",
        str(tiny_sd),
        "--prompts",
        str(prompts_file),
        "--out",
        str(tmp_path / "run"),
        "--fsdp",
    ]
    lora = runner.invoke(app, [*base, "--lora-rank", "4"])
    assert lora.exit_code == 2 and "--fsdp shards full-weight runs" in lora.stderr
    alone = runner.invoke(app, base)
    assert alone.exit_code == 2 and "torchrun" in alone.stderr
    assert not (tmp_path / "run").exists()


def test_sharding_options_follow_accelerates_fsdp_plugin():
    from types import SimpleNamespace

    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    from dmdcli.errors import UsageError
    from dmdcli.train.sharding import sharding_options

    accelerator = lambda plugin: SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))  # noqa: E731
    assert sharding_options(accelerator(None), "bf16").param_dtype == torch.bfloat16
    plugin = SimpleNamespace(fsdp_version=2, reshard_after_forward=False, cpu_offload=CPUOffloadPolicy())
    options = sharding_options(accelerator(plugin), "no")
    assert (options.param_dtype, options.reshard_after_forward, options.cpu_offload) == (None, False, True)
    plugin = SimpleNamespace(fsdp_version=2, reshard_after_forward=True, cpu_offload=OffloadPolicy())
    assert not sharding_options(accelerator(plugin), "no").cpu_offload
    with pytest.raises(UsageError, match="fsdp_version: 2"):
        sharding_options(accelerator(SimpleNamespace(fsdp_version=1)), "bf16")


def test_shipped_accelerate_config_launches_fsdp2(monkeypatch):
    """recipes/accelerate/fsdp.yaml as `accelerate launch` reads it (its own parser and environment)."""
    from types import SimpleNamespace

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    from dmdcli.train.recipes import RECIPES_DIR
    from dmdcli.train.sharding import sharding_options

    args = launch_command_parser().parse_args(
        ["--config_file", str(RECIPES_DIR / "accelerate" / "fsdp.yaml"), "-m", "dmdcli", "distill"]
    )
    args = _validate_launch_command(args)[0]
    assert args.use_fsdp and args.num_processes == 8
    for key, value in prepare_multi_gpu_env(args).items():
        if key.startswith("FSDP_") or key == "ACCELERATE_USE_FSDP":
            monkeypatch.setenv(key, value)
    options = sharding_options(
        SimpleNamespace(state=SimpleNamespace(fsdp_plugin=FullyShardedDataParallelPlugin())), "bf16"
    )
    assert (options.param_dtype, options.reshard_after_forward, options.cpu_offload) == (torch.bfloat16, True, False)


def test_ctrl_c_under_torchrun_checkpoints_once_and_resumes(tmp_path, tiny_sd, prompts_file):
    """A terminal's Ctrl-C reaches torchrun and its workers, and torchrun forwards it again: each
    process gets it twice. The run still checkpoints, one process says so, and it resumes."""
    import signal
    import time

    out = tmp_path / "run"
    args = [
        "distill",
        "--recipe",
        "tiny",
        "--teacher",
        str(tiny_sd),
        "--prompts",
        str(prompts_file),
        "--iterations",
        "400",
        "--log-every",
        "1",
        "--sample-every",
        "0",
        "--teacher-grid-steps",
        "0",
        "--checkpoint-every",
        "0",
        "--batch-size",
        "2",
        "--out",
        str(out),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29523",
        "-m",
        "dmdcli",
    ]
    child = subprocess.Popen(
        [*launcher, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    metrics, deadline = out / "metrics.jsonl", time.time() + 300
    while not metrics.is_file() or len(metrics.read_text().splitlines()) < 3:
        assert child.poll() is None and time.time() < deadline, child.stderr.read()[-3000:]
        time.sleep(0.2)
    os.killpg(child.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole process group
    _, stderr = child.communicate(timeout=300)
    (checkpoint,) = complete_checkpoints(out)
    assert stderr.count("stopped: interrupted at iteration") == 1, stderr[-3000:]
    assert f"checkpoint saved to {checkpoint}" in stderr
    _torchrun(["distill", "--out", str(out), "--resume", "--iterations", str(int(checkpoint.name[5:]) + 2)], port=29524)
    assert complete_checkpoints(out)[-1].name == f"iter-{int(checkpoint.name[5:]) + 2:06d}"


HEAD_DTYPE = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist
    from dmdcli.core.gan_head import ClassifierHead
    from dmdcli.train.sharding import ShardingOptions, shard_head
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    dist.init_process_group("gloo", rank=0, world_size=1)
    head = ClassifierHead.for_features(torch.zeros(1, 32, 8, 8))
    seen = []
    for conv in (m for m in head.modules() if isinstance(m, torch.nn.Conv2d)):
        conv.register_forward_pre_hook(lambda m, args: seen.append((m.weight.dtype, args[0].dtype)))
    shard_head(head.net, ShardingOptions(param_dtype=torch.bfloat16))  # the networks' bf16 policy
    logits = head(torch.randn(2, 32, 8, 8, dtype=torch.bfloat16))
    print(logits.dtype, sorted(set(seen), key=str))
""")


def test_the_sharded_classifier_head_runs_in_fp32_under_a_bf16_policy():
    """FSDP2 casts a module's gathered weights and inputs to its policy's param_dtype: the head keeps
    fp32, as unsharded and as the reference's."""
    result = subprocess.run(
        [sys.executable, "-c", HEAD_DTYPE, "29531"], capture_output=True, text=True, timeout=120, env={**os.environ}
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["torch.float32", "[(torch.float32,", "torch.float32)]"], result.stdout


# Runs under torchrun with a host limit below one prompt: the prompt cache goes to disk.
DISK_DRIVER = textwrap.dedent("""
    import json, sys
    import dmdcli.data.prompt_cache as prompt_cache
    from dmdcli.train.recipes import resolve_config
    from dmdcli.train.distill import Distillation
    from dmdcli.train.ui import SilentUI
    prompt_cache.HOST_LIMIT = 1000
    out, report, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    run = Distillation(resolve_config("tiny", {**overrides, "out": out}), SilentUI())
    run.run()
    weights = [p.detach().sum().item() for p in run.nets.generator_params]
    cache = run.data.cache
    with open(f"{report}/rank{run.accelerator.process_index}.json", "w") as f:
        json.dump({"cache": type(cache).__name__, "folder": str(cache.folder), "weights": weights}, f)
""")


def test_two_processes_share_one_disk_prompt_cache(tmp_path, tiny_sd, prompts_file):
    """Over the host limit both processes read one disk prompt cache, and train the same weights."""
    report = tmp_path / "report"
    report.mkdir()
    overrides = {"teacher": str(tiny_sd), "prompts": str(prompts_file), "iterations": 2, "sample_every": 0}
    driver = ["--no-python", sys.executable, "-c", DISK_DRIVER, str(tmp_path / "run"), str(report)]
    _launch([*driver, json.dumps(overrides)], 29519, DMD_CACHE=str(tmp_path / "cache"))
    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert {r["cache"] for r in ranks} == {"DiskPromptCache"} and ranks[0]["folder"] == ranks[1]["folder"]
    assert [p.name for p in (tmp_path / "cache" / "prompts").iterdir()] == [os.path.basename(ranks[0]["folder"])]
    assert ranks[0]["weights"] == ranks[1]["weights"]
