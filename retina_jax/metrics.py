"""Metric writing from process 0: JSON lines (one object per step) plus a console summary.

Metric names follow ARCHITECTURE.md: `train/loss`, `train/loss/<term>`, `train/lr`,
`perf/examples_per_sec`, `eval/<task>/<metric>`. `clu.metric_writers` would import TensorFlow, so
this small writer stands in for it.
"""
from __future__ import annotations

import json
import logging as pylogging
import math
import os
import time

import jax
import numpy as np


class MetricWriter:
    def __init__(self, workdir: str, filename: str = "metrics.jsonl"):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, filename)
        if self.active:
            os.makedirs(workdir, exist_ok=True)

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        row = {"step": int(step), "time": time.time()}
        row.update({k: _scalar(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _scalar(v):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()


def read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_finite(step: int, metrics: dict) -> None:
    """Stop a run the moment a loss goes NaN/inf instead of training on garbage for hours."""
    bad = {k: v for k, v in metrics.items() if k.startswith("train/loss") and not math.isfinite(float(v))}
    if bad:
        raise FloatingPointError(f"non-finite training metrics at step {step}: {bad}")


class Throughput:
    """Examples per second between calls."""

    def __init__(self):
        self._t, self._n = time.perf_counter(), 0

    def add(self, n: int):
        self._n += n

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self._n / max(now - self._t, 1e-9)
        self._t, self._n = now, 0
        return rate


class _QuietLibraries(pylogging.Filter):
    """Drop INFO lines of installed libraries (orbax logs every array it writes) but keep ours."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "site-packages" not in record.pathname


def quiet_library_logs() -> None:
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().addFilter(_QuietLibraries())
