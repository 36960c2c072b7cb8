"""In-memory image data sets and the split/loader logic shared by every data module.

Images are held as one uint8 array (N, 32, 32, 3), like CIFAR-10's pickles, so the real and
the generated data go through the same transforms and the same split. ``train_size`` and
``test_size`` keep only the first N images of each array (null: all), so a preset such as
``+experiment=smoke`` sizes any data source.

The training order and every image's random flip and crop are functions of ``(seed, epoch)``
alone (``EpochShuffle`` and ``SeededSamples``), never of the global RNG's history or of which
loader worker reads the image: a fine-tune resumed at epoch k sees exactly the batches the
uninterrupted one saw, with any ``num_workers``. With ``on_device=True``
the loaders are ``DeviceLoader``s: the arrays stay resident on the trainer's device and batches
are augmented there (see ``prunelab.data.on_device``); the PIL Datasets remain for everything
else (evaluation, latency samples).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from lightning import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, random_split

from prunelab.data.on_device import DeviceLoader, epoch_seed
from prunelab.data.transforms import CIFAR10_MEAN, CIFAR10_STD, eval_transform, train_transform
from prunelab.errors import ConfigError


class ArrayDataset(Dataset):
    """uint8 HWC images + int labels, transformed as torchvision's CIFAR10 does (via PIL)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i])
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])


class EpochShuffle(Sampler):
    """A shuffling sampler whose order depends on ``(seed, epoch)`` only, yielding ``(index,
    sample_seed)`` pairs for ``SeededSamples``.

    A plain ``shuffle=True`` DataLoader draws each epoch's order from torch's global RNG, so a
    resumed fine-tune (global RNG reseeded at start) replayed epoch 0's order and augmentations
    in place of epoch k's. The epoch is the one ``set_epoch`` fixed (Lightning calls it before
    every training epoch); else ``epoch_fn()``, the fit loop's epoch (a resumed fit with loader
    workers draws its first order before Lightning's first ``set_epoch``, and a DDP sampler wrapper
    takes those calls itself); else a counter that every pass advances, as a shuffling DataLoader
    draws a new order per pass.
    """

    def __init__(self, n: int, seed: int, epoch_fn: Callable[[], int | None] | None = None):
        self.n, self.seed, self.epoch_fn = n, seed, epoch_fn
        self.epoch, self._fixed_epoch = 0, False

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._fixed_epoch = int(epoch), True

    def _current_epoch(self) -> int:
        if self._fixed_epoch:
            return self.epoch
        if self.epoch_fn is not None and (epoch := self.epoch_fn()) is not None:
            return int(epoch)
        epoch, self.epoch = self.epoch, self.epoch + 1
        return epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self._current_epoch()))
        order = torch.randperm(self.n, generator=g)
        seeds = torch.randint(0, 2**63 - 1, (self.n,), generator=g)
        return iter(zip(order.tolist(), seeds.tolist(), strict=True))


class SeededSamples(Dataset):
    """``dataset[(i, seed)]``: item ``i`` with its random transforms drawn after seeding torch's CPU
    generator with ``seed``, which is restored afterwards (in the main process, with
    ``num_workers=0``, the model's dropout draws from that same generator)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        i, seed = key
        state = torch.get_rng_state()
        # the CPU generator only: torch.manual_seed would also reseed CUDA's, which dropout uses on GPUs
        torch.default_generator.manual_seed(seed)
        try:
            return self.dataset[i]
        finally:
            torch.set_rng_state(state)


def _fit_epoch(trainer) -> Callable[[], int]:
    """The epoch the trainer's fit loop runs, or is about to run. Not ``trainer.current_epoch``: a
    resumed fit creates its loader's iterator (a DataLoader with workers draws the epoch's order
    right then) before the loop has moved past the checkpoint's last finished epoch, which
    ``current_epoch`` still names; Lightning's own ``set_epoch`` calls pass this same count."""
    return lambda: trainer.fit_loop.epoch_progress.current.processed


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Train/val indices; for n=50000, fraction 0.2 this is exactly the notebook's random_split."""
    n_val = int(round(n * val_fraction))
    train, val = random_split(range(n), [n - n_val, n_val], generator=torch.Generator().manual_seed(seed))
    return list(train.indices), list(val.indices)


