"""Learning-rate schedules as pure functions of the optimiser step (no Lightning, no torch)."""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine")


def lr_factor(schedule: str, total_steps: int, warmup_steps: int):
    """The learning rate's multiplier at optimiser step ``t`` (0-based): linear warm-up from
    1/warmup to 1 over ``warmup_steps``, then constant or a half cosine that reaches 0 at
    ``total_steps``."""
    warmup_steps = min(max(0, warmup_steps), max(0, total_steps - 1))
    decay = max(1, total_steps - warmup_steps)

    def factor(t: int) -> float:
        if t < warmup_steps:
            return (t + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - warmup_steps) / decay)))

    return factor
