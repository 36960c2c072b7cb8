"""data=imagefolder: class folders on disk, decoded once into a keyed cache, through the whole run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import compose_cfg
from prunelab.data import ImageFolderDataModule, imagefolder
from prunelab.data.arrays import split_indices
from prunelab.errors import DataUnavailableError

CLASSES = ("cat", "dog", "ship")
# one colour per class, so a small network separates them within a few steps
COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "ship": (40, 40, 200)}


def write_tree(root: Path, counts: dict[str, int], classes=CLASSES, size=(32, 32), fmt="PNG", seed=0) -> Path:
    """``root/<split>/<class>/NNNN.png``: noisy images of each class's colour."""
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for j in range(n):
                base = np.array(COLOURS.get(c, (128, 128, 128)), dtype=np.int16)
                px = np.clip(base + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(d / f"{j:04d}.{fmt.lower()}", fmt)
    return root


def load(root, tmp_path, **kw):
    dm = ImageFolderDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), decode_workers=1, **kw)
    dm.prepare_data()
    dm.setup()
    return dm


def test_val_folder_is_the_validation_split_and_classes_come_from_folder_names(tmp_path):
    root = write_tree(tmp_path / "tree", {"train": 4, "val": 2, "test": 3})
    dm = load(root, tmp_path)
    assert dm.classes == list(CLASSES) and dm.num_classes == 3
    assert dm.describe()["val_from"] == "val/"
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (12, 6, 9)
    x, y = dm._arrays[0], dm._arrays[1]
    # position-major: image 0 of every class, then image 1 of every class, ...
    assert y[:6].tolist() == [0, 1, 2, 0, 1, 2]
    # the val indices point at the val/ images, which follow train/ in the pooled array
    val_img = np.asarray(Image.open(root / "val" / "dog" / "0001.png").convert("RGB"))
    assert dm.val_indices == list(range(12, 18))
    np.testing.assert_array_equal(x[dm.val_indices[4]], val_img)
    assert y[dm.val_indices[4]] == 1


def test_without_val_folder_the_split_is_cifars_rule(tmp_path):
    root = write_tree(tmp_path / "tree", {"train": 10, "test": 2})
    dm = load(root, tmp_path)
    assert dm.describe()["val_from"] == "train/"
    train, val = split_indices(30, 0.2, dm.seed)
    assert (dm.train_indices, dm.val_indices) == (train, val)


def test_train_size_keeps_a_class_balanced_first_n_split_by_val_fraction(tmp_path):
    root = write_tree(tmp_path / "tree", {"train": 8, "val": 4, "test": 2})
    dm = load(root, tmp_path, train_size=15, test_size=4)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (12, 3, 4)
    assert np.bincount(dm._arrays[1][dm.train_indices]).tolist() == [4, 4, 4]
    assert np.bincount(dm._arrays[1][dm.val_indices]).tolist() == [1, 1, 1]


def test_classes_that_differ_between_splits_are_one_line_naming_them(tmp_path):
    root = write_tree(tmp_path / "tree", {"train": 2, "test": 2})
    write_tree(root, {"test": 1}, classes=("horse",))
    with pytest.raises(DataUnavailableError, match=r"only in test/: horse"):
        ImageFolderDataModule(root=str(root), cache_dir=str(tmp_path / "c")).prepare_data()
    (root / "val" / "cat").mkdir(parents=True)
    (root / "test" / "horse" / "0000.png").unlink()
    (root / "test" / "horse").rmdir()
    with pytest.raises(DataUnavailableError, match=r"missing from val/: dog, ship"):
        ImageFolderDataModule(root=str(root), cache_dir=str(tmp_path / "c")).prepare_data()


@pytest.mark.parametrize("missing", ["train", "test"])
def test_a_missing_split_names_it(tmp_path, missing):
    root = write_tree(tmp_path / "tree", {s: 1 for s in ("train", "test") if s != missing})
    with pytest.raises(DataUnavailableError, match=f"has no {missing}/"):
        ImageFolderDataModule(root=str(root)).prepare_data()


def test_a_corrupt_image_is_named_and_nothing_is_cached(tmp_path):
    root = write_tree(tmp_path / "tree", {"train": 3, "test": 1})
    bad = root / "train" / "dog" / "0001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    with pytest.raises(DataUnavailableError, match=r"0001\.png is not a readable image.*nothing was cached"):
        load(root, tmp_path)
    assert not any((tmp_path / "cache").glob("*.npz"))


