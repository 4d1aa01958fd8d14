"""An exponential moving average of the generator's trained weights (`--ema-decay`).

It shadows the trainable parameters (a full network's, or a LoRA adapter's) in their own dtype,
updated after every applied generator step: ema ← decay·ema + (1 − decay)·θ. The layouts never see
it: to save or load it, `swapped()` puts the average into the generator for the duration of a
block (tensor by tensor, so no second copy of the network is held), and the layout's own
generator_state / load_generator read or write it there, under whatever names and sharding
(FSDP) the layout uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class GeneratorEMA:
    def __init__(self, params: list[nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.params, self.decay = params, decay
        self.average = [p.detach().clone() for p in params]

    def reset(self) -> None:
        """Start the average at the generator's weights as they are now (after --init-from)."""
        with torch.no_grad():
            torch._foreach_copy_(self.average, [p.detach() for p in self.params])

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The average in the generator's parameters inside the block, and the raw weights in the
        average's place; swapped back on exit. Exact: only copies."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def _swap(self) -> None:
        for p, a in zip(self.params, self.average):
            raw = p.detach().clone()
            p.detach().copy_(a)
            a.copy_(raw)