class ArrayDataModule(LightningDataModule):
    """Split a training array into train/val with a fixed seed; the test array is the test split.

    Subclasses implement ``_load_arrays`` (and may override ``prepare_data``). ``train_size`` /
    ``test_size``: use only the first N training / test images (before the train/val split);
    None uses all of them.
    """

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        val_fraction: float = 0.2,
        seed: int = 42,
        pin_memory: bool = True,
        augment: bool = True,
        on_device: bool = False,
        train_size: int | None = None,
        test_size: int | None = None,
        cutout: int = 0,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        # two training images at least, so that both train and val can be non-empty
        if (train_size is not None and train_size < 2) or (test_size is not None and test_size < 1):
            raise ValueError(f"data.train_size must be >= 2 and data.test_size >= 1 (or null for all), "
                             f"got {train_size} and {test_size}")
        if isinstance(cutout, bool) or not isinstance(cutout, int) or cutout < 0:
            raise ValueError(f"data.cutout must be a whole number of pixels >= 0 (0: off), got {cutout!r}")
        self.cutout = cutout
        self.train_size = train_size
        self.test_size = test_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.seed = seed
        self.pin_memory = pin_memory
        self.augment = augment
        # num_workers and pin_memory do not apply to on-device loaders: there is nothing to load.
        self.on_device = on_device
        self._arrays: tuple[np.ndarray, ...] | None = None
        self._resident: tuple[torch.device, tuple[torch.Tensor, ...]] | None = None
        self.train_set = self.val_set = self.test_set = None
        self.num_classes = 10

    # -- to implement -------------------------------------------------------------------
    def _load_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    # -- Lightning hooks ----------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x_train, y_train, x_test, y_test = self._load_arrays()
        x_test, y_test = self._first(x_test, y_test, self.test_size, "test_size", "test")
        x_train, y_train, train_idx, val_idx = self._split(x_train, y_train)
        self.train_indices, self.val_indices = train_idx, val_idx
        self._arrays = (x_train, y_train, x_test, y_test)  # references, for the on-device loaders
        size = x_train.shape[1]  # the crop keeps the images' own size (32 for CIFAR-10)
        if self.cutout > size:
            raise ConfigError(f"data.cutout={self.cutout} is larger than the {size}x{size} images; "
                              f"set data.cutout<={size} (16 for 32x32 images) or 0")
        fit_tf = train_transform(size, cutout=self.cutout) if self.augment else eval_transform()
        self.train_set = Subset(ArrayDataset(x_train, y_train, fit_tf), train_idx)
        self.val_set = Subset(ArrayDataset(x_train, y_train, eval_transform()), val_idx)
        self.test_set = ArrayDataset(x_test, y_test, eval_transform())

    def _split(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
        """(images, labels, train indices, val indices): the first ``train_size`` training images,
        split by ``val_fraction`` with the data seed (CIFAR-10's 40,000/10,000)."""
        x, y = self._first(x, y, self.train_size, "train_size", "training")
        train_idx, val_idx = split_indices(len(x), self.val_fraction, self.seed)
        return x, y, train_idx, val_idx

    def _first(self, x: np.ndarray, y: np.ndarray, n: int | None, key: str, what: str):
        """The first ``n`` images and labels (views, no copy); all of them for None."""
        if n is None:
            return x, y
        if n > len(x):
            # Fewer images than asked for would silently change what a run measures.
            raise ConfigError(f"data.{key}={n} but the data hold only {len(x)} {what} images; "
                              f"set data.{key}<={len(x)} or null for all")
        return x[:n], y[:n]

    def calibration_set(self, n: int) -> Dataset:
        """The first ``n`` images of the training split, in its order, unaugmented: what data-aware
        pruning (``prune.importance=taylor``) measures on, never the validation images it is judged on."""
        if self._arrays is None:
            self.setup()
        x_train, y_train = self._arrays[0], self._arrays[1]
        return Subset(ArrayDataset(x_train, y_train, eval_transform()), list(self.train_indices[:n]))

    def _loader(self, ds, batch_size: int, shuffle: bool) -> DataLoader:
        sampler = None
        if shuffle:
            trainer = getattr(self, "trainer", None)
            sampler = EpochShuffle(len(ds), self.seed, _fit_epoch(trainer) if trainer is not None else None)
            ds = SeededSamples(ds)
        return DataLoader(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    # -- on-device loaders ------------------------------------------------------------------
    def _placement(self) -> tuple[torch.device, int, int]:
        """Device, rank and world size: the attached trainer's, else the CPU as one process."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return torch.device("cpu"), 0, 1
        return trainer.strategy.root_device, trainer.global_rank, trainer.world_size

    def resident_arrays(self, device: torch.device | str) -> tuple[torch.Tensor, ...]:
        """(x_train, y_train, x_test, y_test) on ``device``, copied there once and reused.

        Train and val index the same resident training array, so the device holds each image
        once (CIFAR-10: about 180 MB of uint8 in all). Only the latest device is kept.
        """
        device = torch.device(device)
        if self._arrays is None:
            self.setup()
        if self._resident is None or self._resident[0] != device:
            tensors = tuple(torch.from_numpy(a).to(device) for a in self._arrays)
            self._resident = (device, tensors)
        return self._resident[1]

    def device_loader(self, split: str, device: torch.device | str | None = None,
                      rank: int | None = None, world_size: int | None = None) -> DeviceLoader:
        """A ``DeviceLoader`` of ``split`` ('train', 'val' or 'test').

        Placement defaults to the attached trainer's (root device, global rank, world size).
        Under DDP each rank gets a disjoint share; the training share changes every epoch.
        """
        dev, r, w = self._placement()
        dev = torch.device(device) if device is not None else dev
        r = r if rank is None else rank
        w = w if world_size is None else world_size
        x_train, y_train, x_test, y_test = self.resident_arrays(dev)
        trainer = getattr(self, "trainer", None)
        common = dict(mean=CIFAR10_MEAN, std=CIFAR10_STD, rank=r, world_size=w)
        if split == "train":
            return DeviceLoader(
                x_train, y_train, self.train_indices, self.batch_size, shuffle=True, augment=self.augment,
                cutout=self.cutout, seed=self.seed, dataset=self.train_set,
                # the trainer's epoch, so a resumed fit draws the plan the interrupted one would have
                epoch_fn=_fit_epoch(trainer) if trainer is not None else None, **common,
            )
        if split == "val":
            return DeviceLoader(x_train, y_train, self.val_indices, self.eval_batch_size,
                                dataset=self.val_set, **common)
        if split == "test":
            return DeviceLoader(x_test, y_test, None, self.eval_batch_size, dataset=self.test_set, **common)
        raise ValueError(f"unknown split {split!r}; use 'train', 'val' or 'test'")

    def train_dataloader(self) -> DataLoader | DeviceLoader:
        if self.on_device:
            return self.device_loader("train")
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | DeviceLoader:
        if self.on_device:
            return self.device_loader("val")
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader | DeviceLoader:
        if self.on_device:
            return self.device_loader("test")
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def describe(self) -> dict:
        return {
            "train": len(self.train_set),
            "val": len(self.val_set),
            "test": len(self.test_set),
            "seed": self.seed,
            "on_device": self.on_device,
            "cutout": self.cutout,
        }
