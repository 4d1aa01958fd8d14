"""A tiny TorchScript feature extractor shared by the eval tests (stands in for Inception)."""

import torch


class TinyFeatures(torch.nn.Module):
    """float [B, 3, H, W] in 0..255 → [B, 11]: mean |response| of 8 fixed zero-mean 5×5 filters
    (texture) and the mean colour."""

    def __init__(self):
        super().__init__()
        w = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(0)) / 5
        self.register_buffer("w", w - w.mean(dim=(2, 3), keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / 255.0
        h = torch.nn.functional.conv2d(x, self.w, stride=4)
        return torch.cat([3 * h.abs().mean(dim=(2, 3)), 0.3 * x.mean(dim=(2, 3))], dim=1)


def save_tiny_extractor(path) -> str:
    """Script TinyFeatures to a TorchScript file (what `--features PATH` loads)."""
    torch.jit.script(TinyFeatures()).save(str(path))
    return str(path)