def test_the_cache_is_reused_and_a_changed_file_rebuilds_it(tmp_path, monkeypatch):
    root = write_tree(tmp_path / "tree", {"train": 3, "test": 1})
    calls = []
    real = imagefolder.decode_all
    monkeypatch.setattr(imagefolder, "decode_all", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = load(root, tmp_path)
    n_first = len(calls)
    assert n_first == 2  # train and test, decoded once
    again = load(root, tmp_path)
    assert len(calls) == n_first  # served from the cache
    np.testing.assert_array_equal(first._arrays[0], again._arrays[0])
    # a changed image (new pixels, new mtime) is a new key: decoded again, and its pixels are the new ones
    path = root / "train" / "cat" / "0002.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = load(root, tmp_path)
    assert len(calls) == n_first + 2
    assert changed._arrays[0][6].max() == 0 and first._arrays[0][6].max() > 0
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_other_sizes_and_modes_become_rgb_at_image_size(tmp_path):
    root = tmp_path / "tree"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            Image.new("L", (40, 20), 77).save(root / split / c / "x.jpg", "JPEG")
            Image.new("RGBA", (32, 32), (10, 20, 30, 255)).save(root / split / c / "y.png")
    (root / "train" / "a" / "notes.txt").write_text("not an image: skipped")
    dm = load(root, tmp_path, image_size=24)
    x = dm._arrays[0]
    assert x.shape == (4, 24, 24, 3) and x.dtype == np.uint8
    assert abs(int(x[0, 5, 5, 0]) - 77) <= 2 and x[0, 5, 5, 0] == x[0, 5, 5, 2]  # grey to RGB
    assert x[2, 5, 5].tolist() == [10, 20, 30]
    img, _ = dm.train_set[0]
    assert tuple(img.shape) == (3, 24, 24)  # the crop keeps the configured size


def test_the_fine_tune_key_follows_what_the_files_hold_not_where_or_when(tmp_path):
    import shutil

    from prunelab.finetune import training_key

    root = write_tree(tmp_path / "tree", {"train": 2, "test": 1})
    over = ["data=imagefolder", "model.weights=null"]
    before = training_key(compose_cfg(tmp_path, [*over, f"data.root={root}"]))
    assert before == training_key(compose_cfg(tmp_path, [*over, f"data.root={root}",
                                                          f"data.cache_dir={tmp_path / 'elsewhere'}"]))
    # copied elsewhere and every file rewritten later (a restore, a copy without times): the decode
    # cache misses, the images are the same, so the training is the same one (it resumes, it is reused)
    copy = Path(shutil.copytree(root, tmp_path / "copy"))
    for path in copy.rglob("*.png"):
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert imagefolder.files_key(copy, 32) != imagefolder.files_key(root, 32)
    assert training_key(compose_cfg(tmp_path, [*over, f"data.root={copy}"])) == before
    # one pixel changed: another training
    path = copy / "test" / "ship" / "0000.png"
    st = path.stat()
    px = np.asarray(Image.open(path)).copy()
    px[0, 0, 0] ^= 1
    Image.fromarray(px).save(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    assert training_key(compose_cfg(tmp_path, [*over, f"data.root={copy}"])) != before


def test_cli_refuses_a_head_of_another_size_in_one_line(run_cli, tmp_path):
    root = write_tree(tmp_path / "tree", {"train": 2, "test": 1})
    r = run_cli("+experiment=smoke", "data=imagefolder", f"data.root={root}", "model=resnet18",
                "data.train_size=null", "data.test_size=null")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "the data hold 3 classes but model.num_classes=10; set model.num_classes=3" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_without_root_says_to_set_it(run_cli, tmp_path):
    r = run_cli("+experiment=smoke", "data=imagefolder")
    assert r.returncode == 2 and "data=imagefolder needs data.root=PATH" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_whole_path_on_a_small_tree(run_cli, tmp_path):
    """class folders -> the scratch recipe's fine-tune (cosine, warm-up, on-device batches) -> latency
    search across methods -> report, on a tree the test writes."""
    root = write_tree(tmp_path / "tree", {"train": 40, "val": 10, "test": 10})
    r = run_cli("+experiment=scratch", "data=imagefolder", f"data.root={root}", "model=resnet18",
                "model.num_classes=3", "model.lr=0.05", "data.batch_size=32", "trainer.max_epochs=2",
                "trainer.accelerator=cpu", "search.objective=latency", "search.methods=[magnitude,channel]",
                "search.grid=[0.3,0.6]", "search.refine_step=null", "latency.batch_sizes=[8]",
                "latency.batch_size=8", "latency.iters=3", "latency.warmup=1", "latency.agreement_images=8",
                # 30 validation images: one is worth 3.3 points, so a tolerance below that would be refused
                "search.tolerance=5", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(next((tmp_path / "logs").rglob("report.json")).read_text())
    assert report["config"]["data"]["_target_"] == "prunelab.data.ImageFolderDataModule"
    assert report["dense"]["test_acc"]["n"] == 30 and report["dense"]["val_acc"]["n"] == 30
    assert report["dense"]["test_acc"]["value"] > 60  # three colours: learnt, not chance
    search = report["search"]
    # on a CPU unstructured zeros cannot be faster: the latency search says so and times channel alone
    assert "magnitude" in search["skipped_methods"]
    assert {c["method"] for c in search["candidates"]} == {"channel"}
    assert report["finetune"]["source"] == "trained"
