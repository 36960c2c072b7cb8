"""Ship what was timed: the served model in its runtime's own file format, beside the state_dict.

``ship`` writes the form that was timed (ONNX for ONNX Runtime, OpenVINO IR for OpenVINO) into the
run's ``models/`` folder and returns what the report shows: the file, its format and the few lines
of Python that load and run it. Runtimes without a format of their own (deploy, inductor, eager)
ship as the plain state_dict that ``save_pruned`` writes, and their lines rebuild the served form
from it. ``save_pruned`` writes the pruned model in its method's compact form (the registry
entry's: channel counts + safetensors for channel pruning), else as a state_dict.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from prunelab.deploy import registry
from prunelab.deploy.spec import DeploySpec
from prunelab.io import compressed_bytes, save_state_dict
from prunelab.pruning import registry as registry_of_methods

LOAD_NETWORK = ("from prunelab.export import load_run_models\n\n"
                "net = load_run_models(\"{run}\")[\"{tag}\"]  # the run folder: models/ and .hydra/")


def ship(form: nn.Module, spec: DeploySpec, models_dir: Path, tag: str, run: str = ".") -> dict:
    """Write ``form`` (timed in ``spec.runtime``) as ``models_dir/<tag>.<suffix>`` where its runtime
    has a format; returns {"runtime", "format", "file", "bytes", "load"} for the report."""
    runtime = registry.get(spec.runtime)
    path = runtime.save(form, Path(models_dir) / tag)
    if path is not None:
        shown = f"{Path(models_dir).name}/{path.name}"
        load = runtime.load_snippet(Path(shown), spec)
        size = sum(p.stat().st_size for p in path.parent.glob(path.stem + ".*") if p.suffix in (path.suffix, ".bin"))
        return {"runtime": spec.runtime, "format": path.suffix.lstrip("."), "file": str(path), "bytes": size,
                "load": load}
    lines = LOAD_NETWORK.format(run=run, tag=tag)
    extra = runtime.load_snippet(Path(models_dir), spec)
    return {"runtime": spec.runtime, "format": "state_dict", "file": None, "bytes": None,
            "load": "import torch\n" + lines + ("\n" + extra if extra else "")}


def save_pruned(method: str, net: nn.Module, models_dir: Path, arch: str, num_classes: int) -> dict:
    """Write the pruned model in its method's compact form, else as a state_dict; returns the bytes
    on disk."""
    files = registry_of_methods.save_pruned(method, net, models_dir, arch, num_classes)
    if files is not None:
        return files
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    path = save_state_dict(models_dir / "pruned.pt", state)
    return {"pruned_bytes": path.stat().st_size, "pruned_compressed_bytes": compressed_bytes(state),
            "pruned_format": "state_dict"}

