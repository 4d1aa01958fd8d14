"""Data-parallel `dmd distill` with two CPU processes (torchrun, gloo), as users launch it on GPUs."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from dmdcli.cli import app
from dmdcli.train.checkpoint import complete_checkpoints

# Runs under torchrun: distill, then every process writes a digest of its trainable weights.
DRIVER = textwrap.dedent("""
    import hashlib, json, sys
    import torch
    from dmdcli.train.config import resolve_config
    from dmdcli.train.distill import Distillation, SilentUI
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


def test_two_processes_keep_identical_weights_and_shard_data(tmp_path, tiny_sdxl, prompts_file, image_folder):
    out, digests = tmp_path / "run", tmp_path / "digests"
    digests.mkdir()
    overrides = {"teacher": str(tiny_sdxl), "prompts": str(prompts_file), "data": str(image_folder), "steps": 2,
                 "iterations": 4, "fake_updates_per_gen": 2, "batch_size": 2, "lora_rank": 4,
                 "teacher_grid_steps": 2, "checkpoint_every": 2, "sample_every": 0, "log_every": 1}
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    result = subprocess.run([*launcher, "--no-python", sys.executable, "-c", DRIVER,
                             str(out), str(digests), json.dumps(overrides)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((digests / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"], "the processes' weights diverged"
    assert ranks[0]["first_batch"] != ranks[1]["first_batch"], "both processes drew the same prompts"
    # Only the main process writes the run folder; every process's RNG state is in the checkpoint.
    checkpoint = complete_checkpoints(out)[-1]
    assert sorted(p.name for p in checkpoint.glob("rng-rank*.safetensors")) == ["rng-rank0.safetensors", "rng-rank1.safetensors"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len([line for line in lines if "loss_denoise" in line]) == 4  # one writer, not two
    assert all(torch.isfinite(v).all() for v in load_file(out / "student.safetensors").values())
    # A checkpoint of two processes resumes only with two.
    resumed = CliRunner().invoke(app, ["distill", "--out", str(out), "--resume", "--iterations", "6"])
    assert resumed.exit_code == 2 and "same number of processes" in resumed.stderr
