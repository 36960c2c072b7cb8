"""The notebook's CIFAR-10 transforms, kept in one place so train, eval and tests agree."""

from __future__ import annotations

import torch
from torchvision import transforms as T

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


def cutout_mask(h: int, w: int, cy: torch.Tensor, cx: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W) bool: a ``size`` x ``size`` square per image centred at (``cy``, ``cx``), any pixel
    of the image, clipped at the border (so a square near an edge covers less of the image)."""
    lo = size // 2
    rows = torch.arange(h, device=cy.device)
    cols = torch.arange(w, device=cx.device)
    in_rows = (rows >= (cy[:, None] - lo)) & (rows < (cy[:, None] - lo + size))
    in_cols = (cols >= (cx[:, None] - lo)) & (cols < (cx[:, None] - lo + size))
    return in_rows[:, :, None] & in_cols[:, None, :]


class Cutout:
    """Zero a random ``size`` x ``size`` square of a normalised (C, H, W) image: the mean colour,
    the rest of the image kept. Its centre is drawn from torch's CPU generator, which the training
    loader seeds per image and epoch."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        _, h, w = img.shape
        cy = torch.randint(0, h, (1,))
        cx = torch.randint(0, w, (1,))
        return img.masked_fill(cutout_mask(h, w, cy, cx, self.size), 0.0)

    def __repr__(self) -> str:
        return f"Cutout(size={self.size})"


def train_transform(size: int = 32, mean=CIFAR10_MEAN, std=CIFAR10_STD, cutout: int = 0) -> T.Compose:
    # The crop pads the PIL image with zeros (black) before normalisation, as in the notebook.
    steps = [
        T.RandomHorizontalFlip(),
        T.RandomCrop(size, padding=4),
        T.ToTensor(),
        T.Normalize(mean, std),
    ]
    if cutout:  # after normalisation, so the square is the data's mean colour, not black
        steps.append(Cutout(cutout))
    return T.Compose(steps)


def eval_transform(mean=CIFAR10_MEAN, std=CIFAR10_STD) -> T.Compose:
    return T.Compose([T.ToTensor(), T.Normalize(mean, std)])
