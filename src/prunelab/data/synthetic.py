"""Generated, deterministic, learnable CIFAR-shaped data: no files, no network.

Each class has a smooth colour template (a random 4x4x3 grid upsampled to 32x32); an image is
its class template plus per-image noise and brightness jitter. A small network separates the
classes within a few dozen steps, so smoke runs and tests see accuracy well above chance and a
curve that falls once pruning removes enough weights.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from prunelab.data.arrays import ArrayDataModule


def make_images(n: int, num_classes: int, seed: int, noise: float, templates_seed: int = 0):
    g = torch.Generator().manual_seed(templates_seed)
    coarse = torch.rand(num_classes, 3, 4, 4, generator=g)
    templates = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    brightness = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)
    x = templates[labels] * brightness + noise * torch.randn(n, 3, 32, 32, generator=g)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return x.numpy(), labels.numpy().astype(np.int64)


class SyntheticDataModule(ArrayDataModule):
    def __init__(
        self,
        train_size: int = 1280,
        test_size: int = 256,
        noise: float = 0.25,
        num_classes: int = 10,
        **kwargs,
    ):
        if train_size is None or test_size is None:  # "all" has no meaning for generated data
            raise ValueError("synthetic data need sizes: set data.train_size and data.test_size")
        # the base class validates the sizes; its first-N subset is then the whole generated set
        super().__init__(train_size=train_size, test_size=test_size, **kwargs)
        self.noise = noise
        self.num_classes = num_classes

    def prepare_data(self) -> None:  # nothing to fetch
        pass

    def _load_arrays(self):
        x_train, y_train = make_images(self.train_size, self.num_classes, seed=1, noise=self.noise)
        x_test, y_test = make_images(self.test_size, self.num_classes, seed=2, noise=self.noise)
        return x_train, y_train, x_test, y_test
