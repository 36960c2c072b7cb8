"""A search journal is reused only for the exact weights that made it (issue: a model with the same
dense predictions but other weights resumed another model's curve)."""

from __future__ import annotations

import torch

from conftest import FAST_LEARNER, compose_cfg
from prunelab.io import save_state_dict, state_digest
from prunelab.models import build_classifier
from prunelab.pipeline import run


def test_same_predictions_other_weights_start_afresh(tmp_path):
    torch.manual_seed(0)
    a = build_classifier("resnet18", None, 10).state_dict()
    b = dict(a)
    # Positive scaling of the last layer keeps every prediction (argmax) but changes the weights,
    # and with them the global magnitude ranking.
    b["fc.weight"], b["fc.bias"] = a["fc.weight"] * 10.0, a["fc.bias"] * 10.0
    assert state_digest(a) != state_digest(b)
    paths = {k: save_state_dict(tmp_path / f"{k}.pt", sd) for k, sd in (("a", a), ("b", b))}
    base = [*FAST_LEARNER, "search.grid=[0.3,0.6,0.9]", "search.refine_step=null", "search.full_curve=true",
            "stages.latency=false", f"finetune.cache_dir={tmp_path / 'cache'}"]

    def search(name: str, out: str) -> dict:
        cfg = compose_cfg(tmp_path / out, [*base, f"finetune.weights_path={paths[name]}"])
        return run(cfg)["search"]

    first_a = search("a", "a1")
    first_b = search("b", "b1")
    again_a = search("a", "a2")
    assert first_a["resumed_candidates"] == 0
    assert first_b["resumed_candidates"] == 0  # B's own curve, not A's from the journal
    assert again_a["resumed_candidates"] == len(first_a["curve"])  # A again: its own journal is reused
    assert [c["correct"] for c in again_a["curve"]] == [c["correct"] for c in first_a["curve"]]
