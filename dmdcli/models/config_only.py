"""A diffusers pipeline folder holding only the config files of a bundled architecture
(`dmdcli.models.architectures`): what `dmd distill --dry-run` reads for a teacher it cannot
download, and what the memory and speed benchmark builds from."""

from __future__ import annotations

import json
from pathlib import Path

from dmdcli.models.architectures import ARCHITECTURES, SD_SCHEDULER


def bundled_architecture(teacher: str) -> str | None:
    """The ARCHITECTURES key whose public configs stand for `teacher` (an alias or its hub id)
    when they cannot be read from the hub, e.g. offline; None for any other teacher."""
    from dmdcli.models.families import teacher_aliases

    aliases = teacher_aliases()
    hub_id = aliases.get(teacher, teacher)  # every alias of a model, and its hub id, name one model
    return next((name for name in ARCHITECTURES if aliases[name] == hub_id), None)


# by the text encoder's class; else CLIP's
_TOKENIZERS = (("T5", "T5TokenizerFast"), ("Qwen", "Qwen2Tokenizer"), ("Mistral3", "PixtralProcessor"))


def write_config_only_pipeline(folder: str | Path, name: str) -> Path:
    """A diffusers pipeline folder holding only the config files of architecture `name`."""
    arch = ARCHITECTURES[name]
    folder = Path(folder)
    network = "unet" if "unet" in arch else "transformer"
    scheduler = arch.get("scheduler", SD_SCHEDULER)
    index = {
        "_class_name": arch["pipeline"],
        network: ["diffusers", arch[network]["_class_name"]],
        "vae": ["diffusers", arch["vae"].get("_class_name", "AutoencoderKL")],
        "scheduler": ["diffusers", scheduler["_class_name"]],
    }
    files = {
        f"{network}/config.json": arch[network],
        "vae/config.json": arch["vae"],
        "scheduler/scheduler_config.json": scheduler,
    }
    for sub, config in arch["text_encoders"].items():
        index[sub] = ["transformers", config["architectures"][0]]
        tokenizer = next((t for p, t in _TOKENIZERS if config["architectures"][0].startswith(p)), "CLIPTokenizer")
        index[sub.replace("text_encoder", "tokenizer")] = ["transformers", tokenizer]
        files[f"{sub}/config.json"] = config
    files["model_index.json"] = index
    for rel, config in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(json.dumps(config, indent=1))
    return folder
