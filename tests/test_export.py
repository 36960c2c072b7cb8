"""ONNX export and check, pool folding, sparse-packed sizes and the export CLI."""

import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torchvision
from test_channel import tiny_vgg
from torch import nn

from prunelab.export import check_onnx, export_onnx, main
from prunelab.io import compressed_bytes, file_bytes, pack_sparse, save_state_dict, unpack_sparse, write_text
from prunelab.models.factory import build_classifier, build_from_state_dict
from prunelab.models.rewrite import ReplicatingAdaptiveAvgPool2d, fold_pool, folded_view, replicating_pools
from prunelab.pruning.channel import channel_plan, prune_channels
from prunelab.pruning.channel_files import load_channel_pruned, save_channel_pruned
from prunelab.pruning.masks import magnitude_masks, prunable_weights

X = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def cli(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "prunelab.export", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_fold_pool_matches_and_shrinks(batch_norm):
    model = tiny_vgg(batch_norm)
    folded = fold_pool(model)
    assert isinstance(folded.avgpool, nn.Identity) and folded.classifier[0].in_features == 32
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d) and model.classifier[0].in_features == 32 * 49
    with torch.no_grad():
        assert torch.allclose(folded(X), model(X), atol=1e-5)
    assert sum(p.numel() for p in folded.parameters()) == \
        sum(p.numel() for p in model.parameters()) - 32 * 48 * 64


def test_replicating_pool_is_the_same_function_and_gradient():
    model = tiny_vgg().eval()
    fast = replicating_pools(copy.deepcopy(model))
    assert type(fast.avgpool) is ReplicatingAdaptiveAvgPool2d and fast.avgpool.output_size == model.avgpool.output_size
    x = X.clone().requires_grad_(True)
    x2 = X.clone().requires_grad_(True)
    want, got = model(x), fast(x2)
    assert torch.equal(got, want)  # a 1x1 map: every pooled cell is that one value, in any dtype
    want.square().sum().backward()
    got.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), fast.parameters(), strict=True):
        assert torch.allclose(q.grad, p.grad, rtol=1e-5, atol=1e-7), name
    assert torch.allclose(x2.grad, x.grad, rtol=1e-5, atol=1e-7)
    big = torch.randn(2, 3, 64, 64)  # a 2x2 map: the ordinary pool
    with torch.no_grad():
        assert torch.equal(fast(big), model(big))
    assert torch.equal(fast.bfloat16()(X.bfloat16()), model.bfloat16()(X.bfloat16()))


@pytest.mark.parametrize("size", [7, (7, 7), [7, 7], (None, 7), (3, 5), 1])
def test_replicating_pool_is_the_pool_for_every_output_size_and_rank(size):
    plain, fast = nn.AdaptiveAvgPool2d(size), ReplicatingAdaptiveAvgPool2d(size)
    for x in (torch.randn(2, 8, 1, 1), torch.randn(8, 1, 1), torch.randn(2, 8, 3, 3)):
        out = fast(x)
        assert torch.equal(out, plain(x)) and out.is_contiguous()
        assert out.data_ptr() != x.data_ptr()  # a new tensor, as the pool's: writing to it leaves x alone
    bad = torch.randn(8, 1)  # a rank the pool refuses is refused alike, not expanded
    try:
        want = plain(bad)
    except (RuntimeError, ValueError):
        with pytest.raises((RuntimeError, ValueError)):
            fast(bad)
    else:
        assert torch.equal(fast(bad), want)


@pytest.mark.gpu
def test_replicating_pool_backward_is_deterministic_on_cuda():
    # CUDA's adaptive-pool backward scatters with atomics (flagged by use_deterministic_algorithms);
    # the replicating pool's backward is a sum. The plain pool shows the check can fail.
    def alerts(net):
        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                net(X.cuda()).square().sum().backward()
        finally:
            torch.use_deterministic_algorithms(before)
        return [w for w in caught if "adaptive_avg_pool2d" in str(w.message)]

    assert alerts(tiny_vgg().cuda())
    assert not alerts(replicating_pools(tiny_vgg()).cuda())


