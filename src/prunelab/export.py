"""``python -m prunelab.export RUN_DIR``: a run's dense and pruned models as ONNX, checked.

Reads ``RUN_DIR/models`` (``dense.pt`` and either ``pruned.pt`` or a channel-pruned
``pruned_channels.json`` + ``pruned.safetensors``), writes ``RUN_DIR/export/{dense,pruned}.onnx``
and prints, per file, the largest difference between onnxruntime and PyTorch on a random batch
(above 1e-4 the export fails). ``--fold-pool`` also writes ``*_folded.onnx`` with VGG's pool folded
into ``classifier[0]`` (see ``prunelab.models.rewrite``). The dynamo-based exporter is used (the
TorchScript one cannot export a 1x1 -> 7x7 adaptive pool); it implements opset 18 and up.

ONNX is an extra (``pip install prunelab[export]``): without it this command, and
``latency.onnx=true`` in a run, stop with one line saying so. Heavy imports wait until after the
arguments are parsed, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from prunelab.errors import PrunelabError

if TYPE_CHECKING:
    import torch
    from torch import nn

DEFAULT_OPSET = 18
INPUT_SIZE = (32, 32)
TOLERANCE = 1e-4


class ExportError(PrunelabError):
    """The run directory or a model cannot be exported as asked."""


def require_onnx():
    """onnxruntime (and the exporter's onnx/onnxscript), or one line naming the extra to install."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ExportError(f"ONNX export needs the export extra ({exc.name} is missing): "
                          "pip install prunelab[export]") from None
    return onnxruntime


# --- ONNX ------------------------------------------------------------------------------------------


def export_onnx(model: nn.Module, path: str | Path, batch: int = 1, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = True, input_size: tuple[int, int] = INPUT_SIZE) -> Path:
    """Export ``model`` (put in eval mode) to one self-contained ONNX file, atomically."""
    import torch
    from torch import nn

    from prunelab.io import _atomic

    model.eval()
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    x = torch.randn(batch, first.in_channels if first else 3, *input_size)
    dynamic = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, input_names=["input"],
                                output_names=["logits"], dynamic_shapes=dynamic, verbose=False)
    got = next((o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    if got != opset:
        # The exporter silently keeps its own opset when down-conversion fails; say so.
        warnings.warn(f"opset {opset} was requested but {Path(path).name} is opset {got} "
                      f"(the dynamo exporter implements {DEFAULT_OPSET} and up)", stacklevel=2)
    # Weights inline (no .data side file): protobuf allows 2 GB, far above any VGG here.
    return _atomic(path, lambda p: program.save(str(p), external_data=False))


def check_onnx(model: nn.Module, path: str | Path, x: torch.Tensor) -> float:
    """Largest |onnxruntime - PyTorch| over the outputs for input ``x`` (model put in eval mode)."""
    import numpy as np
    import torch

    ort = require_onnx()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})[0]
    with torch.inference_mode():
        want = model.eval()(x).float().cpu().numpy()
    return float(np.abs(got - want).max())


# --- the run directory -----------------------------------------------------------------------------


def run_arch(run_dir: Path, default: str = "vgg16") -> str:
    """``model.arch`` from the run's Hydra config, or ``default`` when there is none."""
    cfg_path = run_dir / ".hydra" / "config.yaml"
    if not cfg_path.is_file():
        return default
    from omegaconf import OmegaConf

    try:
        arch = OmegaConf.select(OmegaConf.load(cfg_path), "model.arch", default=None)
    except Exception:  # an unresolvable interpolation must not block an export
        arch = None
    return str(arch) if arch else default


