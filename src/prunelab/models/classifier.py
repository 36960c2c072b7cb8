"""The LightningModule: a torchvision classifier, cross-entropy, SGD, accuracy per split.

``channels_last`` and ``compile`` change how the network runs, never what it stores:
``module.net.state_dict()`` keeps plain torchvision keys either way. ``fused_optimizer`` runs
SGD's momentum and weight-decay update as one fused kernel (VGG16 on a CPU: 0.28 s to 0.07 s a
step, the same numbers), falling back to the multi-tensor ``foreach`` path where fused SGD is
not available for the parameters' device or dtype. ``compile_mode`` is ``torch.compile``'s mode;
the CUDA-graph modes (``reduce-overhead``, ``max-autotune``) replay each step's kernels from a graph,
which pays where a step's Python and launch work outlasts its GPU arithmetic (small images, eager
Lightning steps on an H100/H200).

``fold_classifier`` trains a VGG at 32x32 in its folded form (``models.rewrite.fold_for_training``):
the same SGD trajectory with a quarter of the parameters. The network is folded when a fit is set
up (before a checkpoint is restored into it and before DDP wraps it) and unfolded at the end of
the fit's last epoch, before any callback's ``on_train_end``/``on_fit_end`` (a pruning callback,
a search) looks at it; checkpoints always hold the folded form, the one their optimiser state
belongs to. Callbacks that run during the fit (a pruning callback at fit start) see the folded
network: set ``model.fold_classifier=false`` for one that must see torchvision's.

``teacher`` and ``distill`` (a pruned model's recovery): the training loss becomes
``(1 - distill) x cross-entropy + distill x T^2 x KL(teacher || student)`` on both models' softmax at
temperature ``T = distill_temperature`` (the T^2 keeps the soft targets' gradients the size of the
hard ones'). The teacher runs in eval mode without gradients and is kept out of the module tree:
neither trained, nor saved, nor counted.
"""

from __future__ import annotations

import warnings

import torch
from lightning import LightningModule
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from prunelab.errors import ConfigError
from prunelab.fit_progress import final_epoch
from prunelab.hardware import COMPILE_MODES, GRAPH_COMPILE_MODES
from prunelab.lr_schedule import LR_SCHEDULES, lr_factor
from prunelab.models.factory import build_classifier
from prunelab.models.rewrite import fold_for_training, memory_format, unfold_after_training


