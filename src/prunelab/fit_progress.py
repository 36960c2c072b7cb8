"""Where a Lightning fit stands, read from the trainer's counters (no hooks, no state of its own)."""

from __future__ import annotations


def final_epoch(trainer) -> bool:
    """Whether the epoch ending now is the fit's last (max_epochs, max_steps or a requested stop)."""
    if trainer.should_stop:
        return True
    if trainer.max_epochs is not None and trainer.max_epochs >= 0 and trainer.current_epoch + 1 >= trainer.max_epochs:
        return True
    return trainer.max_steps is not None and trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps
