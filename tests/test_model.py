"""The model: head replacement for any torchvision classifier, clear errors offline."""

import urllib.error

import pytest
import torch
from torch import nn

from prunelab.errors import ConfigError, WeightsUnavailableError
from prunelab.models import ImageClassifier, build_classifier


def test_vgg16_head_is_10_class_and_param_count_matches_notebook():
    net = build_classifier("vgg16", None, 10)
    assert isinstance(net.classifier[6], nn.Linear)
    assert (net.classifier[6].in_features, net.classifier[6].out_features) == (4096, 10)
    assert sum(p.numel() for p in net.parameters()) == 134_301_514


def test_resnet18_head_replaced():
    net = build_classifier("resnet18", None, 10)
    assert net.fc.out_features == 10
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_arch_and_weights_are_config_errors():
    with pytest.raises(ConfigError, match="model.arch"):
        build_classifier("not_a_net", None)
    with pytest.raises(ConfigError, match="model.weights"):
        build_classifier("vgg16", "IMAGENET9K")


def test_weights_unavailable_says_where_to_put_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torch.hub.urlopen", offline)
    with pytest.raises(WeightsUnavailableError) as exc:
        build_classifier("vgg16", "IMAGENET1K_V1")
    msg = str(exc.value)
    assert "vgg16-397923af.pth" in msg and "model.weights=null" in msg and str(tmp_path) in msg


def test_module_step_and_optimizer_settings():
    m = ImageClassifier("resnet18", None, lr=0.05, momentum=0.8, weight_decay=1e-3)
    opt = m.configure_optimizers()
    g = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD) and (g["lr"], g["momentum"], g["weight_decay"]) == (0.05, 0.8, 1e-3)
    assert not any(k.startswith("_compiled") for k in m.state_dict())


def _sgd_steps(fused: bool, channels_last: bool = False, steps: int = 3) -> list[torch.Tensor]:
    from prunelab.models.classifier import make_sgd

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = make_sgd(list(net.parameters()), lr=0.1, momentum=0.9, weight_decay=5e-3, fused=fused)
    assert bool(opt.defaults.get("fused")) == fused
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):  # several steps, so the momentum buffers take part
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_sgd_step_equals_unfused(channels_last):
    fused, plain = _sgd_steps(True, channels_last), _sgd_steps(False, channels_last)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_fused_optimizer_is_a_model_option():
    assert ImageClassifier("resnet18", None).configure_optimizers().defaults["fused"] is True
    off = ImageClassifier("resnet18", None, fused_optimizer=False).configure_optimizers()
    assert not off.defaults.get("fused") and off.defaults["foreach"]


def test_fused_sgd_is_not_asked_of_tensors_without_a_fused_kernel():
    from prunelab.models.classifier import make_sgd

    # torch would only complain at the first step; make_sgd must pick foreach up front
    opt = make_sgd([nn.Parameter(torch.zeros(3, dtype=torch.float64)), nn.Parameter(torch.zeros(2, device="meta"))],
                   lr=0.1, momentum=0.9, weight_decay=0.0, fused=True)
    assert not opt.defaults.get("fused")


def test_a_label_outside_the_classes_is_still_refused_without_the_metrics_input_check():
    # the accuracy metrics skip their (host-syncing) input check; cross-entropy still refuses
    module = ImageClassifier(arch="resnet18", weights=None, num_classes=10)
    assert not module.train_acc.validate_args
    with pytest.raises(IndexError, match="out of bounds"):
        module.training_step((torch.randn(2, 3, 32, 32), torch.tensor([3, 10])), 0)


def _tiny_fit(tmp_path, log_every_n_steps=2, batches=5, epochs=1, callbacks=()):
    """One epoch of a tiny classifier on uneven batches (last one smaller), validated, CSV-logged."""
    import csv

    from lightning import Callback, Trainer
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    n = 8 * batches - 3
    data = TensorDataset(torch.randn(n, 3, 8, 8), torch.randint(0, 4, (n,)))
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    module = ImageClassifier(net=net, num_classes=4, lr=0.1)

    class Losses(Callback):  # every training batch's loss and size, as the optimiser saw them
        seen: list = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append((float(outputs["loss"]), len(batch[1])))

    losses = Losses()
    losses.seen = []
    trainer = Trainer(max_epochs=epochs, accelerator="cpu", logger=CSVLogger(tmp_path), callbacks=[losses, *callbacks],
                      log_every_n_steps=log_every_n_steps, enable_progress_bar=False, enable_checkpointing=False,
                      enable_model_summary=False, num_sanity_val_steps=0)
    loader = DataLoader(data, batch_size=8)
    trainer.fit(module, loader, loader)
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    return module, trainer, losses.seen, data, rows


