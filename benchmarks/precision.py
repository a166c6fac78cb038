"""bfloat16 compute against float32 (and rematerialisation) on the ViLReF demo.

`model.compute_dtype='bfloat16'` runs the towers' activations and matmuls in bf16 while the
parameters, optimizer state, embeddings, logits and losses stay float32 (configs/common.py). This
runs the ViLReF demo's WSCL from random init with online keys and no queue (`configs/vilref.py:demo`
as it was when these figures were recorded: 192 steps at lr 1e-3, scaled by `--steps-scale`) once
per variant, same seed and data order, and reports

- the training loss of each variant at every logged step and its largest relative difference
  from the float32 run (the tolerance tests/test_sharding.py asserts on the tiny run),
- the final zero-shot (ACA, AUC) and linear-probe (macro AUC) figures,
- seconds per run (on CPU, bf16 is emulated and slower: the speed figure that matters is the GPU's).

  python benchmarks/precision.py --workdir workdirs/precision
  python benchmarks/precision.py --variants float32,bfloat16,float32_remat
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np
from absl import flags, logging

from retina_jax import config as config_lib
from retina_jax.metric_writer import read as read_metrics
from retina_jax.train import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "float32": {},
    "bfloat16": {"model.compute_dtype": "bfloat16"},
    "float32_remat": {"model.remat": True},
}
REPORTED = ("aca", "auc", "linear_probe/macro_auc")
WSCL_FROM_SCRATCH = {"model_init": "", "text.tokenizer": "learn", "optim.lr": 1e-3, "optim.warmup_steps": 32,
                     "momentum.enabled": False, "momentum.key_features": "online", "momentum.queue_size": 0}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="workdirs/precision")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="scales the demo's 3 epochs")
    parser.add_argument("--variants", default="float32,bfloat16")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or names[0] != "float32":
        parser.error(f"--variants: {unknown or names} (known: {sorted(VARIANTS)}; float32 first, the reference)")
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    logging.set_verbosity(logging.WARNING)
    results, losses = {}, {}
    for name in names:
        config = config_lib.load(os.path.join(REPO, "configs", "vilref.py") + f":demo,steps_scale={args.steps_scale}")
        config_lib.override(config, {**WSCL_FROM_SCRATCH, **VARIANTS[name]})
        workdir = os.path.join(args.workdir, name)
        t0 = time.time()
        trainer = Trainer(config, workdir)
        result = trainer.train()
        rows = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
        losses[name] = np.asarray([r["train/loss"] for r in rows])
        results[name] = {**{k: result[k] for k in REPORTED}, "steps": trainer.total_steps,
                         "seconds": round(time.time() - t0, 1), "final_loss": float(losses[name][-1])}
        if name != "float32":
            rel = np.abs(losses[name] - losses["float32"]) / np.abs(losses["float32"])
            results[name].update(max_rel_loss_diff=float(rel.max()), mean_rel_loss_diff=float(rel.mean()))
        print(name, json.dumps(results[name]), flush=True)
    with open(os.path.join(args.workdir, "precision.json"), "w") as f:
        json.dump({"machine": platform.processor() or platform.machine(), "devices": jax.device_count(),
                   "backend": jax.default_backend(), "steps_scale": args.steps_scale, "results": results,
                   "losses": {k: v.tolist() for k, v in losses.items()}}, f, indent=2)
    print("| variant | steps | final loss | max rel. loss diff | mean rel. loss diff | zero-shot ACA | "
          "zero-shot AUC | probe macro AUC | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        diffs = " | ".join(f"{r[k]:.2e}" if k in r else "ref." for k in ("max_rel_loss_diff", "mean_rel_loss_diff"))
        print(f"| {name} | {r['steps']} | {r['final_loss']:.4f} | {diffs} | "
              + " | ".join(f"{r[k]:.3f}" for k in REPORTED) + f" | {r['seconds']} |")


if __name__ == "__main__":
    main()
