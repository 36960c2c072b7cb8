"""Pruning: pure ranking/mask/search functions and the Lightning callbacks built on them."""
