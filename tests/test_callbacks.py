"""The latency callback logs p50/p90/p99 through the trainer's loggers after ``trainer.test``."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import Logger

from prunelab.callbacks import LatencyCallback
from prunelab.data import SyntheticDataModule
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


def test_latency_callback_times_the_module_and_logs_percentiles(tmp_path):
    torch.manual_seed(0)
    dm = SyntheticDataModule(train_size=64, test_size=16, batch_size=8, num_workers=0)
    module = ImageClassifier(arch="resnet18", weights=None, num_classes=10, channels_last=True)
    logger = Recorder()
    cb = LatencyCallback(tag="dense", batch_size=4, warmup=1, iters=3)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=logger, callbacks=[cb], enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.test(module, datamodule=dm)
    stats = cb.results["dense"]
    assert stats["iters"] == 3 and stats["batch_size"] == 4
    assert stats["p50"] <= stats["p90"] <= stats["p99"]
    for k in ("p50", "p90", "p99"):
        assert logger.metrics[f"latency/dense/{k}_ms"] == stats[k]
