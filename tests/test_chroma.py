"""A Chroma teacher (ChromaPipeline: FLUX's blocks without guidance or CLIP, read by T5 with its
padding masked; CFG against the model card's negative prompt) on the same engine, with the tiny
pipeline of dmdcli.models.tiny."""

import numpy as np
import pytest
import torch
from family_checks import (
    distill_then_sample,
    dry_run,
    export_matches_sample,
    exported_lora_outputs,
    sampled_image,
    teacher_and_pipeline,
    teacher_sample_differences,
)
from students import make_student
from typer.testing import CliRunner

from dmdcli.cli import app
from dmdcli.core.denoiser import cat_cond
from dmdcli.core.schedule import flow_sigmas, time_shift_sigmas
from dmdcli.models.chroma import NEGATIVE_PROMPT
from dmdcli.models.families import get_family
from dmdcli.train.sharding import shard_units

runner = CliRunner()
PROMPTS = ["a red circle", "a large blue square at the top left of a white background"]

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers' own FluxPosEmbed import in Chroma


@pytest.fixture(scope="module")
def teacher_and_pipe(tiny_chroma):
    return teacher_and_pipeline(tiny_chroma, "ChromaPipeline")


def test_the_teacher_conditions_as_chroma_pipeline_does(teacher_and_pipe):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    spec, teacher, pipe = teacher_and_pipe
    assert (spec.family, spec.latent_channels, spec.network_downsample) == ("chroma", 16, 2)
    # FLUX's shift by the image's token count, as the pipeline computes it: 8×8 tokens at 32 px
    assert torch.equal(spec.schedule(32).sigmas, time_shift_sigmas(flow_sigmas(1000), calculate_shift(64)))

    cond = teacher.encode_prompts(PROMPTS)
    states, _, mask, negative, _, negative_mask = pipe.encode_prompt(
        PROMPTS, negative_prompt=[NEGATIVE_PROMPT] * 2, device="cpu"
    )
    torch.testing.assert_close(cond["encoder_hidden_states"], states)
    torch.testing.assert_close(cond["encoder_hidden_states_mask"], mask, atol=0, rtol=0)
    lengths = (pipe.tokenizer(PROMPTS).input_ids[i] for i in range(2))
    assert mask.sum(dim=1).tolist() == [len(ids) + 1 for ids in lengths]  # its tokens and one padding
    empty = teacher.empty_cond()  # the real score's unconditional side: the model card's negative prompt
    torch.testing.assert_close(empty["encoder_hidden_states"], negative[:1])
    torch.testing.assert_close(empty["encoder_hidden_states_mask"], negative_mask[:1], atol=0, rtol=0)


def _transformer(pipe, x, sigma, states, mask, grid=(2, 2)):
    """The pipeline's transformer on one packed image, its text mask given (with the image's tokens) as is."""
    ids = pipe._prepare_latent_image_ids(1, *grid, "cpu", torch.float32)
    full = torch.cat([mask, torch.ones(1, x.shape[1], dtype=mask.dtype)], dim=1)
    return pipe.transformer(
        hidden_states=x,
        timestep=sigma,
        encoder_hidden_states=states,
        txt_ids=torch.zeros(states.shape[1], 3),
        img_ids=ids,
        attention_mask=full,
        return_dict=False,
    )[0]


