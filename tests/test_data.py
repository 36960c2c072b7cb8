"""The split, the transforms and the data sources behave as the notebook's specification says."""

import urllib.error

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import random_split
from torchvision import transforms as T

from conftest import SUBSET, compose_cfg
from prunelab.data import CIFAR10DataModule, SyntheticDataModule
from prunelab.data.arrays import split_indices
from prunelab.data.transforms import eval_transform, train_transform
from prunelab.errors import ConfigError, DataUnavailableError


def test_split_equals_notebook_random_split_for_seed_42():
    expected = random_split(range(50000), [40000, 10000], generator=torch.Generator().manual_seed(42))
    train, val = split_indices(50000, 0.2, 42)
    assert train == list(expected[0].indices) and val == list(expected[1].indices)
    assert len(set(train) | set(val)) == 50000


def test_split_is_deterministic_and_seed_dependent():
    assert split_indices(1000, 0.2, 7) == split_indices(1000, 0.2, 7)
    assert split_indices(1000, 0.2, 7)[1] != split_indices(1000, 0.2, 8)[1]


def _notebook_transforms():
    train = T.Compose([T.RandomHorizontalFlip(), T.RandomCrop(32, padding=4), T.ToTensor(),
                       T.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))])
    test = T.Compose([T.ToTensor(), T.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))])
    return train, test


def test_transforms_equal_notebook_on_a_fixed_image():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    nb_train, nb_test = _notebook_transforms()
    for seed in range(5):
        torch.manual_seed(seed)
        ours = train_transform()(img)
        torch.manual_seed(seed)
        theirs = nb_train(img)
        assert torch.equal(ours, theirs)
    assert torch.equal(eval_transform()(img), nb_test(img))


def test_crop_pads_with_zeros_before_normalising():
    img = Image.fromarray(np.full((32, 32, 3), 255, dtype=np.uint8))
    crop = T.Compose([T.RandomCrop(32, padding=4), T.ToTensor()])
    seen_pad = False
    for seed in range(20):
        torch.manual_seed(seed)
        x = crop(img)
        seen_pad |= bool((x == 0).any())
    assert seen_pad
    # After normalisation a padded pixel is (0 - mean) / std, not 0.
    norm = train_transform().transforms[-1]
    padded = norm(torch.zeros(3, 1, 1)).flatten()
    assert torch.allclose(padded, -torch.tensor([0.4914, 0.4822, 0.4465]) / torch.tensor([0.2023, 0.1994, 0.2010]))


def test_synthetic_is_deterministic_and_shaped():
    a, b = SyntheticDataModule(train_size=100, test_size=20), SyntheticDataModule(train_size=100, test_size=20)
    a.setup(), b.setup()
    assert (len(a.train_set), len(a.val_set), len(a.test_set)) == (80, 20, 20)
    xa, ya = a.val_set[3]
    xb, yb = b.val_set[3]
    assert torch.equal(xa, xb) and ya == yb and xa.shape == (3, 32, 32)
    batch = next(iter(a.train_dataloader()))
    assert batch[0].shape[1:] == (3, 32, 32)


@pytest.mark.skipif(not SUBSET.exists(), reason="shared CIFAR-10 subset not present")
def test_shared_subset_loads_with_80_20_split():
    dm = CIFAR10DataModule(root=str(SUBSET), download=False, num_workers=0)
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 4068
    assert len(dm.val_set) == round(4068 * 0.2) and len(dm.test_set) == 1017
    x, y = dm.test_set[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10
    labels = np.asarray(dm.test_set.labels)
    assert len(np.unique(labels)) == 10


def test_missing_data_without_download_names_data_root(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(DataUnavailableError, match="data.root") as exc:
        dm.prepare_data()
    assert "data.download" in str(exc.value)


def test_failed_download_says_how_to_provide_archive(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.datasets.utils.urllib.request.urlopen", offline)
    dm = CIFAR10DataModule(root=str(tmp_path), download=True)
    with pytest.raises(DataUnavailableError) as exc:
        dm.prepare_data()
    msg = str(exc.value)
    assert "data.root" in msg and "cifar-10-python.tar.gz" in msg and "data.download=false" in msg


def test_corrupt_batch_is_a_clear_error(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(b"not a pickle")
    dm = CIFAR10DataModule(root=str(tmp_path), download=False)
    with pytest.raises(DataUnavailableError, match="data_batch_1"):
        dm.setup()


def test_cli_offline_data_error_exits_2_without_traceback(run_cli, tmp_path):
    r = run_cli(f"data.root={tmp_path / 'empty'}", "data.download=false", "model.weights=null")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "data.root" in r.stderr
    assert not list(tmp_path.rglob("*.pt"))


def test_smoke_alone_composes_as_before(tmp_path):
    cfg = compose_cfg(tmp_path, ["+experiment=smoke"])
    assert cfg.data._target_ == "prunelab.data.SyntheticDataModule"
    assert (cfg.data.train_size, cfg.data.test_size, cfg.data.batch_size) == (640, 256, 32)
    dm = instantiate(cfg.data)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (512, 128, 256)


@pytest.mark.skipif(not SUBSET.exists(), reason="shared CIFAR-10 subset not present")
def test_smoke_combines_with_cifar10(tmp_path):
    cfg = compose_cfg(tmp_path, ["+experiment=smoke", "data=cifar10", f"data.root={SUBSET}", "data.download=false"])
    dm = instantiate(cfg.data)
    assert isinstance(dm, CIFAR10DataModule)
    dm.prepare_data()
    dm.setup()
    # smoke's sizes: the first 640 training images (split 512/128) and the first 256 test images
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (512, 128, 256)
    full = CIFAR10DataModule(root=str(SUBSET), download=False, num_workers=0)
    full.setup()
    assert np.array_equal(dm.test_set.images, full.test_set.images[:256])
    assert np.array_equal(dm.train_set.dataset.images, full.train_set.dataset.images[:640])


@pytest.mark.skipif(not SUBSET.exists(), reason="shared CIFAR-10 subset not present")
def test_cifar10_sizes_default_to_all_and_cannot_exceed_the_data(tmp_path):
    cfg = compose_cfg(tmp_path, ["data=cifar10", f"data.root={SUBSET}", "data.download=false"])
    assert cfg.data.train_size is None and cfg.data.test_size is None
    dm = CIFAR10DataModule(root=str(SUBSET), download=False, train_size=5000)
    with pytest.raises(ConfigError, match=r"data.train_size=5000 .* only 4068 training images"):
        dm.setup()


@pytest.mark.parametrize(("train_size", "test_size"), [(1, None), (None, 0)])
def test_subset_sizes_are_validated(train_size, test_size):
    with pytest.raises(ValueError, match="data.train_size must be >= 2"):
        CIFAR10DataModule(train_size=train_size, test_size=test_size)
