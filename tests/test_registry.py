"""Adding a pruning method is one module plus one registry line: a toy method registered here
runs through the config check and the one-shot search like the built-in ones."""

from __future__ import annotations

import inspect

import pytest
import torch
from omegaconf import OmegaConf
from test_channel import tiny_vgg
from torch import nn
from torch.utils.data import TensorDataset

from conftest import CONF_DIR, compose_cfg
from prunelab import config_check
from prunelab.pruning import registry
from prunelab.pruning.channel import ChannelPruner
from prunelab.pruning.masks import prunable_weights, sparsity
from prunelab.search.oneshot import OneShotSearch


class FirstWeightsPruner:
    """Zeroes the first ``ratio`` of every layer's weights (by position: easy to check exactly)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.original = {n: w.detach().clone() for n, w in prunable_weights(model).items()}

    def prepare(self, ratios) -> None:
        pass

    def apply(self, ratio: float) -> nn.Module:
        with torch.no_grad():
            for name, w in prunable_weights(self.model).items():
                w.copy_(self.original[name])
                w.view(-1)[: int(ratio * w.numel())] = 0
        return self.model

    def stats(self) -> dict:
        return sparsity(prunable_weights(self.model))

    def keep_masks(self):
        return {n: w != 0 for n, w in prunable_weights(self.model).items()}

    def finish(self, ratio: float) -> nn.Module:
        return self.apply(ratio)


@pytest.fixture
def toy_method():
    registry.register("first_weights", lambda model, **_: FirstWeightsPruner(model))
    yield "first_weights"
    registry.METHODS.pop("first_weights")


def test_a_registered_method_runs_through_the_search(toy_method):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g))
    model = tiny_vgg()
    search = OneShotSearch(tolerance=100.0, grid=[0.25, 0.5], refine_step=None, method=toy_method, fast_eval=False)
    result = search.run(model, data, torch.device("cpu"))
    assert [e.ratio for e in result.curve] == [0.25, 0.5]
    assert result.best_ratio == 0.5  # a tolerance of 100 points passes everything
    first = model.features[0].weight.view(-1)
    n = first.numel()
    assert torch.count_nonzero(first[: n // 2]) == 0 and torch.count_nonzero(first[n // 2:]) > 0


def test_the_config_check_accepts_registered_methods_only(tmp_path, toy_method):
    config_check.check(compose_cfg(tmp_path, ["+experiment=smoke", f"prune.method={toy_method}"]))
    with pytest.raises(Exception, match="prune.method"):
        config_check.check(compose_cfg(tmp_path, ["+experiment=smoke", "prune.method=no_such_method"]))


def test_code_defaults_are_the_configs():
    """One source of truth: what the code assumes when a caller passes nothing is what the config says."""
    conf = OmegaConf.load(CONF_DIR / "prune" / "options" / "channel.yaml")
    for fn in (registry._channel, ChannelPruner.__init__):
        params = inspect.signature(fn).parameters
        for key in ("importance", "normalize", "min_channels", "round_to", "linears"):
            assert params[key].default == conf[key], (fn.__qualname__, key)


def test_each_method_s_options_are_its_entry_s_and_its_option_file_s():
    """A method's own options: checked by its registry entry, defaulted by conf/prune/options/<method>.yaml,
    and in no other prune option file."""
    for name, entry in registry.METHODS.items():
        path = CONF_DIR / "prune" / "options" / f"{name}.yaml"
        if not entry.options:
            assert not path.exists(), name
            continue
        assert set(OmegaConf.load(path)) == set(entry.options), name
    for path in (CONF_DIR / "prune").glob("*.yaml"):
        assert not set(OmegaConf.load(path)) & set(registry.METHODS["channel"].options), path.name


@pytest.mark.parametrize("group", ["magnitude", "channel", "semi_structured"])
def test_every_prune_option_carries_the_channel_options(tmp_path, group):
    """A search across methods prunes channels whatever prune.method is: prune.round_to works with any."""
    from prunelab.pruning.spec import prune_spec

    spec = prune_spec(compose_cfg(tmp_path, [f"prune={group}", "prune.round_to=8"]))
    assert spec.method == group and spec.options["round_to"] == 8
    assert spec.pruner_options() == {"scope": "global", "importance": "l1", "normalize": "mean", "min_channels": 1,
                                     "round_to": 8, "calibration_batches": 8, "linears": False}


def test_what_the_pipeline_search_and_deploy_read_off_the_entries():
    from prunelab.deploy.timing import _beyond_noise

    assert not registry.speeds_up("magnitude", "cuda") and registry.dense_kernels("magnitude")
    assert registry.speeds_up("semi_structured", "cuda") and not registry.speeds_up("semi_structured", "cpu")
    # a chain is read from its links: channels removed speed it up anywhere, its 2:4 layers are built as 2:4
    assert registry.speeds_up("channel+semi_structured", "cpu") and registry.two_four("channel+semi_structured")
    assert not registry.dense_kernels("channel+semi_structured") and not registry.two_four("channel")
    assert not registry.in_place("channel+semi_structured") and registry.in_place("magnitude+semi_structured")
    assert _beyond_noise("magnitude", {"p5": 2.0}) is False and _beyond_noise("channel", {"p5": 2.0}) is True


def test_a_registered_method_s_entry_is_what_the_rest_reads(toy_method):
    """Registered without saying its kernels, a method is timed and judged like a structured one; an
    entry that says it runs the dense kernels is never credited a speedup, by search or timing."""
    from prunelab.deploy.timing import _beyond_noise

    assert registry.speeds_up(toy_method, "cpu") and _beyond_noise(toy_method, {"p5": 1.5})
    registry.register(toy_method, lambda model, **_: FirstWeightsPruner(model), kernels="dense")
    assert not registry.speeds_up(toy_method, "cuda") and not _beyond_noise(toy_method, {"p5": 1.5})
    with pytest.raises(ValueError, match="kernels"):
        registry.register("bad", lambda model, **_: None, kernels="fast")


def test_channel_s_compact_form_is_saved_and_found_by_its_entry(tmp_path):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.get_model("vgg11", num_classes=10).eval()
    pruned = registry.make_pruner("channel", net, round_to=1).finish(0.9)
    files = registry.save_pruned("channel", pruned, tmp_path, "vgg11", 10)
    assert files["pruned_format"] == "channels+safetensors" and files["pruned_bytes"] > 0
    loaded = registry.load_pruned(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded.eval()(x), pruned.eval()(x), atol=1e-5)
    assert registry.save_pruned("magnitude", net, tmp_path / "m", "vgg11", 10) is None  # a state_dict, by the caller
    assert registry.load_pruned(tmp_path / "m") is None
    stats = registry.stats("channel", pruned, net)
    assert stats["channels_removed"] > 0 and stats["macs"] < stats["dense_macs"]
