"""Exponential moving average of the trainable weights, used for evaluation."""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List

import torch


class EMA:
    """``ema = d * ema + (1 - d) * param`` every ``every`` optimizer steps, with the warm-up
    ``d = min(decay, (1 + n) / (10 + n))`` (n = updates so far), so early EMAs follow the weights."""

    def __init__(self, params: List[torch.nn.Parameter], decay: float, every: int):
        self.params = list(params)
        self.decay, self.every = decay, every
        self.shadow = [p.detach().clone() for p in self.params]
        self.num_updates = 0

    @torch.no_grad()
    def step(self, optimizer_step: int) -> None:
        if optimizer_step % self.every:
            return
        self.blend(min(self.decay, (1 + self.num_updates) / (10 + self.num_updates)))

    @torch.no_grad()
    def blend(self, d: float) -> None:
        """``shadow = d * shadow + (1 - d) * param`` once (counts as an update)."""
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)
        self.num_updates += 1

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the parameters."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)

    def state_dict(self) -> Dict:
        return {"shadow": [s.cpu() for s in self.shadow], "num_updates": self.num_updates}

    def load_state_dict(self, state: Dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state['shadow'])} tensors, expected {len(self.shadow)}")
        self.shadow = [s.to(p.device, p.dtype) for s, p in zip(state["shadow"], self.params)]
        self.num_updates = state["num_updates"]
