"""A method's own random numbers: one seeded ``torch.Generator`` per device.

Every rank builds it with the same seed and draws the same numbers in the same order, so a
random rule applied to all-reduced gradients (OGM-GE's noise, AMSS's masks) leaves the DDP
replicas equal. Its states travel with the method's extra state (``state_dict``).
"""

from __future__ import annotations

from typing import Any

import torch

from gradbalance.errors import ConfigurationError


def check_seed(seed: Any) -> int:
    """``seed`` as an int (a bool or anything else is refused)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigurationError(f"seed must be an int, got {seed!r}")
    return seed


class SeededGenerators:
    """Lazily created generators, one per device, all seeded with ``seed``.

    Example:
        >>> import torch
        >>> a, b = SeededGenerators(3), SeededGenerators(3)
        >>> device = torch.device("cpu")
        >>> x = torch.rand(4, generator=a.get(device))
        >>> torch.equal(x, torch.rand(4, generator=b.get(device)))
        True
    """

    def __init__(self, seed: int) -> None:
        self.seed = check_seed(seed)
        self._generators: dict[str, torch.Generator] = {}
        self._pending: dict[str, torch.Tensor] = {}

    def get(self, device: torch.device) -> torch.Generator:
        """The generator of ``device`` (restored from a loaded state, else seeded)."""
        key = str(device)
        generator = self._generators.get(key)
        if generator is None:
            generator = torch.Generator(device=device)
            state = self._pending.pop(key, None)
            if state is not None:
                generator.set_state(state)
            else:
                generator.manual_seed(self.seed)
            self._generators[key] = generator
        return generator

    def states(self) -> dict[str, torch.Tensor]:
        """``{device: state}`` of every generator (those loaded but not used yet included)."""
        return {**self._pending, **{key: g.get_state() for key, g in self._generators.items()}}

    def load(self, states: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`states` (each generator takes its state when next used)."""
        self._generators = {}
        self._pending = dict(states)
