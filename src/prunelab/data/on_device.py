"""Batches made on the accelerator: the uint8 split stays resident on the device and every batch
is flipped, padded-cropped, normalised (and cut out, with ``cutout``) there, with no loader workers and no per-batch copy
from the host.

The transforms reproduce torchvision's ``RandomHorizontalFlip -> RandomCrop(32, padding=4) ->
ToTensor -> Normalize`` on the PIL image exactly: padding adds black (0) pixels in uint8 space
before normalisation, so a padded pixel becomes ``(0 - mean) / std``, and the float arithmetic is
the same (``x / 255``, then ``- mean``, then ``/ std`` in float32), so eval batches are bitwise
equal to the PIL pipeline's.

Random parameters (order, flips, crop offsets) come from a CPU ``torch.Generator`` seeded from
``(seed, epoch)`` (``epoch_seed``) and are moved to the device once per epoch: the same seed gives
the same batches on any device, and under DDP every rank draws the same epoch plan and takes a
disjoint stride of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from prunelab.data.transforms import CIFAR10_MEAN, CIFAR10_STD, cutout_mask


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W), as ToTensor + Normalize compute it.

    One pass converts and lays the batch out (NCHW-contiguous like the PIL pipeline's batches, or
    channels-last for NHWC models, saving them a copy); the arithmetic then runs in place, in
    torchvision's order (/255, -mean, /std), so results are bitwise equal on the CPU (on CUDA a
    division by a scalar may round one ulp apart).
    """
    b, h, w, c = images.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((b, c, h, w), dtype=torch.float32, device=images.device, memory_format=fmt)
    out.copy_(images.permute(0, 3, 1, 2))
    return out.div_(255).sub_(mean[:, None, None]).div_(std[:, None, None])


