"""Pruning methods (masks, magnitude, channel, 2:4 and chains of them), the registry that describes
each one, and the ``prune`` group's spec."""
