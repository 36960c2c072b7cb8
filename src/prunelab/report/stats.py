"""Accuracy with its uncertainty: a Wilson 95% interval over the number of images."""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """95% interval of an accuracy, in percent (Wilson score: sane near 0 and 100%)."""
    if total <= 0:
        return (0.0, 100.0)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half))


def accuracy(correct: int, total: int) -> dict:
    lo, hi = wilson_interval(correct, total)
    return {"value": 100.0 * correct / total if total else 0.0, "correct": correct, "n": total, "ci95": [lo, hi]}


def drop_within_noise(dense: dict, pruned: dict) -> bool:
    """True when the accuracy drop is smaller than the half-width of the dense 95% interval."""
    half = (dense["ci95"][1] - dense["ci95"][0]) / 2
    return dense["value"] - pruned["value"] < half
