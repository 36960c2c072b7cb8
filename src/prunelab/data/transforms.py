"""The notebook's CIFAR-10 transforms, kept in one place so train, eval and tests agree."""

from __future__ import annotations

from torchvision import transforms as T

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


def train_transform(size: int = 32, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> T.Compose:
    # The crop pads the PIL image with zeros (black) before normalisation, as in the notebook.
    return T.Compose(
        [
            T.RandomHorizontalFlip(),
            T.RandomCrop(size, padding=4),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def eval_transform(mean=CIFAR10_MEAN, std=CIFAR10_STD) -> T.Compose:
    return T.Compose([T.ToTensor(), T.Normalize(mean, std)])