def test_built_and_loaded_models_get_the_replicating_pool_and_prune_alike(tmp_path):
    net = build_classifier("vgg11", None, 10)
    assert type(net.avgpool) is ReplicatingAdaptiveAvgPool2d
    assert type(build_from_state_dict("vgg11", net.state_dict()).avgpool) is ReplicatingAdaptiveAvgPool2d
    # channel surgery traces the network: the replicating pool maps channels to classifier[0] alike
    plain, fast = tiny_vgg().eval(), replicating_pools(tiny_vgg().eval())
    plan = {"features.9": [1, 4], "features.12": [0, 3, 5, 6, 7, 20]}  # the last conv feeds classifier[0]
    a, b = prune_channels(plain, plan, X[:1]), prune_channels(fast, plan, X[:1])
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    assert b.features[12].out_channels == 26 and b.classifier[0].in_features == 26 * 49
    with torch.no_grad():
        assert torch.equal(b(X), a(X))
    small = prune_channels(net.eval(), channel_plan(net, 0.25, normalize="none", round_to=1), X[:1])
    save_channel_pruned(small, tmp_path / "ch", "vgg11", 10)
    loaded = load_channel_pruned(tmp_path / "ch")
    assert type(loaded.avgpool) is ReplicatingAdaptiveAvgPool2d
    with torch.no_grad():
        assert torch.equal(loaded(X), small(X))


def test_fold_pool_on_channel_pruned_and_refusals():
    model = tiny_vgg()
    pruned = prune_channels(model, channel_plan(model, 0.5, normalize="none", round_to=1), X[:1])
    folded = fold_pool(pruned)
    assert folded.classifier[0].in_features == pruned.features[12].out_channels
    with torch.no_grad():
        assert torch.allclose(folded(X), pruned(X), atol=1e-5)
    with pytest.raises(ValueError, match="32x2x2"):
        fold_pool(model, (64, 64))
    with pytest.raises(ValueError, match="AdaptiveAvgPool2d"):
        fold_pool(folded)


def test_folded_view_shares_weights_and_follows_masking():
    model = tiny_vgg(True)
    view = folded_view(model)
    assert view[0] is model.features and view[-1] is model.classifier[-1]  # shared, not copied
    with torch.no_grad():
        assert torch.allclose(view(X), model(X), atol=1e-5)
        # a candidate masks the model in place; a view built afterwards computes the masked model
        masks = magnitude_masks(prunable_weights(model), 0.6)
        for name, w in prunable_weights(model).items():
            w.mul_(masks[name])
        assert not torch.allclose(view(X), model(X), atol=1e-3)  # the old view's fold is stale
        assert torch.allclose(folded_view(model)(X), model(X), atol=1e-5)
    with pytest.raises(ValueError, match="32x2x2"):
        folded_view(model, (64, 64))


@pytest.mark.parametrize("method,grid", [("magnitude", [0.3, 0.6, 0.9]), ("channel", [0.2, 0.5]),
                                         ("semi_structured", [0.2, 0.4])])
def test_search_with_and_without_the_fast_evaluation_agree(method, grid):
    from torch.utils.data import TensorDataset

    from prunelab.callbacks import RatioSearch

    g = torch.Generator().manual_seed(4)
    data = TensorDataset(torch.randn(96, 3, 32, 32, generator=g), torch.randint(0, 10, (96,), generator=g))
    results = {}
    for fold in (True, False):
        model = tiny_vgg()
        s = RatioSearch(tolerance=2.0, grid=grid, refine_step=None, full_curve=True, fast_eval=fold, method=method)
        r = s.run(model, data, torch.device("cpu"))
        results[fold] = [(e.ratio, e.correct, e.seen, e.nonzero) for e in r.curve]
        # the chosen model comes back NCHW like the model that went in, whatever was evaluated
        assert all(p.is_contiguous() for p in s.model.parameters())
        # the model comes back in the layout it came in
        assert model.features[0].weight.is_contiguous()
        assert isinstance(s._view(model, (32, 32))[0](model), nn.Sequential) == fold
    assert results[True] == results[False] and len(results[True]) == len(grid)


