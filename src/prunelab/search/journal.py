"""A search journal: candidates already evaluated, so a killed search resumes where it stopped.

An entry is reused only when its identity (the fine-tuned weights' digest, the method and every
setting that changes a verdict) equals the running search's; anything else starts afresh.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prunelab.io import write_json
from prunelab.search.rules import Evaluation

log = logging.getLogger(__name__)


class Journal:
    def __init__(self, path: str | Path | None, identity: dict):
        self.path = Path(path) if path else None
        self.identity = identity
        self.entries: dict[float, Evaluation] = {}
        if self.path and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                data = {}
            if data.get("identity") == identity:
                for e in data.get("evaluations", []):
                    extra = e.pop("extra", {})
                    self.entries[e["ratio"]] = Evaluation(**e, extra=extra)
            else:
                log.info("search journal %s was written for other weights or settings: starting afresh", self.path)

    def record(self, e: Evaluation) -> None:
        self.entries[e.ratio] = e
        if self.path:
            evals = [
                {"ratio": v.ratio, "correct": v.correct, "seen": v.seen, "total": v.total,
                 "stopped": v.stopped, "nonzero": v.nonzero, "extra": v.extra, "paired": v.paired,
                 "paired_ok": v.paired_ok}
                for v in sorted(self.entries.values(), key=lambda v: v.ratio)
            ]
            write_json(self.path, {"identity": self.identity, "evaluations": evals})