def flip_crop(images: torch.Tensor, flip: torch.Tensor, top: torch.Tensor, left: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Horizontal flip (where ``flip``), then a crop at (``top``, ``left``) of the zero-padded image.

    ``images`` is uint8 (B, H, W, C); offsets are in padded coordinates, 0..2*padding, so
    ``top == left == padding`` and no flip is the identity. One gather does both operations:
    cropping the flipped padded image at column ``left + x`` reads column
    ``W + 2*padding - 1 - (left + x)`` of the unflipped padded image. (A flat ``gather`` measured
    about twice as fast on the CPU as three-way advanced indexing, and is a plain kernel on GPUs.)
    """
    b, h, w, c = images.shape
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = F.pad(images, (0, 0, padding, padding, padding, padding))  # zeros = black, pre-normalisation
    dev = images.device
    rows = top.to(dev)[:, None] + torch.arange(h, device=dev)
    cols = left.to(dev)[:, None] + torch.arange(w, device=dev)
    cols = torch.where(flip.to(dev)[:, None], (wp - 1) - cols, cols)
    flat = (rows[:, :, None] * wp + cols[:, None, :]).view(b, h * w, 1).expand(b, h * w, c)
    return padded.view(b, hp * wp, c).gather(1, flat).view(b, h, w, c)


def epoch_seed(seed: int, epoch: int) -> int:
    """A 64-bit seed for one epoch of a run seeded ``seed``, well mixed: ``seed + epoch`` gave seed
    1's epoch 0 the batches of seed 0's epoch 1, correlating the runs of a seed sweep."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, np.uint64)[0])


def epoch_plan(n: int, seed: int, epoch: int, shuffle: bool, augment: bool, padding: int = 4,
               cutout: int = 0, size: tuple[int, int] = (32, 32)) -> dict[str, torch.Tensor]:
    """Order and augmentation parameters for one epoch of ``n`` samples, drawn on the CPU.

    Drawn for positions in the epoch's order, so a DDP rank's stride of the plan holds exactly the
    samples and augmentations a single process would have used at those positions.
    """
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    plan = {"order": torch.randperm(n, generator=g) if shuffle else torch.arange(n)}
    if augment:
        plan["flip"] = torch.rand(n, generator=g) < 0.5
        # randint's high is exclusive: offsets 0..2*padding, like RandomCrop's get_params
        plan["top"] = torch.randint(0, 2 * padding + 1, (n,), generator=g)
        plan["left"] = torch.randint(0, 2 * padding + 1, (n,), generator=g)
        if cutout:  # drawn after the crops, so turning cutout on leaves every flip and crop as it was
            plan["cut_y"] = torch.randint(0, size[0], (n,), generator=g)
            plan["cut_x"] = torch.randint(0, size[1], (n,), generator=g)
    return plan


def shard_positions(n: int, rank: int, world_size: int, drop_tail: bool) -> torch.Tensor:
    """Positions of this rank's disjoint share of an ``n``-sample epoch (stride ``world_size``).

    Training drops the last ``n % world_size`` positions so every rank runs the same number of
    batches (an unequal count would leave DDP's gradient all-reduce waiting); evaluation keeps
    all of them, since an exact count matters more there and no gradients are synchronised.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    end = n - n % world_size if drop_tail else n
    return torch.arange(rank, end, world_size)


class DeviceLoader:
    """A re-iterable, sized loader of ``(x, y)`` batches built on ``images.device``.

    ``images`` (N, H, W, C) uint8 and ``labels`` (N,) int64 are the resident arrays; ``indices``
    selects the split from them (train and val share one resident array). ``dataset`` is the
    host-side Dataset of the same split, kept so ``len(loader.dataset)`` is the split's size, as
    with a DataLoader (under DDP too, where the loader itself yields only this rank's share).

    The epoch is the one ``set_epoch`` fixed; else ``epoch_fn()`` when given (the datamodule passes
    the fit loop's epoch, so a resumed fit replays the same plan); else a counter that every
    iteration advances by one, as a shuffling DataLoader draws a new order per pass.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: Sequence[int] | torch.Tensor | None = None,
        batch_size: int = 128,
        *,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        padding: int = 4,
        rank: int = 0,
        world_size: int = 1,
        drop_tail: bool | None = None,
        dataset: Dataset | None = None,
        epoch_fn: Callable[[], int | None] | None = None,
        channels_last: bool = False,
        cutout: int = 0,
    ):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images (N, H, W, C), got {images.dtype} {tuple(images.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.images = images
        self.labels = labels.to(images.device)
        idx = torch.arange(len(images)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        self.indices = idx.to(images.device)
        self.batch_size = batch_size
        self.shuffle, self.augment, self.seed, self.padding = shuffle, augment, seed, padding
        self.rank, self.world_size = rank, world_size
        # Training (shuffled) loaders keep ranks in lockstep; eval loaders count every image.
        drop_tail = shuffle if drop_tail is None else drop_tail
        self.positions = shard_positions(len(self.indices), rank, world_size, drop_tail)
        self.dataset = dataset
        self.epoch_fn = epoch_fn
        self.epoch = 0
        self._fixed_epoch = False
        self.channels_last = channels_last
        self.cutout = cutout if augment else 0
        self.mean = torch.tensor(mean, dtype=torch.float32, device=images.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=images.device)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        return math.ceil(len(self.positions) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Fix the epoch the next iterations use (as DistributedSampler.set_epoch does)."""
        self.epoch, self._fixed_epoch = int(epoch), True

    def _current_epoch(self) -> int:
        if self._fixed_epoch:  # an explicit set_epoch wins over the trainer and the counter
            return self.epoch
        if self.epoch_fn is not None:
            epoch = self.epoch_fn()
            if epoch is not None:
                return int(epoch)
        epoch, self.epoch = self.epoch, self.epoch + 1
        return epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # A generator, so that merely calling iter() (Lightning does, to check the loader) draws
        # nothing and advances no epoch.
        epoch = self._current_epoch()
        plan = epoch_plan(len(self.indices), self.seed, epoch, self.shuffle, self.augment, self.padding,
                          self.cutout, tuple(self.images.shape[1:3]))
        # One host-to-device copy of the epoch's plan, this rank's share only.
        plan = {k: v[self.positions].to(self.device) for k, v in plan.items()}
        for start in range(0, len(self.positions), self.batch_size):
            sl = slice(start, start + self.batch_size)
            idx = self.indices.index_select(0, plan["order"][sl])
            x = self.images.index_select(0, idx)  # whole-image row copies, faster than x[idx] on the CPU
            if self.augment:
                x = flip_crop(x, plan["flip"][sl], plan["top"][sl], plan["left"][sl], self.padding)
            x = normalize(x, self.mean, self.std, self.channels_last)
            if self.cutout:  # on the normalised batch, as the PIL pipeline's Cutout: the mean colour
                mask = cutout_mask(x.shape[2], x.shape[3], plan["cut_y"][sl], plan["cut_x"][sl], self.cutout)
                x.masked_fill_(mask[:, None], 0.0)
            yield x, self.labels.index_select(0, idx)

    def __repr__(self) -> str:
        return (f"DeviceLoader(n={len(self.positions)}, batch_size={self.batch_size}, device={self.device}, "
                f"shuffle={self.shuffle}, augment={self.augment}, rank={self.rank}/{self.world_size})")