def load_run_models(run_dir: str | Path) -> dict[str, nn.Module]:
    """``{"dense": ..., "pruned": ...}`` from ``RUN_DIR/models``; ExportError when incomplete. The
    pruned model is read in the compact form its method wrote (``pruning.registry``), else from
    ``pruned.pt``."""
    from prunelab.io import load_state_dict
    from prunelab.models.factory import build_from_state_dict
    from prunelab.pruning.channel_files import META_FILE, WEIGHTS_FILE
    from prunelab.pruning.registry import load_pruned

    run_dir = Path(run_dir)
    models_dir = run_dir / "models"
    dense_path, pruned_path = models_dir / "dense.pt", models_dir / "pruned.pt"
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a directory")
    compact = load_pruned(models_dir)
    if not dense_path.is_file() or not (pruned_path.is_file() or compact is not None):
        missing = [] if dense_path.is_file() else ["models/dense.pt"]
        if not (pruned_path.is_file() or compact is not None):
            missing.append(f"models/pruned.pt (or models/{META_FILE} + models/{WEIGHTS_FILE})")
        raise ExportError(f"{run_dir} lacks {' and '.join(missing)}: pass the output directory of a finished "
                          "prunelab-train run with stages.prune enabled")
    arch = run_arch(run_dir)
    models = {"dense": build_from_state_dict(arch, load_state_dict(dense_path), str(dense_path))}
    models["pruned"] = compact if compact is not None else \
        build_from_state_dict(arch, load_state_dict(pruned_path), str(pruned_path))
    return models


def export_run(run_dir: str | Path, fold: bool = False, opset: int = DEFAULT_OPSET, batch: int = 8,
               seed: int = 0, log=print) -> dict[str, dict]:
    """Export and check every model of a run; returns per-file results. Raises ExportError."""
    import torch

    from prunelab.io import compressed_bytes, file_bytes
    from prunelab.models.rewrite import fold_pool

    run_dir = Path(run_dir)
    if batch < 1:
        raise ExportError(f"--batch must be >= 1, got {batch}")
    models = load_run_models(run_dir)
    variants: dict[str, nn.Module] = dict(models)
    if fold:
        for name, model in models.items():
            try:
                variants[f"{name}_folded"] = fold_pool(model, INPUT_SIZE)
            except ValueError as exc:
                raise ExportError(f"--fold-pool refused for the {name} model: {exc}") from None
    torch.manual_seed(seed)
    x = torch.randn(batch, 3, *INPUT_SIZE)
    results = {}
    for name, model in variants.items():
        path = export_onnx(model, run_dir / "export" / f"{name}.onnx", batch=batch, opset=opset)
        diff = check_onnx(model, path, x)
        results[name] = {"path": str(path), "max_abs_diff": diff, "onnx_bytes": path.stat().st_size,
                         "params": sum(p.numel() for p in model.parameters())}
        log(f"{path}: max |onnxruntime - torch| = {diff:.3g} on a {batch}x3x{INPUT_SIZE[0]}x{INPUT_SIZE[1]} batch "
            f"({results[name]['params'] / 1e6:.2f}M params, {results[name]['onnx_bytes'] / 1e6:.1f} MB)")
        if not diff <= TOLERANCE:  # also catches NaN
            raise ExportError(f"{path} differs from PyTorch by {diff:.3g} (> {TOLERANCE:g}): the export is not faithful")
    for name, model in models.items():
        sd = model.state_dict()
        results[name].update(state_dict_bytes=file_bytes(sd), compressed_bytes=compressed_bytes(sd))
        log(f"{name}: state_dict {results[name]['state_dict_bytes'] / 1e6:.1f} MB, "
            f"sparse-packed {results[name]['compressed_bytes'] / 1e6:.1f} MB")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prunelab-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="a prunelab run directory (holds models/)")
    parser.add_argument("--fold-pool", action="store_true", help="also export *_folded.onnx (VGG at 32x32 only)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--batch", type=int, default=8, help="batch size of the check (the ONNX batch is dynamic)")
    args = parser.parse_args(argv)
    if args.opset < DEFAULT_OPSET:  # the exporter would fail twice in ONNX and then write 18 anyway
        print(f"prunelab-export: error: --opset {args.opset} is below what the exporter writes (torch.onnx's "
              f"dynamo exporter: opset {DEFAULT_OPSET} and up); use --opset {DEFAULT_OPSET} or higher", file=sys.stderr)
        return 2
    try:
        require_onnx()
        export_run(args.run_dir, fold=args.fold_pool, opset=args.opset, batch=args.batch)
    except PrunelabError as exc:
        print(f"prunelab-export: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
