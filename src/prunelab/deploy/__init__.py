"""How prunelab serves and times models: the latency runtimes and their resolved spec.

- ``registry``: the runtimes by name (``eager``, ``deploy``, ``onnxruntime``, ``openvino``,
  ``inductor``), one module each; ``latency.runtime=auto`` picks among them (``auto``).
- ``spec``: ``latency.*`` resolved once, with the hardware, into a frozen ``DeploySpec``.
- ``checks``: every form's answers and logits against eager fp32, at every timed batch size.
- ``timing``: dense and pruned (or a shortlist) timed in turns in one runtime.
- ``ship``: the timed model written in its runtime's format, and the lines that load it.

Importing this package is cheap (the registry reads no runtime); the names below load their
module on first use.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "time_dense_and_pruned": "timing", "time_together": "timing",
    "MAGNITUDE_NOTE": "timing", "build_forms": "timing",
    "save_pruned": "ship", "ship": "ship", "pick": "auto",
    "DeploySpec": "spec", "resolve_spec": "spec",
    "agreement": "checks", "check_agreement": "checks", "DeployMismatchError": "checks",
    "deploy_form": "native", "Deployed": "native", "eager_form": "eager",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"prunelab.deploy.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'prunelab.deploy' has no attribute {name!r}")
