"""--ema-decay: an average of the generator's weights, updated after each generator update, in the
checkpoint (exact resume), and the student that sample, eval and export read."""

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from dmdcli.cli import app
from dmdcli.models.student import find_model
from dmdcli.runfiles import EMA_PREFIX, read_student_info
from dmdcli.train.checkpoint import complete_checkpoints
from dmdcli.train.ema import GeneratorEMA

runner = CliRunner()
QUICK = ["--recipe", "tiny", "--batch-size", "2", "--log-every", "1", "--sample-every", "0"]
QUICK += ["--teacher-grid-steps", "0", "--quiet"]


def test_the_average_moves_by_one_minus_decay_and_swaps_exactly():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    start = [p.detach().clone() for p in params]
    ema = GeneratorEMA(params, 0.9)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    ema.update()
    assert all(torch.allclose(a, s + 0.1) for a, s in zip(ema.average, start))
    raw = [p.detach().clone() for p in params]
    with ema.swapped():
        assert all(torch.allclose(p, s + 0.1) for p, s in zip(params, start))
    assert all(torch.equal(p, r) for p, r in zip(params, raw))  # back, bit for bit
    ema.reset()
    assert all(torch.equal(a, r) for a, r in zip(ema.average, raw))
    with pytest.raises(ValueError):
        GeneratorEMA(params, 1.0)


@pytest.mark.usefixtures("fresh_accelerator_state")
@pytest.mark.parametrize("lora", [False, True])
def test_the_student_is_the_average_and_a_resumed_run_is_exact(tmp_path, tiny_sd, prompts_file, lora):
    """TTUR 5 over 4 iterations: one generator update (iteration 1), so the average is exactly
    lerp(start, raw, 1 − decay); fake-score-only iterations leave it alone."""

    def run(out, *extra):
        args = ["distill", *QUICK, "--teacher", str(tiny_sd), "--prompts", str(prompts_file), "--out", str(out)]
        args += ["--steps", "1", "--fake-updates-per-gen", "5", "--ema-decay", "0.75", *extra]
        args += ["--lora-rank", "4"] if lora else []
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.stderr + repr(result.exception)

    whole = tmp_path / "whole"
    run(whole, "--iterations", "4", "--checkpoint-every", "2")
    student, raw = load_file(whole / "student.safetensors"), load_file(whole / "student-raw.safetensors")
    assert student.keys() == raw.keys() and any(not torch.equal(student[k], raw[k]) for k in student)
    tensors = load_file(complete_checkpoints(whole)[-1] / "tensors.safetensors")
    assert all(
        torch.equal(tensors[EMA_PREFIX + k], student[k]) and torch.equal(tensors["generator." + k], raw[k])
        for k in student
    )
    assert read_student_info(whole / "student.safetensors")["ema_decay"] == 0.75
    assert "ema_decay" not in read_student_info(whole / "student-raw.safetensors")
    checkpoint = find_model(str(complete_checkpoints(whole)[-1])).weights()  # --model RUN/checkpoints/iter-N
    assert checkpoint.keys() == student.keys() and all(torch.equal(checkpoint[k], student[k]) for k in student)

    if not lora:  # the start: the teacher's weights
        teacher = load_file(f"{tiny_sd}/unet/diffusion_pytorch_model.safetensors")
        for k in student:
            assert torch.equal(student[k], torch.lerp(teacher[k].float(), raw[k], 0.25)), k

    cut = tmp_path / "cut"
    run(cut, "--iterations", "2", "--checkpoint-every", "2")
    resumed = runner.invoke(app, ["distill", "--out", str(cut), "--resume", "--iterations", "4", "--quiet"])
    assert resumed.exit_code == 0, resumed.stderr
    for name in ("student.safetensors", "student-raw.safetensors"):
        a, b = load_file(whole / name), load_file(cut / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    changed = runner.invoke(app, ["distill", "--out", str(cut), "--resume", "--iterations", "6", "--ema-decay", "0.5"])
    assert changed.exit_code == 2 and "ema_decay 0.75 → 0.5" in changed.stderr


def test_the_estimate_holds_the_average(tiny_sd, prompts_file):
    from dmdcli.models.teacher import inspect_teacher
    from dmdcli.train.memory import estimate_memory
    from dmdcli.train.recipes import resolve_config

    spec, base = inspect_teacher(str(tiny_sd)), {"teacher": str(tiny_sd), "prompts": str(prompts_file)}
    plain = estimate_memory(spec, resolve_config("tiny", base), 32, False, device_type="cpu")
    ema = estimate_memory(spec, resolve_config("tiny", {**base, "ema_decay": 0.9}), 32, False, device_type="cpu")
    assert ema.parameters["generator EMA (fp32)"] == pytest.approx(plain.parameters["generator"])
    assert ema.peak == pytest.approx(plain.peak + plain.parameters["generator"])