def test_epoch_loss_and_accuracy_are_the_epochs_image_weighted_means(tmp_path):
    module, trainer, seen, data, _ = _tiny_fit(tmp_path)
    m = trainer.callback_metrics
    want = sum(loss * k for loss, k in seen) / sum(k for _, k in seen)
    assert float(m["train/loss"]) == pytest.approx(want, rel=1e-5)
    with torch.no_grad():  # validation ran after the epoch's last step: the final weights
        x, y = data.tensors
        logits = module(x)
    assert float(m["val/acc"]) == pytest.approx(float((logits.argmax(1) == y).float().mean()), abs=1e-6)
    assert float(m["val/loss"]) == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-5)
    assert not module._loss_sum and not module._loss_count  # nothing carried into the next epoch


def test_step_loss_is_logged_at_the_loggers_steps_only(tmp_path):
    _, _, seen, _, rows = _tiny_fit(tmp_path, log_every_n_steps=2, batches=5)
    steps = {int(r["step"]): float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")}
    assert sorted(steps) == [1, 3]  # Lightning writes every 2nd step: (step + 1) % 2 == 0
    for step, value in steps.items():
        assert value == pytest.approx(seen[step][0], rel=1e-6)
    assert any(r.get("train/loss") for r in rows) and any(r.get("train/acc") for r in rows)


def test_callbacks_see_this_epochs_training_values_at_its_end(tmp_path):
    """A progress bar or any callback reads the epoch's metrics in its on_train_epoch_end, which runs
    before the module's: the values must already be this epoch's, not the last one's."""
    from lightning import Callback

    class Reader(Callback):
        got: list = []

        def on_train_epoch_end(self, trainer, pl_module):
            self.got.append(float(trainer.callback_metrics["train/loss"]))

    reader = Reader()
    reader.got = []
    _, _, seen, _, _ = _tiny_fit(tmp_path, batches=5, epochs=2, callbacks=[reader])
    per_epoch = [seen[:5], seen[5:]]
    want = [sum(v * k for v, k in e) / sum(k for _, k in e) for e in per_epoch]
    assert reader.got == pytest.approx(want, rel=1e-5)


def test_a_stop_mid_epoch_logs_that_steps_loss_and_the_partial_epoch(tmp_path):
    from lightning import Callback

    class StopAt(Callback):  # a stop request after step 2 (as a time limit would make it)
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 2:
                trainer.should_stop = True

    _, trainer, seen, _, rows = _tiny_fit(tmp_path, log_every_n_steps=50, batches=5, callbacks=[StopAt()])
    assert len(seen) == 3
    steps = {int(r["step"]): float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")}
    assert steps == pytest.approx({2: seen[2][0]}, rel=1e-6)  # the stop step's own loss, not an older one
    want = sum(v * k for v, k in seen) / sum(k for _, k in seen)
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(want, rel=1e-5)


def test_compile_mode_reaches_torch_compile_and_graph_modes_start_a_step_per_call(monkeypatch):
    """The mode is torch.compile's; the CUDA-graph modes mark a new step before every call (a
    replay overwrites the previous call's outputs), the others do not."""
    import prunelab.models.classifier as classifier

    seen, marks = [], []

    def fake_compile(net, mode=None, **kwargs):
        seen.append(mode)
        return net

    monkeypatch.setattr(classifier.torch, "compile", fake_compile)
    monkeypatch.setattr(classifier.torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    x = torch.randn(2, 3, 4, 4)
    for mode, marked in [("default", 0), ("reduce-overhead", 2), ("max-autotune", 2),
                         ("max-autotune-no-cudagraphs", 0)]:
        marks.clear()
        m = ImageClassifier(net=net, compile=True, compile_mode=mode)
        m(x), m(x)
        assert seen[-1] == mode and len(marks) == marked, mode
    marks.clear()
    ImageClassifier(net=net, compile=False, compile_mode="reduce-overhead")(x)
    assert not marks and len(seen) == 4  # no compile, no step marks
    with pytest.raises(ValueError, match="model.compile_mode must be one of default, reduce-overhead"):
        ImageClassifier(net=net, compile_mode="fast")


def test_a_compiled_module_runs_eager_when_its_weights_sit_on_another_device(monkeypatch):
    """Lightning's teardown moves the module to the CPU after fit. A compiled call with a CUDA batch and
    CPU weights failed inside an Inductor kernel launch ('CUDA driver error: invalid argument', H200);
    eager refuses with torch's own device message instead."""
    import prunelab.models.classifier as classifier

    calls = []

    def fake_compile(net, mode=None, **kwargs):
        return lambda x: calls.append(x.device) or net(x)

    monkeypatch.setattr(classifier.torch, "compile", fake_compile)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    m = ImageClassifier(net=net, compile=True)
    x = torch.randn(2, 3, 4, 4)
    assert m(x).shape == (2, 10) and calls == [torch.device("cpu")]
    m.net.to("meta")
    out = m(x.to("meta"))  # same device again: compiled
    assert out.device.type == "meta" and len(calls) == 2
    with pytest.raises(RuntimeError, match="device"):
        m(x)  # weights on meta, batch on the CPU: eager's refusal, not the compiled code
    assert len(calls) == 2
