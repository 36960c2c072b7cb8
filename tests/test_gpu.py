"""The pipeline on CUDA: every method, both latency runtimes, fp32 and bf16 training, and the
deploy form's predictions checked (skipped without a CUDA device; `make gpu-check` runs them)."""

from __future__ import annotations

import pytest
import torch

from conftest import compose_cfg
from prunelab.pipeline import run

pytestmark = pytest.mark.gpu

# Without the experiment and model: each test names its own (+experiment=x twice is refused by Hydra).
BASE = ["trainer.accelerator=gpu", "data.train_size=640", "trainer.max_epochs=1", "trainer.limit_train_batches=4",
        "latency.iters=5", "latency.warmup=2"]
SMALL = ["+experiment=smoke", "model=resnet18", *BASE]
# VGG16 (random init) for 2:4: ResNet-18's only Linear is the head, which is never made 2:4.
SMALL_VGG = ["+experiment=smoke", "model=vgg16", "model.weights=null", *BASE]


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("runtime", ["eager", "deploy"])
@pytest.mark.parametrize("method", ["magnitude", "channel", "semi_structured"])
def test_pipeline_on_cuda(tmp_path, method, runtime, precision):
    if precision.startswith("bf16") and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 needs sm80+")
    if precision == "16-mixed" and method != "semi_structured":
        pytest.skip("fp16 training is checked with 2:4 alone (the issue's every-precision case), to keep the run short")
    small = SMALL_VGG if method == "semi_structured" else SMALL
    report = run(compose_cfg(tmp_path, [*small, f"prune.method={method}", "prune.ratio=0.5",
                                        f"latency.runtime={runtime}", f"trainer.precision={precision}"]))
    assert report["device"]["type"] == "cuda"
    lat = report["latency"]
    assert lat["runtime"]["runtime"] == runtime and lat["runtime"]["device_kind"] == "cuda"
    # dense and pruned were timed in turns, in the same runtime
    assert report["dense"]["latency_ms"]["interleaved_with"] == ["pruned"]
    if runtime == "deploy":  # flips beyond bf16/fp16 rounding, as the pipeline's own check counts them
        assert all(a["agreement_beyond_rounding"] >= 0.99 for a in lat["agreement"].values())
    if method == "semi_structured" and torch.cuda.get_device_capability() >= (8, 0) and runtime == "deploy":
        kernels = lat.get("kernels") or ""
        if "16" in str(lat["runtime"]["dtype"]):  # VGG16's classifier.3 (4096x4096) on the sparse kernels
            assert "2:4 kernels in" in kernels and "classifier.3" in kernels, kernels
        else:
            assert "take only float16/bfloat16" in kernels, kernels


def test_fast_experiment_resolves_bf16_and_compiles_on_cuda(tmp_path):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 needs sm80+")
    report = run(compose_cfg(tmp_path, ["+experiment=[smoke,fast]", "model=resnet18", *BASE, "stages.prune=false"]))
    resolved = report["resolved"]
    assert resolved["trainer.precision"]["value"] == "bf16-mixed"
    assert resolved["model.compile"]["value"] is True and resolved["model.channels_last"]["value"] is True


def test_latency_objective_on_cuda(tmp_path):
    report = run(compose_cfg(tmp_path, [*SMALL, "search.objective=latency", "search.walk_all=true"]))
    s = report["search"]
    assert s["objective"] == "latency" and s["candidates"]
    assert all(c.get("p50_ms") is not None for c in s["candidates"] if c["passed"])


def test_a_training_step_never_waits_for_the_host():
    """One host sync per step (torchmetrics' label check counted torch.unique on the host) makes the
    CPU wait for the GPU every step, so Python's per-step overhead and the GPU's work add up instead
    of overlapping."""
    from prunelab.models import ImageClassifier

    module = ImageClassifier(arch="resnet18", weights=None).cuda()
    x, y = torch.randn(8, 3, 32, 32, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    module.training_step((x, y), 0).backward()  # first call: allocations and library plans
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        module.training_step((x, y), 1).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("compile_mode", ["default", "reduce-overhead"])
def test_compiled_training_on_cuda_matches_the_eager_network(tmp_path, compile_mode):
    """model.compile_mode on CUDA: whole epochs (a partial last batch, validation in eval mode, a
    second epoch reusing the first's graphs) train, and the compiled network's answers equal the
    eager network's on the same weights. reduce-overhead replays CUDA graphs, whose outputs the next
    replay overwrites: a step that kept a previous step's tensor would fail or read garbage here."""
    from lightning import Trainer
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from prunelab.models import ImageClassifier

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    module = ImageClassifier(net=net, num_classes=10, lr=0.05, compile=True, compile_mode=compile_mode)
    x, y = torch.randn(200, 3, 16, 16), torch.randint(0, 10, (200,))
    train = DataLoader(TensorDataset(x[:168], y[:168]), batch_size=32)  # 5 batches of 32 and one of 8
    val = DataLoader(TensorDataset(x[168:], y[168:]), batch_size=32)
    trainer = Trainer(accelerator="gpu", devices=1, max_epochs=2, precision="32-true", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path)
    before = [p.detach().clone() for p in net.parameters()]
    trainer.fit(module, train, val)
    assert trainer.current_epoch == 2 and trainer.global_step == 12
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in trainer.callback_metrics.values())
    assert any(not torch.equal(a, b.cpu()) for a, b in zip(before, module.net.parameters(), strict=True))
    module.cuda().eval()  # Lightning's teardown moved the module to the CPU after fit
    xb = x[:32].cuda()
    with torch.no_grad():
        compiled = module(xb).clone()  # clone: the graph's output buffer is reused by the next replay
        eager = module.net(xb)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)
