"""The Lightning callbacks: the latency callback serves and times the module as a run does and logs
p50/p90/p99; the pruning callback prunes with any registered method, a smaller network included."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

from prunelab.callbacks import LatencyCallback, MagnitudePruning, PruningCallback
from prunelab.data import SyntheticDataModule
from prunelab.errors import ConfigError
from prunelab.models import ImageClassifier


class Recorder(Logger):
    name, version = "recorder", 0

    def __init__(self):
        super().__init__()
        self.metrics: dict[str, float] = {}

    @property
    def experiment(self):
        return None

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)


def test_latency_callback_times_the_served_form_and_logs_percentiles(tmp_path):
    torch.manual_seed(0)
    dm = SyntheticDataModule(train_size=64, test_size=16, batch_size=8, num_workers=0)
    module = ImageClassifier(arch="resnet18", weights=None, num_classes=10, channels_last=True)
    logger = Recorder()
    cb = LatencyCallback(tag="dense", runtime="deploy", batch_size=4, batch_sizes=[4], warmup=1, iters=3,
                         agreement_images=0)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=logger, callbacks=[cb], enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.test(module, datamodule=dm)
    stats = cb.results["dense"]
    assert stats["iters"] == 3 and stats["batch_size"] == 4
    assert stats["p50"] <= stats["p90"] <= stats["p99"]
    for k in ("p50", "p90", "p99"):
        assert logger.metrics[f"latency/dense/{k}_ms"] == stats[k]
    timing = cb.timings["dense"]
    # the deploy form the pipeline times, its answers checked against the eager fp32 model first
    assert timing["runtime"]["runtime"] == "deploy" and timing["runtime"]["spec"]["iters"] == 3
    assert timing["agreement"]["dense"]["images"] == 4


def test_latency_callback_refuses_what_is_not_a_latency_setting():
    with pytest.raises(ValueError, match="bogus"):
        LatencyCallback(bogus=1)
    with pytest.raises(ConfigError, match=r"latency\.iters=0 must be an integer >= 1"):
        LatencyCallback(iters=0)


def test_pruning_callback_hands_a_smaller_network_to_the_optimiser(tmp_path):
    """Channel pruning builds a new network: pruned before the optimiser is built, that network trains."""
    L.seed_everything(0)
    dm = SyntheticDataModule(train_size=32, test_size=8, batch_size=16, num_workers=0)
    module = ImageClassifier("resnet18", None, lr=0.05)
    dense_params = sum(p.numel() for p in module.net.parameters())
    cb = PruningCallback(0.5, method="channel", when="fit_start", round_to=1)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", callbacks=[cb], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0, limit_train_batches=1)
    trainer.fit(module, datamodule=dm)
    assert sum(p.numel() for p in module.net.parameters()) < dense_params
    trained = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert trained == {id(p) for p in module.parameters()}  # the new network's parameters, none of the old


def test_magnitude_pruning_is_the_pruning_callback_with_method_magnitude():
    cb = MagnitudePruning(0.3, "layerwise", when="fit_start")
    assert isinstance(cb, PruningCallback) and (cb.method, cb.ratio, cb.scope, cb.when) == (
        "magnitude", 0.3, "layerwise", "fit_start")
    with pytest.raises(ValueError, match="prune.method"):
        PruningCallback(0.3, method="bogus")
