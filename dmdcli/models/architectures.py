"""The public configs of the full-size SD1.5, SDXL, SD3.5 (medium, large), FLUX.1-dev, Chroma1-HD,
FLUX.2 [klein] base (4B, 9B) and [dev], Qwen-Image and Z-Image architectures (no weights).

Written out as a config-only pipeline folder (`dmdcli.models.config_only`), they let `dmd distill
--dry-run` and the memory and speed benchmark build the real architectures (on the meta device, or
with random weights) on a machine that cannot download the models.
"""

from __future__ import annotations

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
SD_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}

# SD3's text encoders: CLIP-L with its projection (pooled), OpenCLIP bigG, T5-XXL's encoder.
_CLIP_L_PROJECTION = {**_CLIP_L, "architectures": ["CLIPTextModelWithProjection"]}
_T5_XXL = {
    "architectures": ["T5EncoderModel"],
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "is_encoder_decoder": False,
}
_SD3_VAE = {
    **_VAE,
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
_SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
_SD3_TRANSFORMER = {
    "_class_name": "SD3Transformer2DModel",
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "attention_head_dim": 64,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 2048,
    "qk_norm": "rms_norm",
}


def _sd3(transformer: dict) -> dict:
    return {
        "pipeline": "StableDiffusion3Pipeline",
        "transformer": {**_SD3_TRANSFORMER, **transformer},
        "vae": _SD3_VAE,
        "scheduler": _SD3_SCHEDULER,
        "text_encoders": {"text_encoder": _CLIP_L_PROJECTION, "text_encoder_2": _CLIP_BIGG, "text_encoder_3": _T5_XXL},
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

ARCHITECTURES["sd3.5-medium"] = _sd3(
    {
        "num_layers": 24,
        "num_attention_heads": 24,
        "caption_projection_dim": 1536,
        "pos_embed_max_size": 384,
        "dual_attention_layers": list(range(13)),
    }
)
ARCHITECTURES["sd3.5-large"] = _sd3(
    {"num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432, "pos_embed_max_size": 192}
)

ARCHITECTURES["flux-dev"] = {
    "pipeline": "FluxPipeline",
    "transformer": {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": True,
        "axes_dims_rope": [16, 56, 56],
    },
    "vae": {**_SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159},
    "scheduler": {
        **_SD3_SCHEDULER,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
    "text_encoders": {"text_encoder": _CLIP_L, "text_encoder_2": _T5_XXL},
}

# Chroma1-HD: FLUX.1's blocks, VAE and T5 (its transformer class's defaults are its config); the
# scheduler FLUX.1's (ChromaPipeline computes μ from it as FluxPipeline does).
ARCHITECTURES["chroma"] = {
    "pipeline": "ChromaPipeline",
    "transformer": {"_class_name": "ChromaTransformer2DModel", "axes_dims_rope": [16, 56, 56]},
    "vae": ARCHITECTURES["flux-dev"]["vae"],
    "scheduler": ARCHITECTURES["flux-dev"]["scheduler"],
    "text_encoders": {"text_encoder": _T5_XXL},
}


# Qwen-Image: a 60-block MMDiT (QwenImageTransformer2DModel's defaults are its sizes), Wan's video
# VAE (AutoencoderKLQwenImage's defaults, latent statistics included) and Qwen2.5-VL-7B-Instruct.
_QWEN25_VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "text_config": {
        "model_type": "qwen2_5_vl_text",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 128000,
        "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    },
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
    },
    "tie_word_embeddings": False,
}
ARCHITECTURES["qwen-image"] = {
    "pipeline": "QwenImagePipeline",
    "transformer": {"_class_name": "QwenImageTransformer2DModel"},
    "vae": {"_class_name": "AutoencoderKLQwenImage"},
    "scheduler": {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 0.9,
        "base_image_seq_len": 256,
        "max_image_seq_len": 8192,
        "shift_terminal": 0.02,
        "time_shift_type": "exponential",
    },
    "text_encoders": {"text_encoder": _QWEN25_VL_7B},
}


# FLUX.2 [klein] base: Flux2Transformer2DModel, FLUX.2's VAE (AutoencoderKLFlux2's defaults are its
# config) and Qwen3 (4B: Qwen3-4B; 9B: Qwen3-8B). The base models' model_index.json has no
# is_distilled (the step-distilled ones say true). Their scheduler config is FLUX.2-dev's; the
# pipeline computes its own μ and reads only use_dynamic_shifting and num_train_timesteps of it.
_QWEN3_4B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
_FLUX2_KLEIN_4B = {
    "_class_name": "Flux2Transformer2DModel",
    "patch_size": 1,
    "in_channels": 128,
    "num_layers": 5,
    "num_single_layers": 20,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 7680,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": [32, 32, 32, 32],
    "rope_theta": 2000,
    "eps": 1e-6,
    "guidance_embeds": False,
}
_FLUX2_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}
ARCHITECTURES["flux2-klein-4b"] = {
    "pipeline": "Flux2KleinPipeline",
    "transformer": _FLUX2_KLEIN_4B,
    "vae": {"_class_name": "AutoencoderKLFlux2"},
    "scheduler": _FLUX2_SCHEDULER,
    "text_encoders": {"text_encoder": _QWEN3_4B},
}
ARCHITECTURES["flux2-klein-9b"] = {
    **ARCHITECTURES["flux2-klein-4b"],
    "transformer": {
        **_FLUX2_KLEIN_4B,
        "num_layers": 8,
        "num_single_layers": 24,
        "num_attention_heads": 32,
        "joint_attention_dim": 12288,
    },
    "text_encoders": {
        "text_encoder": {**_QWEN3_4B, "hidden_size": 4096, "intermediate_size": 12288, "tie_word_embeddings": False}
    },
}


# FLUX.2 [dev]: a 32B Flux2Transformer2DModel (its class's defaults are its config: 8 double-stream
# and 48 single-stream blocks of width 6144, a guidance embedding), the VAE and scheduler above, and
# Mistral Small 3.1 (24B; a Pixtral vision tower the pipeline never runs).
ARCHITECTURES["flux2-dev"] = {
    "pipeline": "Flux2Pipeline",
    "transformer": {
        **_FLUX2_KLEIN_4B,
        "num_layers": 8,
        "num_single_layers": 48,
        "num_attention_heads": 48,
        "joint_attention_dim": 15360,
        "guidance_embeds": True,
    },
    "vae": {"_class_name": "AutoencoderKLFlux2"},
    "scheduler": _FLUX2_SCHEDULER,
    "text_encoders": {
        "text_encoder": {
            "architectures": ["Mistral3ForConditionalGeneration"],
            "model_type": "mistral3",
            "image_token_index": 10,
            "multimodal_projector_bias": False,
            "projector_hidden_act": "gelu",
            "spatial_merge_size": 2,
            "vision_feature_layer": -1,
            "tie_word_embeddings": False,
            "text_config": {
                "model_type": "mistral",
                "hidden_size": 5120,
                "intermediate_size": 32768,
                "num_hidden_layers": 40,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "head_dim": 128,
                "vocab_size": 131072,
                "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-5,
                "rope_theta": 1000000000.0,
                "sliding_window": None,
            },
            "vision_config": {
                "model_type": "pixtral",
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "head_dim": 64,
                "patch_size": 14,
                "image_size": 1540,
                "rope_theta": 10000.0,
            },
        }
    },
}


# Z-Image (base): a 30-layer single-stream transformer (ZImageTransformer2DModel's defaults are its
# sizes), FLUX.1's VAE and Qwen3-4B (a Qwen3Model: no LM head); a static shift of 6 (Turbo's: 3).
ARCHITECTURES["z-image"] = {
    "pipeline": "ZImagePipeline",
    "transformer": {"_class_name": "ZImageTransformer2DModel", "axes_lens": [1536, 512, 512]},
    "vae": {**_SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159},
    "scheduler": {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "shift": 6.0,
        "use_dynamic_shifting": False,
    },
    "text_encoders": {"text_encoder": {**_QWEN3_4B, "architectures": ["Qwen3Model"]}},
}
