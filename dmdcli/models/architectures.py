"""The public configs of the full-size SD1.5 and SDXL architectures (no weights).

Written out as a config-only pipeline folder, they let `dmd distill --dry-run` and the memory
and speed benchmark build the real architectures (on the meta device, or with random weights)
on a machine that cannot download the models.
"""

from __future__ import annotations

import json
from pathlib import Path

_CLIP_L = {
    "architectures": ["CLIPTextModel"],
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
_CLIP_BIGG = {
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "gelu",
    "projection_dim": 1280,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 32,
    "act_fn": "silu",
}
_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}

ARCHITECTURES = {
    "sd15": {
        "pipeline": "StableDiffusionPipeline",
        "unet": {
            "_class_name": "UNet2DConditionModel",
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": [320, 640, 1280, 1280],
            "layers_per_block": 2,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        },
        "vae": {**_VAE, "sample_size": 512, "scaling_factor": 0.18215},
        "text_encoders": {"text_encoder": _CLIP_L},
    },
    "sdxl": {
        "pipeline": "StableDiffusionXLPipeline",
        "unet": {
            "_class_name": "UNet2DConditionModel",
            "sample_size": 128,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": [320, 640, 1280],
            "layers_per_block": 2,
            "cross_attention_dim": 2048,
            "attention_head_dim": [5, 10, 20],
            "transformer_layers_per_block": [1, 2, 10],
            "use_linear_projection": True,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "addition_embed_type": "text_time",
            "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
        "vae": {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "text_encoders": {"text_encoder": _CLIP_L, "text_encoder_2": _CLIP_BIGG},
    },
}


def bundled_architecture(teacher: str) -> str | None:
    """The ARCHITECTURES key whose public configs stand for `teacher` (an alias or its hub id)
    when they cannot be read from the hub, e.g. offline; None for any other teacher."""
    from dmdcli.models.families import teacher_aliases

    aliases = teacher_aliases()
    hub_id = aliases.get(teacher, teacher)  # every alias of a model, and its hub id, name one model
    return next((name for name in ARCHITECTURES if aliases[name] == hub_id), None)


def write_config_only_pipeline(folder: str | Path, name: str) -> Path:
    """A diffusers pipeline folder holding only the config files of architecture `name`."""
    arch = ARCHITECTURES[name]
    folder = Path(folder)
    index = {
        "_class_name": arch["pipeline"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    files = {
        "unet/config.json": arch["unet"],
        "vae/config.json": arch["vae"],
        "scheduler/scheduler_config.json": _SCHEDULER,
    }
    for sub, config in arch["text_encoders"].items():
        index[sub] = ["transformers", config["architectures"][0]]
        index[sub.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
        files[f"{sub}/config.json"] = config
    files["model_index.json"] = index
    for rel, config in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(json.dumps(config, indent=1))
    return folder
