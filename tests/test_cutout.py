"""Cutout (data.cutout): one clipped square per training image set to the mean colour, in the PIL
pipeline and on the device alike, leaving every flip and crop as it was; off by default and then
outside the fine-tune key, so earlier fine-tunes keep theirs."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_cfg
from prunelab.data import SyntheticDataModule
from prunelab.data.on_device import DeviceLoader
from prunelab.data.transforms import Cutout, cutout_mask, eval_transform, train_transform
from prunelab.errors import ConfigError


def test_mask_is_a_square_of_the_side_inside_and_clipped_at_the_border():
    inner = cutout_mask(32, 32, torch.tensor([16]), torch.tensor([10]), 16)[0]
    assert int(inner.sum()) == 256
    rows, cols = inner.nonzero().T
    assert (int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())) == (8, 23, 2, 17)
    corner = cutout_mask(32, 32, torch.tensor([0]), torch.tensor([31]), 16)[0]
    assert int(corner.sum()) == 8 * 9  # rows -8..7 and columns 23..38, clipped to 0..7 and 23..31
    assert corner[0, 31] and corner[7, 23] and not corner[8, 31] and not corner[0, 22]
    odd = cutout_mask(9, 9, torch.tensor([4]), torch.tensor([4]), 3)[0]
    assert odd.nonzero().tolist() == [[r, c] for r in (3, 4, 5) for c in (3, 4, 5)]  # centred


def test_pil_cutout_zeroes_one_square_of_the_normalised_image_and_keeps_the_rest():
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.random((3, 32, 32), dtype=np.float32) + 0.5)  # never 0
    torch.manual_seed(5)
    out = Cutout(16)(img)
    zero = out == 0
    assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])  # every channel
    assert 64 <= int(zero[0].sum()) <= 256
    assert torch.equal(out[~zero], img[~zero])
    rows, cols = zero[0].nonzero().T
    assert int(zero[0].sum()) == (int(rows.max()) - int(rows.min()) + 1) * (int(cols.max()) - int(cols.min()) + 1)
    steps = [type(t).__name__ for t in train_transform(32, cutout=16).transforms]
    assert steps[-2:] == ["Normalize", "Cutout"]
    assert "Cutout" not in [type(t).__name__ for t in train_transform(32).transforms]


def test_device_batches_with_cutout_are_those_without_it_with_one_square_zeroed():
    dm = SyntheticDataModule(train_size=200, test_size=20, batch_size=50, on_device=True)
    dm.setup()
    images, labels = torch.from_numpy(dm._arrays[0]), torch.from_numpy(dm._arrays[1])
    plain = DeviceLoader(images, labels, batch_size=50, shuffle=True, augment=True, seed=7)
    cut = DeviceLoader(images, labels, batch_size=50, shuffle=True, augment=True, seed=7, cutout=16)
    plain.set_epoch(3), cut.set_epoch(3)
    areas = []
    for (xp, yp), (xc, yc) in zip(plain, cut, strict=True):
        assert torch.equal(yp, yc)
        zero = (xc == 0).all(1)  # (B, H, W): pixels zero in every channel
        assert torch.equal(xc, xp.masked_fill(zero[:, None], 0.0))  # nothing else changed
        areas += zero.flatten(1).sum(1).tolist()
    assert min(areas) >= 64 and max(areas) == 256
    assert 0 < sum(a < 256 for a in areas) < len(areas)  # some squares clipped at the border, not all


def test_non_square_device_batches_cut_one_square_each():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 255, (40, 24, 40, 3), dtype=torch.uint8, generator=g)
    labels = torch.zeros(40, dtype=torch.long)
    plain = DeviceLoader(images, labels, batch_size=40, shuffle=True, augment=True, seed=1)
    cut = DeviceLoader(images, labels, batch_size=40, shuffle=True, augment=True, seed=1, cutout=10)
    (xp, _), (xc, _) = next(iter(plain)), next(iter(cut))
    zero = (xc == 0).all(1)
    assert torch.equal(xc, xp.masked_fill(zero[:, None], 0.0))
    for z in zero:  # one axis-aligned rectangle, at most 10 x 10, inside the 24 x 40 image
        rows, cols = z.nonzero().T
        h, w = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
        assert h <= 10 and w <= 10 and int(z.sum()) == h * w


def test_the_data_module_hands_cutout_to_both_training_paths():
    dm = SyntheticDataModule(train_size=100, test_size=20, batch_size=20, on_device=True, cutout=12)
    dm.setup()
    assert dm.device_loader("train").cutout == 12
    assert [type(t).__name__ for t in dm.train_set.dataset.transform.transforms][-1] == "Cutout"
    assert dm.train_set.dataset.transform.transforms[-1].size == 12
    assert "Cutout" not in [type(t).__name__ for t in dm.val_set.dataset.transform.transforms]
    assert dm.describe()["cutout"] == 12


def test_eval_loaders_and_unaugmented_training_ignore_cutout():
    dm = SyntheticDataModule(train_size=100, test_size=20, batch_size=20, on_device=True, cutout=16)
    dm.setup()
    (x, _), = list(dm.device_loader("test"))
    ref = torch.stack([eval_transform()(Image.fromarray(a)) for a in dm._arrays[2]])
    assert torch.allclose(x, ref, atol=1e-6, rtol=0)
    images, labels = torch.from_numpy(dm._arrays[0]), torch.from_numpy(dm._arrays[1])
    assert DeviceLoader(images, labels, augment=False, cutout=16).cutout == 0


@pytest.mark.parametrize("bad", [-1, 2.5, True, "16"])
def test_a_bad_cutout_is_refused(bad):
    with pytest.raises(ValueError, match="data.cutout must be a whole number of pixels"):
        SyntheticDataModule(train_size=100, test_size=20, cutout=bad)


def test_a_cutout_larger_than_the_images_is_refused_at_setup():
    dm = SyntheticDataModule(train_size=100, test_size=20, cutout=33)
    with pytest.raises(ConfigError, match=r"data.cutout=33 is larger than the 32x32 images"):
        dm.setup()


def test_cutout_off_keeps_earlier_keys_and_on_is_another_fine_tune(tmp_path):
    from omegaconf import open_dict

    from prunelab.finetune import training_key

    base = compose_cfg(tmp_path, ["+experiment=smoke"])
    off = training_key(base)
    with open_dict(base):
        del base.data["cutout"]  # a config from before the setting existed
    assert training_key(base) == off
    assert training_key(compose_cfg(tmp_path, ["+experiment=smoke", "data.cutout=16"])) != off
    # without augmentation there is nothing to cut: the same training as without the setting
    no_aug = training_key(compose_cfg(tmp_path, ["+experiment=smoke", "+data.augment=false"]))
    assert training_key(compose_cfg(tmp_path, ["+experiment=smoke", "+data.augment=false", "data.cutout=16"])) == no_aug
