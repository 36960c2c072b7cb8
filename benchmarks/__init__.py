"""Benchmarks: the reference notebook's procedure against prunelab's (``python -m benchmarks.compare``)."""
