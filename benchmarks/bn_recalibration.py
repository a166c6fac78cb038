"""Zero-shot of a trained run before and after re-estimating BatchNorm statistics on public images.

KeepFIT updates BatchNorm with the public batch and then the expert batch every step (docs/methods.md,
"KeepFIT"). With KeepFIT V2's multi-modal expert set (CFP, FFA, OCT; "KeepFIT V2") the running
statistics the evaluation uses therefore mix colour photographs with grey angiograms and B-scans,
while the zero-shot task is colour photographs only. This measures how much of the zero-shot gap
that explains: the run's latest checkpoint is evaluated as it is, then with its running statistics
re-estimated from `--batches` public training batches (train-mode forward passes, BatchNorm's own
momentum; every other parameter unchanged). Like `retina_jax.evaluate`, the evaluations are also
written to the run's metrics and eval JSON files.

  python benchmarks/bn_recalibration.py --config configs/keepfit_v2.py:stage=vl,demo --workdir workdirs/keepfit_v2_demo
"""
from __future__ import annotations

import argparse
import json

import jax
from absl import flags, logging

from retina_jax import config as config_lib
from retina_jax.data import pipeline
from retina_jax.evals import base
from retina_jax.train import Trainer

REPORTED = ("aca", "auc", "kappa", "f1")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--batches", type=int, default=40, help="public batches for the re-estimate")
    parser.add_argument("--difficulty", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    logging.set_verbosity(logging.WARNING)
    config = config_lib.load(args.config)
    config.evals.captions.at_end = False
    trainer = Trainer(config, args.workdir)
    state = trainer.restore_latest()

    apply = jax.jit(lambda params, stats, image: trainer.model.apply(
        {"params": params, "batch_stats": stats}, image, method="encode_image", train=True,
        mutable=["batch_stats"])[1]["batch_stats"])
    stats = state.batch_stats
    data = iter(pipeline.train_dataset(config, trainer.tokenize))
    for _ in range(args.batches):
        batch = pipeline.make_global(next(data), trainer.batch_sharding)
        stats = apply(state.params, stats, batch["image"])
    recalibrated = state.replace(batch_stats=stats)

    rows = {}
    for difficulty in args.difficulty:
        config.heldout.conditions.difficulty = difficulty
        for name, s in (("as trained", state), ("public BN statistics", recalibrated)):
            result, _ = base.make(config, "zero_shot").run(trainer.encoder.at(s.params, s.batch_stats))
            rows[(difficulty, name)] = {k: round(result[k], 3) for k in REPORTED}
            print(difficulty, name, json.dumps(rows[(difficulty, name)]), flush=True)
    print("| held-out difficulty | BatchNorm statistics | " + " | ".join(REPORTED) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in REPORTED) + " |")
    for (difficulty, name), r in rows.items():
        print(f"| {difficulty} | {name} | " + " | ".join(f"{r[k]:.3f}" for k in REPORTED) + " |")


if __name__ == "__main__":
    main()
