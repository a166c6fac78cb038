"""Demo training throughput of this checkout against an earlier commit, paired (issue 19, item 4).

Each demo config runs `--epochs` epochs at the earlier commit (a `git worktree`, sharing this
checkout's .venv) and here, alternately, `--repeats` times each, on the same machine. The figure is
each run's steady-state throughput, read from its own metrics.jsonl the same way at both commits
(examples between the second and the last logged row over the wall time between them, so
compilation, the tokenizer, drawing the render cache and the final checkpoint are outside it),
and the ratio of the medians.

With `--pipeline`, the figure is instead the input pipeline's host time per batch of 64 (the
demo's own source, transform and collation, in one process on one core, no step beside it) in
its first pass over 1,280 examples and in the next two (when every report and prompt has been seen
once), alternated between the two commits in the same way.

    python benchmarks/demo_speed.py --before b879028      # the commit before the render cache
    python benchmarks/demo_speed.py --before b4652dc --pipeline
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMOS = {"flair": "configs/flair.py:demo", "vilref_clip": "configs/vilref.py:stage=clip,demo"}


def throughput(metrics_path: str, batch_size: int) -> float:
    """Examples per second between the second and the last logged training row."""
    with open(metrics_path) as f:
        rows = [r for r in map(json.loads, f) if "train/loss" in r]
    if len(rows) < 3:
        raise SystemExit(f"demo_speed: {metrics_path} has {len(rows)} training rows; run more epochs")
    first, last = rows[1], rows[-1]
    return (last["step"] - first["step"]) * batch_size / (last["time"] - first["time"])


def run(checkout: str, config: str, epochs: float, workdir: str) -> float:
    cmd = [sys.executable, "-m", "retina_jax.main", f"--config={config}", f"--workdir={workdir}",
           f"--config.train.epochs={epochs}"]
    done = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"demo_speed: {' '.join(cmd)} in {checkout} failed:\n{done.stderr[-3000:]}")
    return throughput(os.path.join(workdir, "metrics.jsonl"), 64)


# Run in each checkout (cwd), so it imports that commit's retina_jax; prints one JSON line.
PIPELINE_CODE = """
import json, sys, tempfile, time
import numpy as np
from retina_jax import config as config_lib
from retina_jax.data import pipeline
from retina_jax.train import Trainer
config = config_lib.override(config_lib.load(sys.argv[1]), {"data.worker_count": 0, "train.progress": False})
trainer = Trainer(config, tempfile.mkdtemp())
source, transform = pipeline.synthetic_source(config), pipeline.train_transform(config)
collate = pipeline.Collate(trainer.method.tokenize)
source[0]
passes = []
for _ in range(3):
    began = time.perf_counter()
    for b in range(20):
        collate([transform(source[i], np.random.default_rng(i)) for i in range(64 * b, 64 * b + 64)])
    passes.append((time.perf_counter() - began) / 20)
print(json.dumps(passes))
"""


def pipeline_cost(checkout: str, config: str) -> list[float]:
    """Seconds per batch of the demo's input pipeline in passes 1, 2 and 3 over the same examples."""
    path, _, arg = config.partition(":")
    done = subprocess.run([sys.executable, "-c", PIPELINE_CODE, f"{os.path.join(checkout, path)}:{arg}"], cwd=checkout,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": checkout})
    if done.returncode != 0:
        raise SystemExit(f"demo_speed: the pipeline measurement in {checkout} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="the earlier commit")
    parser.add_argument("--demos", default=",".join(DEMOS), help="comma-separated, from " + ", ".join(DEMOS))
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pipeline", action="store_true", help="time the input pipeline alone (module docstring)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        before = os.path.join(tmp, "before")
        subprocess.run(["git", "worktree", "add", "--detach", before, args.before], cwd=REPO, check=True,
                       capture_output=True)
        try:
            for demo in args.demos.split(","):
                if args.pipeline:
                    compare_pipelines(demo, args, before)
                    continue
                figures = {"before": [], "here": []}
                for i in range(args.repeats):
                    for side, checkout in (("before", before), ("here", REPO)):
                        workdir = os.path.join(tmp, f"{demo}_{side}_{i}")
                        figures[side].append(run(checkout, DEMOS[demo], args.epochs, workdir))
                        print(f"{demo} {side} run {i}: {figures[side][-1]:.1f} examples/s", flush=True)
                b, h = statistics.median(figures["before"]), statistics.median(figures["here"])
                print(f"{demo}: {args.before} {b:.1f} examples/s, here {h:.1f} examples/s, x{h / b:.2f}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", before], cwd=REPO, capture_output=True)


def compare_pipelines(demo: str, args, before: str) -> None:
    figures = {"before": [], "here": []}
    for i in range(args.repeats):
        for side, checkout in (("before", before), ("here", REPO)):
            figures[side].append(pipeline_cost(checkout, DEMOS[demo]))
            print(f"{demo} {side} run {i}: " + ", ".join(f"pass {p + 1} {1e3 * t:.1f} ms" for p, t in
                                                          enumerate(figures[side][-1])) + " a batch", flush=True)
    for p, name in ((0, "first pass"), (2, "third pass")):
        b = statistics.median(r[p] for r in figures["before"])
        h = statistics.median(r[p] for r in figures["here"])
        print(f"{demo} pipeline, {name}: {args.before} {1e3 * b:.1f} ms a batch, here {1e3 * h:.1f} ms, x{b / h:.2f} "
              "as fast", flush=True)


if __name__ == "__main__":
    main()
