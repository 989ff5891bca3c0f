"""`metrics.jsonl` in the run directory: one JSON object per report, appended live, continued on resume."""

from __future__ import annotations

import json
import math
import os

from raydiff import storage
from raydiff.config import is_uri


def _clean(value):
    """JSON has no NaN/inf; write them as null rather than produce an unreadable line."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends records; on resume drops rows past the restored step so a resumed run never double-counts a step."""

    def __init__(self, path: str, resume_step: int):
        self.path = path
        lines = storage.read_text(path).splitlines() if storage.exists(path) else []
        self._lines = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        if len(self._lines) != len(lines) or not lines:
            storage.write_text(path, "".join(line + "\n" for line in self._lines))

    def append(self, record: dict) -> None:
        line = json.dumps({k: _clean(v) for k, v in record.items()})
        self._lines.append(line)
        if is_uri(self.path):  # object stores cannot append: replace the (small) object
            storage.write_text(self.path, "".join(x + "\n" for x in self._lines))
            return
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_metrics(path: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
