"""A channel-pruned model on disk: plain tensors (safetensors) plus a JSON of the layer shapes,
rebuilt from the torchvision architecture, so loading runs no pickled code. The channel method's
registry entry saves and loads through ``save_compact``/``load_compact``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision import models as tvm

from prunelab.io import _atomic, compressed_bytes, write_json
from prunelab.models.factory import last_linear_name, replace_module
from prunelab.models.rewrite import replicating_pools

META_FILE = "pruned_channels.json"
WEIGHTS_FILE = "pruned.safetensors"


def layer_shapes(model: nn.Module) -> dict:
    """The shapes that differ between a channel-pruned model and its torchvision original."""
    convs, bns, linears = {}, {}, {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            convs[name] = [m.in_channels, m.out_channels]
        elif isinstance(m, nn.BatchNorm2d):
            bns[name] = m.num_features
        elif isinstance(m, nn.Linear):
            linears[name] = [m.in_features, m.out_features]
    return {"convs": convs, "batchnorms": bns, "linears": linears}


def save_channel_pruned(model: nn.Module, directory: str | Path, arch: str = "vgg16", num_classes: int = 10) -> Path:
    """Write ``pruned.safetensors`` and ``pruned_channels.json`` under ``directory``, each atomically.

    The JSON is written last, so its presence means the weights beside it are complete.
    """
    directory = Path(directory)
    head = model.get_submodule(last_linear_name(model))
    if head.out_features != num_classes:
        raise ValueError(f"num_classes={num_classes} but the model's head has {head.out_features} outputs")
    shapes = layer_shapes(model)
    first_linear = next(iter(shapes["linears"].values()), [None])[0]
    meta = {
        "format": 1,
        "arch": arch,
        "num_classes": num_classes,
        "conv_channels": {n: s[1] for n, s in shapes["convs"].items()},
        "first_linear_in_features": first_linear,
        **shapes,
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _atomic(directory / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"arch": arch}))
    write_json(directory / META_FILE, meta)
    return directory


def _resized(old: nn.Module, shape) -> nn.Module:
    if isinstance(old, nn.Conv2d):
        return nn.Conv2d(shape[0], shape[1], old.kernel_size, old.stride, old.padding, old.dilation,
                         old.groups, old.bias is not None, old.padding_mode)
    if isinstance(old, nn.BatchNorm2d):
        return nn.BatchNorm2d(shape, old.eps, old.momentum, old.affine, old.track_running_stats)
    return nn.Linear(shape[0], shape[1], old.bias is not None)


def load_channel_pruned(directory: str | Path) -> nn.Module:
    """Rebuild a model saved by ``save_channel_pruned`` and load its weights strictly."""
    directory = Path(directory)
    meta_path, weights_path = directory / META_FILE, directory / WEIGHTS_FILE
    missing = [p.name for p in (meta_path, weights_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} has no {' or '.join(missing)}: not a channel-pruned model directory")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    # Built on the meta device: no memory is allocated or initialised for weights that the
    # checkpoint replaces anyway (VGG16's 138M would take seconds to initialise for nothing).
    with torch.device("meta"):
        net = tvm.get_model(meta["arch"], weights=None)
        head = last_linear_name(net)
        replace_module(net, head, nn.Linear(net.get_submodule(head).in_features, meta["num_classes"]))
        for kind in ("convs", "batchnorms", "linears"):
            for name, shape in meta[kind].items():
                replace_module(net, name, _resized(net.get_submodule(name), shape))
    net.load_state_dict(load_file(str(weights_path)), strict=True, assign=True)
    left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{weights_path} does not hold {', '.join(left)}")
    return replicating_pools(net).eval()


def save_compact(net: nn.Module, models_dir: Path, arch: str, num_classes: int) -> dict:
    """Write ``net`` into a run's ``models/``; returns the report's file figures."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    save_channel_pruned(net, models_dir, arch=arch, num_classes=num_classes)
    size = sum((Path(models_dir) / f).stat().st_size for f in (META_FILE, WEIGHTS_FILE))
    return {"pruned_bytes": size, "pruned_compressed_bytes": compressed_bytes(state),
            "pruned_format": "channels+safetensors"}


def load_compact(models_dir: Path) -> nn.Module | None:
    """The channel-pruned model a run wrote into ``models_dir``, or None when it wrote none."""
    if not all((Path(models_dir) / f).is_file() for f in (META_FILE, WEIGHTS_FILE)):
        return None
    return load_channel_pruned(models_dir)
