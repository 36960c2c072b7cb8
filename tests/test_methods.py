"""Every pruning method through the same pipeline: channel, 2:4, iterative recovery, exports."""

import json
from pathlib import Path

import pytest
import torch

from conftest import FAST_LEARNER, compose_cfg
from prunelab import config_check
from prunelab.errors import ConfigError
from prunelab.io import load_state_dict
from prunelab.models.factory import build_classifier
from prunelab.pipeline import run
from prunelab.pruning.channel_files import load_channel_pruned
from prunelab.pruning.masks import prunable_weights
from prunelab.pruning.semi_structured import is_two_four
from prunelab.report.schema import validate

QUICK = FAST_LEARNER + ["latency.iters=3", "latency.warmup=1"]


def test_channel_fixed_ratio_is_smaller_faster_and_reloads(tmp_path):
    cfg = compose_cfg(tmp_path, QUICK + ["prune.method=channel", "prune.ratio=0.5"])
    report = run(cfg)
    p = report["pruned"]
    assert validate(json.loads((Path(cfg.paths.output_dir) / "report.json").read_text())) == []
    assert p["params"] < report["dense"]["params"] and p["macs"] < p["dense_macs"]
    assert p["speedup_p50"] > 0 and p["method"] == "channel"
    models = Path(cfg.paths.output_dir) / "models"
    net = load_channel_pruned(models)
    assert sum(q.numel() for q in net.parameters()) == p["params"]
    assert report["files"]["pruned_format"] == "channels+safetensors"
    assert report["files"]["pruned_bytes"] < report["files"]["dense_bytes"]


def test_channel_search_reports_params_and_macs_per_candidate(tmp_path):
    report = run(compose_cfg(tmp_path, QUICK + ["prune.method=channel", "search.grid=[0.3,0.6]", "search.full_curve=true",
                                               "search.refine_step=null", "stages.latency=false"]))
    curve = report["search"]["curve"]
    assert [c["ratio"] for c in curve] == [0.3, 0.6]
    assert all("params" in c and "macs" in c for c in curve)
    assert curve[0]["macs"] > curve[1]["macs"] and curve[0]["params"] > curve[1]["params"]


def test_semi_structured_is_two_four_and_says_no_sparse_kernel_on_cpu(tmp_path):
    cfg = compose_cfg(tmp_path, QUICK + ["prune.method=semi_structured", "prune.ratio=0.5"])
    report = run(cfg)
    p = report["pruned"]
    assert p["two_four_layers"]
    state = load_state_dict(Path(cfg.paths.output_dir) / "models" / "pruned.pt")
    for name in p["two_four_layers"]:
        assert is_two_four(state[f"{name}.weight"]), name
    if not torch.cuda.is_available():
        assert "masked-dense" in p["kernels"] and "no CUDA device" in p["kernels"]
        assert any("masked-dense" in n for n in report["notes"])


@pytest.mark.parametrize("method", ["magnitude", "channel"])
def test_iterative_schedule_recovers_and_keeps_zeros(tmp_path, method):
    cfg = compose_cfg(tmp_path, QUICK + [f"prune.method={method}", "prune.ratio=0.8", "prune.schedule=iterative",
                                         "prune.steps=2", "prune.recover_epochs=1", "stages.latency=false"])
    report = run(cfg)
    steps = report["schedule"]
    assert [s["ratio"] for s in steps] == [0.4, 0.8]
    assert all("recovered_val_acc" in s for s in steps)
    if method == "magnitude":
        state = load_state_dict(Path(cfg.paths.output_dir) / "models" / "pruned.pt")
        net = build_classifier("resnet18", None, 10)
        names = [f"{n}.weight" for n in prunable_weights(net)]
        zeros = sum(int((state[k] == 0).sum()) for k in names) / sum(state[k].numel() for k in names)
        assert zeros >= 0.8 - 1e-6  # recovery epochs revived no pruned weight
        assert zeros == pytest.approx(report["pruned"]["sparsity"])
    else:
        assert report["pruned"]["params"] < report["dense"]["params"]


