"""Percentiles and the forward timer."""

import numpy as np
import pytest
import torch
from torch import nn

from prunelab.latency import (
    latency_batches,
    paired_stats,
    percentiles,
    summarize,
    time_forward,
    time_interleaved,
)


def test_percentiles_match_numpy():
    rng = np.random.default_rng(0)
    xs = rng.exponential(10, size=101).tolist()
    got = percentiles(xs)
    for q in (50, 90, 99):
        assert got[f"p{q}"] == pytest.approx(np.percentile(xs, q))
    assert percentiles([1, 2, 3, 4])["p50"] == 2.5
    with pytest.raises(ValueError):
        percentiles([])


def test_summarize_images_per_second():
    s = summarize([10.0, 10.0, 10.0], batch_size=128)
    assert s["images_per_s"] == pytest.approx(12800.0) and s["iters"] == 3


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.calls, self.modes = 0, set()

    def forward(self, x):
        self.calls += 1
        self.modes.add((self.training, torch.is_inference_mode_enabled()))
        return self.lin(x)


@pytest.mark.parametrize("include_transfer", [False, True])
def test_time_forward_warms_up_runs_eval_inference_and_restores_mode(include_transfer):
    m = Counting()
    m.train()
    samples = time_forward(m, torch.randn(8, 4), "cpu", warmup=3, iters=7, include_transfer=include_transfer)
    assert len(samples) == 7 and m.calls == 10 and all(s > 0 for s in samples)
    assert m.modes == {(False, True)}
    assert m.training


class Logged(Counting):
    """Counts its calls and writes each one, tagged, to a shared log (to see the turn order)."""

    def __init__(self, tag, log):
        super().__init__()
        self.tag, self.log = tag, log

    def forward(self, x):
        self.log.append(self.tag)
        return super().forward(x)


def test_interleaved_timing_takes_turns_after_warmup_and_restores_modes():
    log = []
    a, b = Logged("a", log), Logged("b", log)
    b.train()
    samples = time_interleaved({"a": a.eval(), "b": b}, torch.randn(8, 4), "cpu", warmup=2, iters=3)
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3}
    # every model warms up first, then the timed calls alternate one by one
    assert log == ["a", "a", "b", "b", "a", "b", "a", "b", "a", "b"]
    assert a.modes == b.modes == {(False, True)}
    assert not a.training and b.training


def test_paired_stats_ratio_of_p50s_and_per_iteration_spread():
    dense, pruned = [10.0, 12.0, 20.0, 11.0], [5.0, 6.0, 10.0, 11.0]
    out = paired_stats(dense, pruned, batch_size=8)
    assert out["speedup_p50"] == pytest.approx(np.median(dense) / np.median(pruned))
    ratios = np.array(dense) / np.array(pruned)
    assert out["paired_ratio"]["p50"] == pytest.approx(np.median(ratios))
    assert out["paired_ratio"]["p5"] == pytest.approx(np.percentile(ratios, 5))
    assert out["dense"]["batch_size"] == 8 and out["pruned"]["iters"] == 4
    with pytest.raises(ValueError, match="differ in length"):
        paired_stats([1.0], [1.0, 2.0], 1)


def test_latency_batches_always_hold_the_headline_size():
    from prunelab.deploy.spec import resolve_spec
    from prunelab.hardware import Hardware

    cpu = Hardware("cpu", "test")
    assert resolve_spec({"batch_size": 64, "batch_sizes": [1, 128]}, cpu)[0].batch_sizes == (1, 64, 128)
    assert resolve_spec({"batch_size": 4, "batch_sizes": []}, cpu)[0].batch_sizes == (4,)
    data = [(torch.full((3, 2, 2), float(i)), i) for i in range(5)]
    got = latency_batches(data, resolve_spec({"batch_size": 4, "batch_sizes": [1, 8]}, cpu)[0].batch_sizes)
    assert sorted(got) == [1, 4, 8] and got[8].shape == (8, 3, 2, 2)
    assert torch.equal(got[4], got[8][:4]) and float(got[8][5, 0, 0, 0]) == 0.0  # wraps round the split
    with pytest.raises(ValueError):
        latency_batches(data, [0, 4])


def test_summary_carries_the_coefficient_of_variation():
    from prunelab.latency import summarize

    assert summarize([10.0, 10.0, 10.0], 4)["cv"] == 0.0
    assert summarize([8.0, 12.0], 4)["cv"] == pytest.approx(np.std([8.0, 12.0], ddof=1) / 10.0)


def test_a_speedup_whose_paired_interval_holds_one_is_no_measurable_difference():
    from prunelab.report.stats import speed_text, speed_verdict

    assert speed_verdict([0.95, 1.08]) == "no measurable difference"
    assert speed_text(1.02, [0.95, 1.08]) == "no measurable difference (paired 5-95% 0.95-1.08)"
    assert speed_text(2.31, [1.9, 2.6]) == "2.31x (paired 5-95% 1.90-2.60)"
    assert speed_verdict([0.7, 0.9]) == "slower" and "slower" in speed_text(0.8, [0.7, 0.9])


def test_a_noisy_timing_says_so_in_the_report():
    from prunelab.report.sections import timing_spread as _timing_spread

    lat: dict = {"notes": []}
    _timing_spread(lat, {"cv": 0.02}, {"cv": 0.31})
    assert lat["cv"] == {"dense": 0.02, "pruned": 0.31} and lat["noisy"] is True
    assert "coefficient of variation" in lat["notes"][-1] and "31%" in lat["notes"][-1]
    quiet: dict = {}
    _timing_spread(quiet, {"cv": 0.02}, {"cv": 0.03})
    assert quiet["noisy"] is False and "notes" not in quiet
