"""Golden train steps: the numbers every method's first steps produced before the trainer was split
into methods and evaluators (docs/architecture.md), so the move is shown to change none of them.

Each case trains a tiny config for 3 steps on 8 fake CPU devices through the public entry point
(`Trainer(config, workdir).train()`) and records every logged training metric of every step (timers
left out) and, per tree of the final checkpoint, the float64 sum and sum of squares of its leaves.
`python tests/golden_steps.py` (from the repository root) records them into
tests/data/golden_steps.json with the commit they came from; tests/test_golden_steps.py compares.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":
    sys.path.insert(0, HERE)
    import conftest  # noqa: F401  8 fake devices and the test caches, before jax is imported

import jax  # noqa: E402
import numpy as np  # noqa: E402
from test_keepfit import tiny_keepfit  # noqa: E402
from test_keepfit_v2 import STAGE_TEXT_TINY, STAGE_VL_TINY, V2  # noqa: E402
from test_train import read_metrics, tiny_config  # noqa: E402
from test_vilref import VILREF, TINY_RUN, tiny_vilref  # noqa: E402

from retina_jax import config as config_lib  # noqa: E402

GOLDEN = os.path.join(HERE, "data", "golden_steps.json")
# The recording predates the packed dropout draw: its masks are flax's (model.txt.dropout_draw).
STEPS = {"model.txt.dropout_draw": "flax", "train.log_every": 1, "train.checkpoint_every": 100, "train.eval_at_end": False, "train.async_checkpoint": False}


def cases() -> dict:
    v2_text = config_lib.override(config_lib.load(f"{V2}:stage=text,demo"), STAGE_TEXT_TINY)
    v2_vl = config_lib.override(config_lib.load(f"{V2}:stage=vl,demo"), {**STAGE_VL_TINY, "model_init": "", "model_init_trees": (),
                                                                             "text.tokenizer": "learn"})
    clip = config_lib.override(config_lib.load(f"{VILREF}:stage=clip,demo"), TINY_RUN)
    return {
        # 64 examples / 16 = 4 steps per epoch; 0.75 epochs = 3 steps.
        "flair": config_lib.override(tiny_config(), {**STEPS, "train.epochs": 0.75}),
        "flair_clip_loss": config_lib.override(tiny_config(**{"loss.name": "clip"}), {**STEPS, "train.epochs": 0.75}),
        "keepfit": config_lib.override(tiny_keepfit(), {**STEPS, "train.epochs": 0.75}),
        "keepfit_v2_text": config_lib.override(v2_text, {**STEPS, "train.epochs": 0.75}),
        "keepfit_v2_vl": config_lib.override(v2_vl, {**STEPS, "train.epochs": 0.75}),
        "vilref_clip": config_lib.override(clip, {**STEPS, "train.epochs": 0.75}),
        "vilref": config_lib.override(tiny_vilref(), {**STEPS, "train.epochs": 0.75}),
        "vilref_distill_online_keys_clamp_after": config_lib.override(tiny_vilref(**{
            "loss.wscl.alpha": 0.4, "momentum.key_features": "online", "model.logit_scale_clamp": "after_step",
            "loss.wscl.coupling": "log"}), {**STEPS, "train.epochs": 0.75}),
        "vilref_late_queue": config_lib.override(tiny_vilref(**{"momentum.queue_start_step": 2}),
                                                 {**STEPS, "train.epochs": 0.75}),
        "vilref_no_momentum": config_lib.override(tiny_vilref(**{
            "momentum.enabled": False, "momentum.key_features": "online", "momentum.queue_size": 0}),
            {**STEPS, "train.epochs": 0.75}),
    }


def _tree_sums(tree) -> dict:
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(tree)):
        a = np.asarray(leaf)
        if a.dtype == bool or np.issubdtype(a.dtype, np.integer) or a.dtype.kind == "V":
            a = a.astype(np.float64) if a.dtype.kind != "V" else np.zeros(())
        # The element count (not recorded) scales the comparison's tolerance for the sum.
        out[jax.tree_util.keystr(path)] = [float(np.sum(a, dtype=np.float64)),
                                           float(np.sum(np.square(a, dtype=np.float64))), int(a.size)]
    return out


def run_case(config, workdir: str) -> dict:
    from retina_jax.train import Trainer
    trainer = Trainer(config, workdir)
    trainer.train()
    rows = [{k: v for k, v in r.items() if k == "step" or k.startswith("train/")}  # no timers, no wall clock
            for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
    state = trainer.restore_latest()
    trees = {name: _tree_sums(getattr(state, name)) for name in ("params", "batch_stats", "opt_state", "ema_params",
                                                                  "queues")}
    return {"rows": rows, "trees": trees}


def main():
    import tempfile
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    out = {"commit": commit, "cases": {}}
    for name, config in cases().items():
        print(f"recording {name}", flush=True)
        with tempfile.TemporaryDirectory() as d:
            out["cases"][name] = run_case(config, d)
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
    print(f"wrote {GOLDEN} ({len(out['cases'])} cases, commit {commit[:8]})")


if __name__ == "__main__":
    main()
