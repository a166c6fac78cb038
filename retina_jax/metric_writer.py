"""Metric writing from process 0: JSON lines (one object per step), TensorBoard event files in
`<workdir>/tensorboard/` (tensorboardX: no TensorFlow), Weights & Biases when `train.wandb` names a
project, and a console summary (docs/usage.md, "Run directories").

Metric names follow docs/architecture.md ("The trainer"): `train/loss`, `train/loss_<term>`, `train/lr`,
`perf/examples_per_sec`, `perf/step_seconds`, `perf/data_wait_seconds`, `eval/<task>/<metric>`.
`clu.metric_writers` would import TensorFlow, so this small writer stands in for it.
"""
from __future__ import annotations

import contextlib
import json
import logging as pylogging
import math
import os
import time

import jax
import numpy as np
from absl import logging


class MetricWriter:
    def __init__(self, workdir: str, filename: str = "metrics.jsonl", *, wandb_project: str = "",
                 run_config: dict | None = None):
        self.active = jax.process_index() == 0
        self.workdir = workdir
        self.path = os.path.join(workdir, filename)
        self.wandb_project, self.run_config = wandb_project, run_config
        self._tensorboard = self._wandb = None  # opened on the first write
        self._opened = 0
        if self.active:
            os.makedirs(workdir, exist_ok=True)

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        row = {"step": int(step), "time": time.time()}
        row.update({k: _scalar(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: float(v) for k, v in row.items()
                   if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tensorboard is None:
            from tensorboardX import SummaryWriter
            # A file per opening (pid and count): reopened within the same second, tensorboardX's
            # time-stamped name would otherwise overwrite the earlier file.
            self._opened += 1
            self._tensorboard = SummaryWriter(os.path.join(self.workdir, "tensorboard"),
                                              filename_suffix=f".{os.getpid()}.{self._opened}")
        for key, value in scalars.items():
            self._tensorboard.add_scalar(key, value, int(step))
        if self.wandb_project:
            self._wandb_run().log(scalars, step=int(step))

    def _wandb_run(self):
        """The W&B run of this workdir: its id is kept in the workdir, so a resumed run continues it."""
        if self._wandb is None:
            import wandb
            id_path = os.path.join(self.workdir, "wandb_id.txt")
            if os.path.isfile(id_path):
                run_id = open(id_path).read().strip()
            else:
                run_id = wandb.util.generate_id()
                with open(id_path, "w") as f:
                    f.write(run_id)
            self._wandb = wandb.init(project=self.wandb_project, id=run_id, resume="allow", dir=self.workdir,
                                     config=self.run_config)
        return self._wandb

    def close(self) -> None:
        """Flush the TensorBoard file (a later write opens it again)."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def report(self, name: str, step: int, result: dict, **extra) -> None:
        """An evaluator's metrics: eval/<name>/<metric> rows here and eval_<name>.json beside them."""
        self.write(step, {f"eval/{name}/{k}": v for k, v in result.items()})
        if self.active:
            with open(os.path.join(os.path.dirname(self.path), f"eval_{name}.json"), "w") as f:
                json.dump({"task": name, "step": step, **extra, **result}, f, indent=2)
            logging.info("%s at step %d: %s", name, step,
                         " ".join(f"{k}={v:.4f}" for k, v in result.items() if isinstance(v, float)))


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
    """Speed between two reports: examples per second, wall seconds per step and, of those, the
    seconds the loop waited for its next batch (a step that waits for data shows it here).

    Checkpoint saves and evaluations run between steps inside `outside()` and count in neither.
    Steps are dispatched asynchronously, so one step's time is not observable without stalling the
    device; the interval's wall time divided by its steps is, once the device queue is in steady state.
    """

    def __init__(self):
        self._start(time.perf_counter())

    def _start(self, now: float):
        self._t, self._n, self._steps, self._wait, self._outside = now, 0, 0, 0.0, 0.0

    def add(self, n: int, data_wait: float = 0.0):
        self._n += n
        self._steps += 1
        self._wait += data_wait

    @contextlib.contextmanager
    def outside(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self._outside += time.perf_counter() - began

    def report(self) -> dict:
        now = time.perf_counter()
        busy, steps = max(now - self._t - self._outside, 1e-9), max(self._steps, 1)
        out = {"perf/examples_per_sec": self._n / busy, "perf/step_seconds": busy / steps,
               "perf/data_wait_seconds": self._wait / steps}
        self._start(now)
        return out


class _QuietLibraries(pylogging.Filter):
    """Drop INFO lines of installed libraries (orbax logs every array it writes) but keep ours, also
    when retina_jax itself is installed under site-packages."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        path = record.pathname
        installed = "site-packages" in path or "dist-packages" in path
        return record.levelno >= pylogging.WARNING or not installed or f"{os.sep}retina_jax{os.sep}" in path


def quiet_library_logs() -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())


def progress_bar(enabled: bool, start: int, total: int):
    """A tqdm bar over the run's steps on process 0 (None when disabled or elsewhere)."""
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
