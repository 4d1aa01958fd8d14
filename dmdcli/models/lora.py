"""The generator as a LoRA head on a frozen copy of the teacher's UNet, through peft."""

from __future__ import annotations

from torch import nn

# The DMD2 reference's SDXL LoRA targets: attention, feed-forward, resnet convs, resampling
# convs and the time-embedding projections.
LORA_TARGET_MODULES = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
]
GENERATOR_ADAPTER = "generator"


def add_generator_lora(unet: nn.Module, rank: int, alpha: float, target_modules: list[str] | None = None) -> list[nn.Parameter]:
    """Freeze `unet`, add the generator's LoRA adapter (gaussian init as the reference) and
    return its trainable parameters. `target_modules` defaults to LORA_TARGET_MODULES (a saved
    student passes the list from its metadata)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    targets = list(target_modules or LORA_TARGET_MODULES)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
    unet.add_adapter(config, adapter_name=GENERATOR_ADAPTER)
    return [p for p in unet.parameters() if p.requires_grad]


def lora_state_dict(unet: nn.Module) -> dict:
    """The generator adapter's weights (peft key layout, as `save_lora_weights` writes them)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet, adapter_name=GENERATOR_ADAPTER)


def load_lora_state_dict(unet: nn.Module, state: dict) -> None:
    """Load generator adapter weights saved by `lora_state_dict` into a UNet that has the adapter."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state, adapter_name=GENERATOR_ADAPTER)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA weights do not fit this UNet: unexpected keys {unexpected[:3]}")
