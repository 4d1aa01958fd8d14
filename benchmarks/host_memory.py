"""Host memory of reading a teacher's denoising network: in fp32 and cast after (a trained run's
read), against straight in the frozen dtype (a shared LoRA base's read, `PipelineTeacher`'s
`frozen_network`).

The network is built from its bundled public config with random weights and saved in bf16 (as
FLUX.1-dev and Qwen-Image ship), then each read runs in a fresh process, which prints its peak
resident set. On a CPU the bf16 network itself lives in host memory; on a GPU
(`--device cuda`) the lean read places each tensor on the GPU as it is read.

    python benchmarks/host_memory.py                    # SD1.5's UNet (0.86B)
    python benchmarks/host_memory.py --arch sdxl        # SDXL's (2.57B), 5 GB of disk
    python benchmarks/host_memory.py --arch flux-dev --device cuda   # 12B: 24 GB of disk, a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

GIB = 2**30


def build(arch: str, folder: Path) -> Path:
    """The network of `arch` with random weights, saved in bf16 under folder/<network>."""
    import diffusers
    import torch
    from diffusers.utils import logging

    from dmdcli.models.architectures import ARCHITECTURES

    logging.set_verbosity_error()  # its note on casting with .to(): this model keeps no module in fp32

    config = ARCHITECTURES[arch]
    network = "unet" if "unet" in config else "transformer"
    cls = getattr(diffusers, config[network]["_class_name"])
    with torch.device("meta"):
        model = cls.from_config(config[network])
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(folder / network)
    return folder / network


def read(folder: Path, lean: bool, device: str) -> dict:
    """Peak resident set of reading the network at `folder` (in this process)."""
    import diffusers
    import torch

    cls = getattr(diffusers, json.loads((folder / "config.json").read_text())["_class_name"])
    if lean:
        model = cls.from_pretrained(folder, torch_dtype=torch.bfloat16, device_map={"": torch.device(device)})
    else:
        model = cls.from_pretrained(folder).to(device, torch.bfloat16)  # fp32 on the host, then cast
    params = sum(p.numel() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"parameters": params, "peak_rss_gib": peak / GIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15", help="a bundled architecture: sd15, sdxl, sd35-medium, flux-dev, ...")
    parser.add_argument("--device", default="cpu", help="where the network goes (cpu or cuda)")
    parser.add_argument("--read", choices=["fp32", "bf16"], help=argparse.SUPPRESS)  # one read, in a child process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read:
        print(json.dumps(read(Path(args.folder), args.read == "bf16", args.device)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = build(args.arch, Path(tmp))
        print(f"{args.arch}'s network, bf16 on disk: {sum(f.stat().st_size for f in folder.iterdir()) / GIB:.2f} GiB")
        print("| read | parameters | peak host memory (RSS) |\n| --- | ---: | ---: |")
        for how, label in (("fp32", "fp32, then cast to bf16"), ("bf16", "bf16 onto the device (frozen_network)")):
            child = [sys.executable, __file__, "--read", how, "--folder", str(folder), "--device", args.device]
            out = subprocess.run(child, check=True, capture_output=True, text=True, env=os.environ).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(f"| {label} | {row['parameters'] / 1e9:.2f}B | {row['peak_rss_gib']:.2f} GiB |")


if __name__ == "__main__":
    main()