class ImageClassifier(LightningModule):
    def __init__(
        self,
        arch: str = "vgg16",
        weights: str | None = "IMAGENET1K_V1",
        num_classes: int = 10,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        channels_last: bool = False,
        compile: bool = False,
        fused_optimizer: bool = True,
        compile_mode: str = "default",
        nesterov: bool = False,
        label_smoothing: float = 0.0,
        schedule: str = "constant",
        warmup_epochs: float = 0.0,
        dropout: float | None = None,
        fold_classifier: bool = False,
        distill: float = 0.0,
        distill_temperature: float = 4.0,
        net: nn.Module | None = None,
        teacher: nn.Module | None = None,
    ):
        super().__init__()
        if lr <= 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        if schedule not in LR_SCHEDULES:
            raise ValueError(f"model.schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"model.label_smoothing must be in [0, 1), got {label_smoothing}")
        if warmup_epochs < 0:
            raise ValueError(f"model.warmup_epochs must be >= 0, got {warmup_epochs}")
        if nesterov and momentum <= 0:
            raise ValueError("model.nesterov=true needs model.momentum > 0")
        if not 0.0 <= distill <= 1.0:
            raise ValueError(f"prune.recover_distill must be in [0, 1], got {distill}")
        if distill_temperature <= 0:
            raise ValueError(f"prune.recover_temperature must be > 0, got {distill_temperature}")
        if distill > 0 and teacher is None:
            raise ValueError("distill > 0 needs a teacher network (the dense model)")
        if fold_classifier not in (True, False):  # "auto" is resolved (prunelab.resolve) before the model is built
            raise ValueError(f"model.fold_classifier must be true or false here, got {fold_classifier!r}")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"model.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
        # ``net`` wraps an existing network (e.g. a channel-pruned one) instead of building one.
        self.save_hyperparameters(ignore=["net", "teacher"])
        self.net = net if net is not None else build_classifier(arch, weights, num_classes, dropout)
        # The one reading of model.channels_last: the pipeline, the search and the timing ask
        # ``memory_format`` instead of re-reading the config or guessing from weight strides.
        self.memory_format = memory_format(channels_last)
        if channels_last:
            # NHWC weights: oneDNN (CPU, bf16 on AMX) and cuDNN tensor cores run their fastest kernels in it
            self.net = self.net.to(memory_format=torch.channels_last)
        # Kept out of the module tree so the state_dict holds one copy of the weights under plain
        # torchvision keys (a registered OptimizedModule would add "_orig_mod." copies). It wraps
        # self.net itself, so moves to a device and in-place weight edits (pruning) apply to both.
        object.__setattr__(self, "_compiled", torch.compile(self.net, mode=compile_mode) if compile else None)
        # A CUDA graph's outputs live in memory its next replay overwrites: each call marks a new step,
        # telling the graphs that the previous call's outputs (its loss summed, its metric updated) may go.
        self._graph_steps = bool(compile) and compile_mode in GRAPH_COMPILE_MODES
        # Label smoothing shapes the training loss only: validation and test report the plain loss,
        # comparable across recipes.
        self.criterion = nn.CrossEntropyLoss()
        self.train_criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        # validate_args=False: torchmetrics' input check counts torch.unique(target) on the host, a
        # GPU->CPU sync in every step that serialised a CUDA step behind Python. The labels come from
        # prunelab's own datamodules, and cross-entropy refuses a label outside num_classes anyway.
        self.train_acc, self.val_acc, self.test_acc = (
            MulticlassAccuracy(num_classes, average="micro", validate_args=False) for _ in range(3))
        # per stage: the epoch's summed loss (a device tensor, never read mid-epoch) and image count
        self._loss_sum: dict[str, torch.Tensor] = {}
        self._loss_count: dict[str, int] = {}
        # Outside the module tree (not trained, saved or moved by Lightning: on_fit_start moves it);
        # eval mode for good: its dropout off, its answers the dense model's.
        object.__setattr__(self, "_teacher", None if teacher is None or distill <= 0 else
                           teacher.eval().requires_grad_(False).to(memory_format=self.memory_format))
        # fold_for_training's block count while a fit holds the folded form (None: not folded), and
        # (folded Linear, its pool, block count) from the last epoch's unfold to the fit's end: a
        # checkpoint saved in between still holds the form its optimiser state belongs to, and a fit
        # that goes on after all (a stop refused for min_epochs) folds back to the very same parameter
        self._fold_copies: int | None = None
        self._folded: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=self.memory_format)
        # `is None`, not `or`: truth-testing an OptimizedModule calls len() on the wrapped net,
        # which raises for VGG/ResNet.
        if self._compiled is None or self._weights_device() not in (None, x.device):
            # Eager where the weights sit elsewhere than the batch (Lightning's teardown moves the module
            # to the CPU after fit): eager refuses with torch's device message, where the compiled call
            # (a CUDA batch, CPU weights; H200, torch 2.11) failed inside an Inductor kernel launch with
            # "CUDA driver error: invalid argument".
            return self.net(x)
        if self._graph_steps:
            torch.compiler.cudagraph_mark_step_begin()
        return self._compiled(x)

    def _weights_device(self) -> torch.device | None:
        w = next(self.net.parameters(), None)
        return None if w is None else w.device

    def _step(self, batch, stage: str, metric) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = (self.train_criterion if stage == "train" else self.criterion)(logits, y)
        if stage == "train" and self._teacher is not None:
            loss = self._distilled(loss, logits, x)
        # update, not forward: forward also computes this batch's accuracy, which nothing logs.
        metric.update(logits, y)
        # The epoch's mean loss is summed on the device and logged once at the epoch's end: each
        # self.log() call moves Lightning's stored result to the device through a generic walk of
        # its attributes, which cost a small model's step a third of its time on the 2-core CPU.
        n = int(y.shape[0])
        total = loss.detach().float() * n
        self._loss_sum[stage] = self._loss_sum.get(stage, 0) + total
        self._loss_count[stage] = self._loss_count.get(stage, 0) + n
        if stage == "train" and self._trainer is not None and self._trainer.progress_bar_callback is not None:
            # a bar refreshes every step (in its own on_train_batch_end, before the module's): log now
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def _distilled(self, hard: torch.Tensor, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The recovery loss with the teacher's soft targets mixed in (``distill`` of it)."""
        a, t = float(self.hparams.distill), float(self.hparams.distill_temperature)
        with torch.no_grad():
            soft = self._teacher(x.contiguous(memory_format=self.memory_format)).float()
        kl = nn.functional.kl_div(torch.log_softmax(logits.float() / t, dim=1), torch.log_softmax(soft / t, dim=1),
                                  reduction="batchmean", log_target=True)
        return (1.0 - a) * hard + a * t * t * kl

    def on_fit_start(self) -> None:
        if self._teacher is not None:
            self._teacher.to(self.device)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        trainer = self._trainer
        if trainer is None:
            return
        # Without a bar, the step loss only reaches the logger at its every-n-steps write, decided
        # after this hook (when callbacks may already have asked to stop): log it exactly then.
        if trainer.progress_bar_callback is None and getattr(trainer._logger_connector, "should_update_logs", True):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.log("train/loss_step", loss, on_step=True, on_epoch=False)
        # The epoch's values at its last batch: callbacks (a progress bar among them) read the
        # epoch's metrics in their on_train_epoch_end, which runs before the module's.
        if batch_idx + 1 >= trainer.num_training_batches:
            self._log_epoch("train", self.train_acc)

    def _log_epoch(self, stage: str, metric) -> None:
        """The epoch's mean loss and accuracy, logged once at its end (summed over DDP ranks).

        Under DDP every rank takes part in each collective and logs the same keys, also with no
        local steps (Lightning refuses an empty loader today; a rank that skipped a collective
        would pair the others' with its next one)."""
        total, count = self._loss_sum.pop(stage, None), self._loss_count.pop(stage, 0)
        distributed = self._trainer is not None and self._trainer.world_size > 1
        if total is None and not distributed:  # no step of this stage ran
            metric.reset()
            return
        device = total.device if total is not None else self.device
        both = torch.stack([total if total is not None else torch.zeros((), device=device),
                            torch.tensor(float(count), device=device)])
        if distributed:
            both = self._trainer.strategy.reduce(both, reduce_op="sum")
        with warnings.catch_warnings():  # no local update: torchmetrics warns, its gather still counts
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            accuracy = metric.compute()  # gathers the ranks' states under DDP
        metric.reset()
        if float(both[1]) > 0:  # images seen on all ranks together (one read per epoch)
            # sync_dist on values already global: equal on every rank; Lightning's epoch-level check is met
            # on_epoch explicitly: from on_train_batch_end Lightning's default would be a step value
            self.log(f"{stage}/loss", both[0] / both[1], on_step=False, on_epoch=True, prog_bar=stage != "test",
                     sync_dist=True)
            self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        self._step(batch, "test", self.test_acc)

    def on_train_epoch_start(self):
        self._restart("train", self.train_acc)
        self._fold_back()  # the epoch thought last was not (a stop refused until min_epochs)

    def on_validation_epoch_start(self):
        self._restart("val", self.val_acc)

    def on_test_epoch_start(self):
        self._restart("test", self.test_acc)

    def _restart(self, stage: str, metric) -> None:
        """A stage starts from nothing (an earlier epoch stopped by an exception leaves no residue)."""
        self._loss_sum.pop(stage, None)
        self._loss_count.pop(stage, None)
        metric.reset()

    def on_train_epoch_end(self):
        # still summed: the epoch stopped before its last batch (max_steps, a stop request); DDP
        # ranks stop at the same step, so they agree
        if "train" in self._loss_sum:
            self._log_epoch("train", self.train_acc)
        if self._trainer is not None and final_epoch(self._trainer):
            self._unfold()  # no step follows: the end-of-training hooks see torchvision's network

    def on_validation_epoch_end(self):
        self._log_epoch("val", self.val_acc)

    def on_test_epoch_end(self):
        self._log_epoch("test", self.test_acc)

    def setup(self, stage: str) -> None:
        # Before Lightning restores a checkpoint and before DDP wraps the module: both see the folded form.
        if stage == "fit" and self.hparams.get("fold_classifier") and self._fold_copies is None:
            self._fold_copies = fold_for_training(self.net)

    def on_train_end(self) -> None:
        self._unfold()  # a stop decided after the last epoch's hook (early stopping)

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            self._unfold()
            self._folded = None

    def _unfold(self) -> None:
        if self._fold_copies is not None:
            self._folded = (self.net.classifier[0], self.net.avgpool, self._fold_copies)  # a tuple: not registered
            unfold_after_training(self.net)
            self._fold_copies = None

    def _fold_back(self) -> None:
        if self._folded is not None:
            self.net.classifier[0], self.net.avgpool, self._fold_copies = self._folded
            self._folded = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._folded is not None:  # unfolded at the last epoch's end, saved after it
            checkpoint["state_dict"]["net.classifier.0.weight"] = self._folded[0].weight.detach()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint resumes only a fit in its own form: folded weights and their momentum do not
        load into the full network, nor the other way round."""
        key = "net.classifier.0.weight"
        saved = checkpoint.get("state_dict", {}).get(key)
        current = self.net.classifier[0].weight if hasattr(self.net, "classifier") else None
        if saved is None or current is None or saved.shape == current.shape:
            return
        was = "true" if saved.shape[1] < current.shape[1] else "false"
        raise ConfigError(f"the checkpoint was trained with model.fold_classifier={was} ({key} is {tuple(saved.shape)}, "
                          f"this run's {tuple(current.shape)}): set model.fold_classifier={was} to resume it")

    def param_groups(self) -> list[dict]:
        """The optimiser's parameter groups: one, or with the fold on, the folded ``classifier[0]``
        weight apart with its step scaled by the block count and its decay divided by it, which
        is SGD on the full weight, seen through the fold."""
        hp = self.hparams
        if self._fold_copies is None:
            return [{"params": list(self.parameters())}]
        folded = self.net.classifier[0].weight
        rest = [p for p in self.parameters() if p is not folded]
        k = self._fold_copies
        return [{"params": rest}, {"params": [folded], "lr": hp.lr * k, "weight_decay": hp.weight_decay / k}]

    def configure_optimizers(self):
        hp = self.hparams
        opt = make_sgd(self.param_groups(), hp.lr, hp.momentum, hp.weight_decay,
                       fused=hp.get("fused_optimizer", True), nesterov=hp.get("nesterov", False))
        schedule = hp.get("schedule", "constant")
        warmup = float(hp.get("warmup_epochs", 0.0))
        if schedule == "constant" and warmup == 0:
            return opt
        trainer = self.trainer
        total = int(trainer.estimated_stepping_batches)
        per_epoch = total / max(1, int(trainer.max_epochs or 1)) if trainer.max_epochs not in (None, -1) else total
        factor = lr_factor(schedule, total, int(round(warmup * per_epoch)))
        # stepped every optimiser step: the schedule's state is saved in checkpoints, so a resumed
        # fine-tune continues the same curve
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def make_sgd(params: list, lr: float, momentum: float, weight_decay: float, fused: bool = True,
             nesterov: bool = False) -> torch.optim.SGD:
    """SGD with the fused kernel when asked and supported, else the foreach (multi-tensor) path.
    ``params``: tensors, or parameter groups (dicts with ``params`` and their own settings)."""
    kwargs = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    # torch checks a fused optimiser's devices and dtypes only at its first step, so decide here:
    # the fused SGD kernel exists for floating-point tensors on CPU and CUDA.
    if fused and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in tensors):
        try:
            return torch.optim.SGD(params, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):  # a torch without ``fused`` for SGD
            pass
    return torch.optim.SGD(params, foreach=all(p.device.type in ("cpu", "cuda") for p in tensors) or None, **kwargs)