@pytest.mark.parametrize("override, key", [
    ("prune.schedule=sometimes", "prune.schedule"),
    ("prune.steps=0", "prune.steps"),
    ("prune.importance=l3", "prune.importance"),
    ("prune.min_channels=0", "prune.min_channels"),
    ("prune.round_to=0", "prune.round_to"),
    ("prune.round_to=2.5", "prune.round_to"),
])
def test_bad_method_options(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_check.check(compose_cfg(tmp_path, ["+experiment=smoke", override]))


def test_recovery_trains_the_pruned_net_and_keeps_masked_weights_zero(tmp_path):
    from prunelab.data import SyntheticDataModule
    from prunelab.prune_stage import recover_fn
    from prunelab.pruning.magnitude import MagnitudePruner

    cfg = compose_cfg(tmp_path, QUICK + ["prune.recover_epochs=1", "trainer.limit_train_batches=3",
                                         "model.weight_decay=0.05"])
    dm = SyntheticDataModule(train_size=200, test_size=20, batch_size=16, num_workers=0)
    dm.setup()
    net = build_classifier("resnet18", None, 10)
    pruner = MagnitudePruner(net, "global")
    pruner.finish(0.7)
    masks = pruner.keep_masks()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    recovered = recover_fn(cfg, dm, torch.device("cpu"))(net, masks)
    after = recovered.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    for name, w in prunable_weights(recovered).items():
        assert torch.all(w[~masks[name]] == 0), name  # momentum and weight decay revived nothing


def test_recovery_runs_the_models_recipe_down_a_cosine_to_zero(tmp_path):
    """Label smoothing and Nesterov come from the model; the lr falls from recover_lr towards zero
    (a half cosine over the recovery's steps), not held constant."""
    from lightning import Callback

    from prunelab.data import SyntheticDataModule
    from prunelab.prune_stage import recover_fn, recovery_module
    from prunelab.pruning.spec import prune_spec

    class Lrs(Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    cfg = compose_cfg(tmp_path, QUICK + ["prune.recover_epochs=1", "trainer.limit_train_batches=4", "model.lr=0.04",
                                         "prune.recover_lr=0.01", "model.label_smoothing=0.2", "model.nesterov=true"])
    p = prune_spec(cfg)
    module = recovery_module(cfg, build_classifier("resnet18", None, 10), p)
    assert module.train_criterion.label_smoothing == pytest.approx(0.2)
    assert module.hparams.nesterov and module.hparams.schedule == "cosine"
    dm = SyntheticDataModule(train_size=200, test_size=20, batch_size=16, num_workers=0)
    dm.setup()
    lrs = Lrs()
    recover_fn(cfg, dm, torch.device("cpu"), p, callbacks=[lrs])(build_classifier("resnet18", None, 10), None)
    # 4 steps of a half cosine from 0.01: factors 1, (1+cos(pi/4))/2, 1/2, (1+cos(3pi/4))/2
    assert lrs.seen == pytest.approx([0.01, 0.01 * 0.8535534, 0.005, 0.01 * 0.1464466])


@pytest.mark.parametrize("epochs, configured, expected", [
    (1, None, None), (2, 3, 3), (0.25, None, 0.25), (0.25, 1.0, 0.25), (0.5, 0.5, 0.25), (0.5, 10, 5), (0.01, 3, 1)])
def test_a_fraction_of_a_recovery_epoch_is_that_share_of_the_training_batches(epochs, configured, expected):
    from prunelab.prune_stage import recovery_batches

    assert recovery_batches(epochs, configured) == expected


def batch_count():
    """A callback counting the training batches a fit runs."""
    from lightning import Callback

    class Count(Callback):
        n = 0

        def on_train_batch_start(self, *args):
            self.n += 1

    return Count()


def test_fractional_recovery_trains_on_that_share(tmp_path):
    from prunelab.data import SyntheticDataModule
    from prunelab.prune_stage import recover_fn
    from prunelab.pruning.spec import prune_spec

    cfg = compose_cfg(tmp_path, QUICK + ["prune.recover_epochs=0.25"])
    dm = SyntheticDataModule(train_size=256, test_size=20, batch_size=16, num_workers=0)
    dm.setup()
    steps = batch_count()
    recover_fn(cfg, dm, torch.device("cpu"), prune_spec(cfg), callbacks=[steps])(build_classifier("resnet18", None, 10),
                                                                                 None)
    assert steps.n == 3  # a quarter of the 12 batches the quick trainer allows (16 in the data)


def test_each_recovery_step_trains_its_own_share(tmp_path):
    from prunelab.data import SyntheticDataModule
    from prunelab.prune_stage import recover_fn
    from prunelab.pruning.spec import prune_spec

    cfg = compose_cfg(tmp_path, QUICK + ["prune.recover_epochs=[0,0.25,1]"])
    dm = SyntheticDataModule(train_size=256, test_size=20, batch_size=16, num_workers=0)
    dm.setup()
    recover = recover_fn(cfg, dm, torch.device("cpu"), prune_spec(cfg), callbacks=[steps := batch_count()])
    trained = []
    for step in range(4):  # the fourth step takes the list's last budget
        steps.n = 0
        recover(build_classifier("resnet18", None, 10), None, step)
        trained.append(steps.n)
    assert trained == [0, 3, 12, 12]  # none, a quarter of the quick trainer's 12 batches, then whole epochs


@pytest.mark.parametrize("method, scope", [("magnitude", "global"), ("magnitude", "layerwise"), ("semi_structured", "global"),
                                           ("channel", "global"), ("channel+semi_structured", "global"),
                                           ("magnitude+semi_structured", "global")])
def test_no_method_empties_the_head_at_099(method, scope):
    from torch import nn

    from prunelab.pruning.registry import make_pruner

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        net[8].weight.mul_(1e-3)  # the smallest weights of all: a global magnitude cut takes them first
    pruned = make_pruner(method, net, scope=scope).finish(0.99)
    head = [m for m in pruned.modules() if isinstance(m, nn.Linear)][-1]
    assert head.out_features == 10
    assert bool((head.weight != 0).any(1).all()), "a class row of the head was emptied"
    out = pruned.eval()(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10)
