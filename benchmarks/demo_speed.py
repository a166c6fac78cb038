"""Demo training throughput of this checkout against an earlier commit, paired (issue 19, item 4).

Each demo config runs `--epochs` epochs at the earlier commit (a `git worktree`, sharing this
checkout's .venv) and here, alternately, `--repeats` times each, on the same machine. The figure is
each run's steady-state throughput, read from its own metrics.jsonl the same way at both commits
(examples between the second and the last logged row over the wall time between them, so
compilation, the tokenizer, drawing the render cache and the final checkpoint are outside it),
and the ratio of the medians.

    python benchmarks/demo_speed.py --before b879028      # the commit before the render cache
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="the earlier commit")
    parser.add_argument("--demos", default=",".join(DEMOS), help="comma-separated, from " + ", ".join(DEMOS))
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        before = os.path.join(tmp, "before")
        subprocess.run(["git", "worktree", "add", "--detach", before, args.before], cwd=REPO, check=True,
                       capture_output=True)
        try:
            for demo in args.demos.split(","):
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


if __name__ == "__main__":
    main()