def test_onnx_round_trip_with_dynamic_batch(tmp_path):
    model = fold_pool(tiny_vgg(True))
    path = export_onnx(model, tmp_path / "m.onnx", batch=1)
    assert path.is_file() and not list(tmp_path.glob("*.tmp"))
    assert check_onnx(model, path, X) < 1e-4  # batch 5 through a model exported at batch 1
    plain = tiny_vgg()
    assert check_onnx(plain, export_onnx(plain, tmp_path / "p.onnx", batch=2), X) < 1e-4


def test_packed_sizes_and_round_trip():
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10), nn.BatchNorm1d(10))
    weights = prunable_weights(model)
    masks = magnitude_masks(weights, 0.9)
    with torch.no_grad():
        for n, w in weights.items():
            w.mul_(masks[n])
    sd = model.state_dict()
    dense, packed = file_bytes(sd), compressed_bytes(sd)
    assert packed < 0.25 * dense
    back = unpack_sparse(pack_sparse(sd))
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    dense_sd = nn.Linear(64, 64).state_dict()
    assert compressed_bytes(dense_sd) <= file_bytes(dense_sd) + 200  # dense tensors are not bloated


def test_cli_rejects_an_empty_run_dir(tmp_path):
    proc = cli(tmp_path)
    assert proc.returncode != 0
    assert "models/dense.pt" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_refuses_fold_pool_for_a_non_vgg(tmp_path, capsys):
    # resnet18 keeps this fast; the arch comes from the run's Hydra config
    write_text(tmp_path / ".hydra" / "config.yaml", "model:\n  arch: resnet18\n")
    net = torchvision.models.resnet18(num_classes=10)
    save_state_dict(tmp_path / "models" / "dense.pt", net.state_dict())
    save_state_dict(tmp_path / "models" / "pruned.pt", net.state_dict())
    assert main([str(tmp_path), "--fold-pool"]) == 2  # bad input: exit 2, like the train command
    err = capsys.readouterr().err
    assert "--fold-pool refused" in err and "features" in err
    assert not (tmp_path / "export").exists()


def _vgg16_run(tmp_path, channel: bool):
    torch.manual_seed(0)
    net = torchvision.models.vgg16(num_classes=10).eval()
    save_state_dict(tmp_path / "models" / "dense.pt", net.state_dict())
    if channel:
        x = torch.randn(1, 3, 32, 32)
        save_channel_pruned(prune_channels(net, channel_plan(net, 0.5, example_input=x, normalize="none", round_to=1), x), tmp_path / "models")
    else:
        weights = prunable_weights(net)
        masks = magnitude_masks(weights, 0.9)
        with torch.no_grad():
            for n, w in weights.items():
                w.mul_(masks[n])
        save_state_dict(tmp_path / "models" / "pruned.pt", net.state_dict())
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("channel", [False, True])
def test_cli_exports_real_vgg16(tmp_path, channel):
    run = _vgg16_run(tmp_path, channel)
    proc = cli(run, "--fold-pool", "--batch", "4")
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in (run / "export").iterdir())
    assert names == ["dense.onnx", "dense_folded.onnx", "pruned.onnx", "pruned_folded.onnx"]
    assert proc.stdout.count("max |onnxruntime - torch|") == 4
    assert (run / "export" / "dense_folded.onnx").stat().st_size < 0.3 * (run / "export" / "dense.onnx").stat().st_size
    proc = cli(run, "--batch", "0")
    assert proc.returncode != 0 and "--batch" in proc.stderr


def test_cli_refuses_an_opset_below_the_exporters_in_one_line(tmp_path, capsys):
    from prunelab.export import main

    assert main([str(tmp_path), "--opset", "7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--opset 7" in err[0] and "--opset 18" in err[0]
    assert not (tmp_path / "export").exists()
