"""The PNG plots every run writes at its end (docs/usage.md, "Run directories"), drawn from its
`metrics.jsonl` alone, so they can be redrawn for any run directory:

- `training_curves.png`: the loss and each of its terms, the learning rate, the logit scale
  (exp of the temperature parameter) and throughput (examples per second; the seconds a step took
  and waited for data), against the step;
- `eval_figures.png`: one panel per evaluation (`eval/<name>/<metric>`), each metric against the
  step at which it was measured, its value written beside every point.
"""
from __future__ import annotations

import os

from retina_jax.metric_writer import read

CURVES, EVALS = "training_curves.png", "eval_figures.png"
# Figures of an evaluation that are counts or spreads, not results: left out of its panel.
_NOT_FIGURES = ("num_", "_std", "iterations", "seconds")


def curve_panels(rows: list[dict]) -> dict[str, list[str]]:
    """Panel title -> the metric keys it draws, for the keys present in `rows` (empty panels left out)."""
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    panels = {"loss": [k for k in keys if k == "train/loss" or k.startswith("train/loss_")],
              "learning rate": [k for k in keys if k == "train/lr"],
              "logit scale": [k for k in keys if k == "train/logit_scale"],
              "examples per second": [k for k in keys if k == "perf/examples_per_sec"],
              "seconds per step": [k for k in keys if k in ("perf/step_seconds", "perf/data_wait_seconds")]}
    return {title: ks for title, ks in panels.items() if ks}


def eval_panels(rows: list[dict]) -> dict[str, list[str]]:
    """Evaluation name -> its figure keys (`eval/<name>/<metric>`, counts and spreads left out)."""
    panels: dict[str, list[str]] = {}
    for key in sorted({k for r in rows for k, v in r.items() if k.startswith("eval/") and isinstance(v, float)}):
        _, name, metric = key.split("/", 2)
        if not any(part in metric for part in _NOT_FIGURES):
            panels.setdefault(name, []).append(key)
    return panels


def _figure(panels: dict[str, list[str]], rows: list[dict], path: str, annotate: bool) -> str:
    # A bare Figure (no pyplot): drawn off-screen without changing a notebook's backend.
    from matplotlib.figure import Figure

    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig = Figure(figsize=(5 * cols, 3.4 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels.items()):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if annotate or len(points) < 3 else None, markersize=4,
                    label=key.rsplit("/", 1)[-1])
            if annotate:
                for step, value in points:
                    ax.annotate(f"{value:.3f}", (step, value), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def report(workdir: str) -> None:
    """On process 0: write the run's plots and print where they and its TensorBoard logs are."""
    import jax
    if jax.process_index() != 0:
        return
    for name, path in plot_run(workdir).items():
        print(f"{name.replace('_', ' ')}: {path}")
    print(f"TensorBoard: tensorboard --logdir {os.path.join(workdir, 'tensorboard')}")


def plot_run(workdir: str) -> dict[str, str]:
    """Write the run's PNGs; returns {'training_curves': path, 'eval_figures': path} for those written
    ({} when the run logged nothing yet)."""
    path = os.path.join(workdir, "metrics.jsonl")
    rows = read(path) if os.path.isfile(path) else []
    out = {}
    train = [r for r in rows if "train/loss" in r or "perf/examples_per_sec" in r]
    if train and (panels := curve_panels(train)):
        out["training_curves"] = _figure(panels, train, os.path.join(workdir, CURVES), annotate=False)
    if panels := eval_panels(rows):
        out["eval_figures"] = _figure(panels, rows, os.path.join(workdir, EVALS), annotate=True)
    return out