def test_the_adapter_reads_no_padding_as_chroma_was_trained(teacher_and_pipe):
    """A CFG batch of three prompt lengths gives what the transformer gives each prompt alone with
    a boolean mask (padding masked out), not what ChromaPipeline's float 0/1 mask gives (padding
    read: diffusers #12116), which moves this tiny transformer's output by ~0.3."""
    from dmdcli.models.transformer import pack_latents, unpack_latents

    spec, teacher, pipe = teacher_and_pipe
    schedule = spec.schedule(32)
    denoiser = get_family("chroma").denoiser(teacher.network, schedule)
    cond = cat_cond(teacher.encode_prompts(PROMPTS), teacher.empty_cond())
    x, t = torch.randn(3, 16, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 500, 20])
    ours = denoiser(x, t, cond)
    for i in range(3):
        states, mask = cond["encoder_hidden_states"][i : i + 1], cond["encoder_hidden_states_mask"][i : i + 1]
        sigma = schedule.sigmas[t[i : i + 1]].float()
        masked = _transformer(pipe, pack_latents(x[i : i + 1]), sigma, states, mask.bool())
        torch.testing.assert_close(ours[i : i + 1], unpack_latents(masked, 4, 4), atol=2e-5, rtol=1e-4)
        read = _transformer(pipe, pack_latents(x[i : i + 1]), sigma, states, mask)
        assert (unpack_latents(read, 4, 4) - ours[i : i + 1]).abs().max() > 1e-2

    # A trained copy's forward under gradient checkpointing, where diffusers' Chroma hands its
    # single-stream blocks no mask: the same (no padding is read, so none needs masking).
    teacher.network.enable_gradient_checkpointing()
    try:
        with torch.enable_grad():
            checkpointed = denoiser(x.clone().requires_grad_(), t, cond)
    finally:
        teacher.network.disable_gradient_checkpointing()
    torch.testing.assert_close(checkpointed, ours, atol=2e-5, rtol=1e-4)

    # The GAN's features (a double- and a single-stream block): each prompt's as it gives them alone.
    for block in (0, 1):
        features = get_family("chroma").denoiser(teacher.network, schedule, gan_feature_block=block)
        batch = features.bottleneck(x, t, cond)
        for i in range(3):
            alone = features.bottleneck(x[i : i + 1], t[i : i + 1], {k: v[i : i + 1] for k, v in cond.items()})
            torch.testing.assert_close(batch[i : i + 1], alone, atol=2e-5, rtol=1e-4)
        assert batch.shape == (3, 32, 2, 2)
    assert shard_units(teacher.network) == [
        *teacher.network.transformer_blocks,
        *teacher.network.single_transformer_blocks,
    ]


@pytest.mark.parametrize("steps, lora", [(4, False), (1, True)])
def test_distill_then_sample(tmp_path, tiny_chroma, prompts_file, image_folder, steps, lora):
    distill_then_sample(tmp_path, tiny_chroma, "chroma", prompts_file, image_folder, steps, lora, "--guidance-scale", 3)


def _masked_prompt(pipe):
    """The prompt as the printed snippets pass it: encoded, with the mask the student reads with."""
    embeds, _, mask, *_ = pipe.encode_prompt("a cat", do_classifier_free_guidance=False)
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask * 201 - 200}


@pytest.mark.parametrize("kind, steps", [("full", 4), ("lora", 1)])
def test_a_diffusers_export_reproduces_dmd_sample(tmp_path, tiny_chroma, kind, steps):
    difference = export_matches_sample(
        tmp_path,
        tiny_chroma,
        "chroma",
        kind,
        steps,
        (1, 16, 16, 16),
        "guidance_scale=0",
        _masked_prompt,
        guidance_scale=0,
    )
    assert difference <= 2.0


def test_the_printed_lora_snippet_samples_the_student(tmp_path, tiny_chroma, monkeypatch):
    """The lines `dmd export --format lora` prints, run as a user would: the prompt encoded with the
    student's mask, then the pipeline without CFG."""
    run = make_student(tmp_path / "run", tiny_chroma, "chroma", "lora", 1)
    lora = tmp_path / "lora.safetensors"
    exported = runner.invoke(app, ["export", "--model", str(run), "--format", "lora", "--out", str(lora)])
    assert exported.exit_code == 0, exported.stderr
    code = exported.stderr[exported.stderr.index("import torch") :]
    assert "prompt_attention_mask=mask * 201 - 200" in code and "guidance_scale=0," in code
    prompt = ["sample", "--model", str(run), "--prompt", "a photo of a cat", "--out", str(tmp_path / "ours")]
    assert runner.invoke(app, prompt).exit_code == 0
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(code, scope)  # noqa: S102 - the snippet dmd printed, on the tiny teacher
    image = np.asarray(scope["image"]).astype(int)
    assert np.abs(image - sampled_image(tmp_path / "ours")).mean() <= 2.0


def test_a_lora_export_loads_into_the_teacher_pipeline(tmp_path, tiny_chroma):
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(2, 16, 64, generator=g),
        encoder_hidden_states=torch.randn(2, 7, 64, generator=g),
        timestep=torch.tensor([1.0, 0.4]),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(7, 3),
    )
    before, student, loaded = exported_lora_outputs(tmp_path, tiny_chroma, "chroma", inputs)
    assert (before - student).abs().max() > 5e-3 and (loaded - student).abs().max() < 5e-5


