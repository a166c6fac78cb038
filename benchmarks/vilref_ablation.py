"""ViLReF ablation on the synthetic corpus (METHODS.md section 4): CLIP vs WSCL vs WSCL + momentum queue.

The corpus is drawn with many shared label sets (no comorbidity, so every batch holds several
images with identical findings: CLIP's false negatives). Every variant is the ViLReF demo
(`configs/vilref.py:demo`: same towers, data order, seed and number of steps) and differs only in:

  clip         CLIP InfoNCE on image-report pairs (online keys, no momentum model, no queue)
  wscl         WSCL (label-dissimilarity weights, false negatives removed), online keys, no queue
  wscl_queue   WSCL with momentum encoders (m 0.95) and a 512-entry queue of momentum features:
               the in-batch keys are the momentum features too (ALBEF; ViLReF's default)
  wscl_queue_online_keys   the same, with the online features as the in-batch keys

Each reports the Chinese zero-shot figures on the held-out 6-class task and the multi-label linear
probe (macro AUC, mAP over the 17 findings) on the pre-projection feature.

  python benchmarks/vilref_ablation.py --workdir workdirs/vilref_ablation --steps-scale 0.5
  python benchmarks/vilref_ablation.py --workdir workdirs/vilref_ablation_lr1e-4 --variants wscl,wscl_queue \
      --set optim.lr=1e-4          # every variant with the same extra config values
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
from absl import flags, logging

from retina_jax import config as config_lib
from retina_jax.train import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUEUE = {"momentum.enabled": True, "momentum.decay": 0.95, "momentum.queue_size": 512}
VARIANTS = {
    "clip": {"loss.name": "clip"},
    "wscl": {},
    "wscl_queue": {**QUEUE, "momentum.key_features": "momentum"},
    "wscl_queue_online_keys": {**QUEUE, "momentum.key_features": "online"},
    "wscl_momentum_keys": {"momentum.enabled": True, "momentum.decay": 0.95, "momentum.key_features": "momentum"},
}
REPORTED = ("aca", "auc", "f1", "linear_probe/macro_auc", "linear_probe/map")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="workdirs/vilref_ablation")
    parser.add_argument("--steps-scale", type=float, default=0.5, help="scales the demo's 6 epochs")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a config value applied to every variant (floats and ints parsed), repeatable")
    args = parser.parse_args()
    common = parse_sets(parser, args.set)
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    logging.set_verbosity(logging.WARNING)
    results = {}
    for name in args.variants.split(","):
        config = config_lib.load(os.path.join(REPO, "configs", "vilref.py") + f":demo,steps_scale={args.steps_scale}")
        config_lib.override(config, {"data.synthetic.comorbidity_prob": 0.0, **VARIANTS[name], **common})
        t0 = time.time()
        trainer = Trainer(config, os.path.join(args.workdir, name))
        result = trainer.train()
        results[name] = {**{k: result[k] for k in REPORTED}, "steps": trainer.total_steps,
                         "seconds": round(time.time() - t0, 1)}
        print(name, json.dumps(results[name]), flush=True)
    with open(os.path.join(args.workdir, "ablation.json"), "w") as f:
        json.dump({"machine": platform.processor() or platform.machine(), "devices": jax.device_count(),
                   "steps_scale": args.steps_scale, "set": common, "results": results}, f, indent=2)
    print("| variant | steps | zero-shot ACA | zero-shot AUC | zero-shot F1 | probe macro AUC | probe mAP |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['steps']} | " + " | ".join(f"{r[k]:.3f}" for k in REPORTED) + " |")


def parse_sets(parser: argparse.ArgumentParser, items: list[str]) -> dict:
    """`--set FIELD=VALUE` items -> {field: value} (ints and floats parsed)."""
    common = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected FIELD=VALUE")
        common[field] = _number(value)
    return common


def _number(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


if __name__ == "__main__":
    main()
