"""LoRA heads on the teacher's UNet, through peft: the generator's, and with a shared base the
fake score's too, on module trees that share the teacher's frozen weights."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

GENERATOR_ADAPTER = "generator"
FAKE_SCORE_ADAPTER = "fake_score"


def share_weights(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters and buffers ARE the original's (no memory copied).

    Each copy then gets its own single LoRA adapter, so generator, fake score and teacher are
    three module trees over one set of frozen weights. Unlike peft's multi-adapter switching
    (one active adapter at a time, process-wide), every tree is a plain module: gradient
    checkpointing recomputes each with its own adapter, and data-parallel wrappers see them apart.
    """
    import copy

    memo = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return copy.deepcopy(module, memo)


def add_generator_lora(
    unet: nn.Module,
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    adapter_name: str = GENERATOR_ADAPTER,
) -> list[nn.Parameter]:
    """Freeze `unet`, add a LoRA adapter (peft's default init, as the reference's LoraConfig:
    Kaiming-uniform A, zero B, so the student starts as the teacher) and return its
    trainable parameters, in fp32 whatever the base's dtype. `target_modules`: the family's
    (Family.lora_targets; a saved student passes the list from its metadata)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    targets = list(target_modules)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
    unet.add_adapter(config, adapter_name=adapter_name)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # fp32 master weights for the adapter, also on a bf16 base
        p.data = p.data.float()
    return params


def lora_state_dict(unet: nn.Module, adapter_name: str = GENERATOR_ADAPTER) -> dict:
    """An adapter's weights (peft key layout, as `save_lora_weights` writes them)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet, adapter_name=adapter_name)


def load_lora_state_dict(unet: nn.Module, state: dict, adapter_name: str = GENERATOR_ADAPTER) -> None:
    """Load adapter weights saved by `lora_state_dict` into a UNet that has the adapter. Weights
    for other target modules are a ValueError naming the first keys left unexpected or missing
    (another rank fails in peft, on the shapes)."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state, adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    missing = [k for k in getattr(result, "missing_keys", None) or [] if f".{adapter_name}." in k]
    if unexpected or missing:
        kind, keys = ("unexpected", unexpected) if unexpected else ("missing", missing)
        raise ValueError(f"LoRA weights do not fit this UNet ({kind} keys: {', '.join(keys[:3])})")