@pytest.mark.parametrize("masks", ["made right", "the pipeline's", "no negative prompt"])
def test_the_teacher_samples_with_cfg_against_the_negative_prompt(tmp_path, teacher_and_pipe, tiny_chroma, masks):
    """`dmd sample` of the teacher pipeline: --guidance-scale with the model card's negative prompt,
    both prompts encoded by the pipeline and their masks made right (it reads no padding)."""
    pipe = teacher_and_pipe[2]

    def encoded(negative_prompt):
        embeds, _, mask, negative, _, negative_mask = pipe.encode_prompt(["a cat"], [negative_prompt], device="cpu")
        return dict(
            prompt_embeds=embeds,
            prompt_attention_mask=mask * 201 - 200,
            negative_prompt_embeds=negative,
            negative_prompt_attention_mask=negative_mask * 201 - 200,
        )

    right = encoded(NEGATIVE_PROMPT)
    other = {
        "made right": right,
        "the pipeline's": {"negative_prompt": NEGATIVE_PROMPT},  # its float masks: the padding read
        "no negative prompt": encoded(""),
    }[masks]
    same, different = teacher_sample_differences(
        tmp_path, pipe, tiny_chroma, 12, {**right, "guidance_scale": 12}, {**other, "guidance_scale": 12}
    )
    assert same <= 1.0 and (different <= 1.0) == (masks == "made right")


def test_the_pipeline_handed_our_mask_samples_in_fp16(tiny_chroma):
    """The mask `dmd sample` and the snippets hand ChromaPipeline: the transformer squares its padding
    value, which must fit fp16 (-1e4 gave inf there, and NaN images)."""
    from diffusers import ChromaPipeline

    from dmdcli.models.chroma import chroma_guidance, pipeline_prompts

    pipe = ChromaPipeline.from_pretrained(tiny_chroma, torch_dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    for scale in (0, 3):
        guidance = chroma_guidance(scale)
        text = pipeline_prompts(pipe, ["a red circle"], guidance, {})
        images = pipe(**text, **guidance, num_inference_steps=2, height=32, width=32, output_type="np").images
        assert np.isfinite(images).all()


@pytest.mark.parametrize("dry_run", [False, True])
def test_fsdp_is_refused_in_one_line(tmp_path, tiny_chroma, prompts_file, dry_run):
    """Its adapter runs a batch's prompt lengths as separate forwards, as many as the batch has:
    FSDP's processes could disagree on how many (the dry run refuses as the run does)."""
    args = ["distill", "--recipe", "tiny", "--teacher", str(tiny_chroma), "--prompts", str(prompts_file)]
    args += ["--lora-rank", "0", "--fsdp", "--out", str(tmp_path / "run"), *(["--dry-run"] if dry_run else [])]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "FSDP's collectives cannot follow" in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "run").exists()


def test_dry_run_of_chroma_from_its_bundled_configs(prompts_file):
    """Offline, from the public configs shipped with dmd: the recipe Chroma1-HD gets fits one 32 GB GPU."""
    record, said = dry_run("chroma", prompts_file, "--batch-size", 1)
    assert "recipe chroma" in said
    assert (record["config"]["guidance_scale"], record["config"]["lora_rank"]) == (3.0, 64)
    memory = record["memory_gib"]
    assert memory["parameters"]["teacher network (frozen)"] == pytest.approx(8.9e9 * 2 / 2**30, rel=0.01)
    assert memory["peak"] < 32e9 / 2**30


def test_a_recorded_max_sequence_length_is_the_encodings(tiny_chroma):
    """A folder recording `_dmd_max_sequence_length` is read at that many T5 positions in training;
    `dmd sample` of the pipeline and the export snippets encode at as many."""
    from diffusers import ChromaPipeline

    from dmdcli.models.chroma import chroma_guidance, pipeline_prompts, snippet_prompt

    pipe = ChromaPipeline.from_pretrained(tiny_chroma)
    for call, positions in (({}, 512), ({"max_sequence_length": 16}, 16)):
        guidance = chroma_guidance(3)
        text = pipeline_prompts(pipe, ["a red circle"], guidance, call)
        assert text["prompt_embeds"].shape[1] == text["negative_prompt_embeds"].shape[1] == positions
    lines, _ = snippet_prompt('"a cat"', {"max_sequence_length": 16})
    assert lines[-1].endswith("do_classifier_free_guidance=False, max_sequence_length=16)")
