"""ViLReF ablation on the synthetic corpus (docs/methods.md, "ViLReF"): CLIP vs WSCL vs WSCL + momentum queue.

The corpus is drawn with many shared label sets (no comorbidity, so every batch holds several
images with identical findings: CLIP's false negatives). Two protocols:

- `--start clip` (default, the paper's): stage `clip` (configs/vilref.py:stage=clip,demo, the
  Chinese-CLIP stand-in) is trained once into WORKDIR/clip, then every variant continues from that
  checkpoint with the demo's stage-`vilref` settings (lower learning rate, same steps) for each seed;
- `--start scratch`: every variant from random init at lr 1e-3 (the protocol of the first
  ablations in benchmarks/RESULTS.md, where the queue collapsed).

Variants differ only in:

  clip                     CLIP InfoNCE on image-report pairs (online keys, no momentum model, no queue)
  wscl                     WSCL (label-dissimilarity weights, false negatives removed), online keys, no queue
  wscl_queue               WSCL with momentum encoders and the 512-entry queue of momentum features,
                           momentum in-batch keys (ALBEF; ViLReF's default)
  wscl_momentum_keys       momentum encoders and momentum in-batch keys, no queue
  wscl_queue_online_keys   the queue with the online features as the in-batch keys

Each run reports the Chinese zero-shot figures on the held-out 6-class task, the multi-label linear
probe (macro AUC, mAP over the 17 findings) on the pre-projection feature, the end batch-mean
embedding norm (1 = every example the same vector: collapse), and the mean fractions of in-batch
and queue negatives dropped as false negatives. The corpus knows its true labels, so the script
also counts, over all pairs of training reports, the same-label pairs the extracted labels miss
and the pairs they wrongly merge. Seeds are summarised as mean +- std.

  python benchmarks/vilref_ablation.py --workdir workdirs/vilref_ablation_staged --seeds 0,1,2
  python benchmarks/vilref_ablation.py --start scratch --workdir workdirs/vilref_ablation --variants wscl,wscl_queue \
      --set optim.lr=2e-4          # every variant with the same extra config values
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import time

import jax
import numpy as np
from absl import flags, logging

from retina_jax import checkpointing, config as config_lib
from retina_jax.data import pipeline
from retina_jax.metric_writer import read as read_metrics
from retina_jax.train import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "vilref.py")
CORPUS = {"data.synthetic.comorbidity_prob": 0.0}
NO_MOMENTUM = {"momentum.enabled": False, "momentum.key_features": "online", "momentum.queue_size": 0}
QUEUE = {"momentum.enabled": True, "momentum.queue_size": 512}
VARIANTS = {
    "clip": {"loss.name": "clip", **NO_MOMENTUM},
    "wscl": NO_MOMENTUM,
    "wscl_queue": {**QUEUE, "momentum.key_features": "momentum"},
    "wscl_momentum_keys": {"momentum.enabled": True, "momentum.queue_size": 0, "momentum.key_features": "momentum"},
    "wscl_queue_online_keys": {**QUEUE, "momentum.key_features": "online"},
}
# From random init (`--start scratch`): no model_init, a vocabulary of the run's own, the rate and
# momentum of the first ablations.
SCRATCH = {"model_init": "", "text.tokenizer": "learn", "optim.lr": 1e-3, "optim.warmup_steps": 32,
           "momentum.decay": 0.95}
REPORTED = ("aca", "auc", "f1", "linear_probe/macro_auc", "linear_probe/map", "mean_norm_img", "mean_norm_txt",
            "false_neg_batch", "false_neg_queue")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="workdirs/vilref_ablation_staged")
    parser.add_argument("--start", choices=("clip", "scratch"), default="clip")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="scales the demo's stage epochs")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds of stage `vilref` (stage `clip`: seed 0)")
    parser.add_argument("--variants", default="clip,wscl,wscl_queue")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a config value applied to every variant (floats and ints parsed), repeatable")
    args = parser.parse_args()
    common = parse_sets(parser, args.set)
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    logging.set_verbosity(logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",")]
    clip_workdir = os.path.join(args.workdir, "clip")
    if args.start == "clip":
        train_stage_clip(clip_workdir, args.steps_scale)
    results = collections.defaultdict(dict)
    for name in args.variants.split(","):
        for seed in seeds:
            spec = f":demo,seed={seed},steps_scale={args.steps_scale},clip_workdir={clip_workdir}"
            config = config_lib.load(CONFIG + spec)
            start = SCRATCH if args.start == "scratch" else {}
            config_lib.override(config, {**CORPUS, **start, **VARIANTS[name], **common})
            t0 = time.time()
            trainer = Trainer(config, os.path.join(args.workdir, f"{name}_seed{seed}"))
            result = {**trainer.train(), **train_statistics(trainer.workdir)}
            results[name][seed] = {**{k: result[k] for k in REPORTED}, "steps": trainer.total_steps,
                                   "seconds": round(time.time() - t0, 1)}
            print(name, seed, json.dumps(results[name][seed]), flush=True)
    truth = label_truth(config)
    with open(os.path.join(args.workdir, "ablation.json"), "w") as f:
        json.dump({"machine": platform.processor() or platform.machine(), "devices": jax.device_count(),
                   "start": args.start, "steps_scale": args.steps_scale, "set": common, "results": results,
                   "label_truth": truth}, f, indent=2)
    print(f"| variant | steps | {' | '.join(REPORTED)} |")
    print("| --- " * (len(REPORTED) + 2) + "|")
    for name, by_seed in results.items():
        steps = next(iter(by_seed.values()))["steps"]
        cells = []
        for key in REPORTED:
            values = np.array([r[key] for r in by_seed.values()])
            cells.append(f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}")
        print(f"| {name} | {steps} | " + " | ".join(cells) + " |")
    print("label truth over all pairs of training reports:", json.dumps(truth))


def train_stage_clip(workdir: str, steps_scale: float):
    """Stage `clip` (seed 0) on the ablation's corpus, once: later calls reuse its checkpoint."""
    if os.path.isdir(checkpointing.checkpoint_dir(workdir)):
        mngr = checkpointing.manager(checkpointing.checkpoint_dir(workdir), read_only=True)
        done = mngr.latest_step()
        mngr.close()
        if done is not None:
            trainer = Trainer(stage_clip_config(steps_scale), workdir)
            if done >= trainer.total_steps:
                print(f"stage clip: reusing {workdir} (step {done})", flush=True)
                return
    t0 = time.time()
    result = Trainer(stage_clip_config(steps_scale), workdir).train()
    print("stage clip", json.dumps({k: result[k] for k in REPORTED[:5]}), f"{time.time() - t0:.0f} s", flush=True)


def stage_clip_config(steps_scale: float):
    return config_lib.override(config_lib.load(CONFIG + f":stage=clip,demo,steps_scale={steps_scale}"), CORPUS)


def train_statistics(workdir: str) -> dict:
    """The last logged batch-mean embedding norms and the mean false-negative fractions of a run."""
    rows = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
    stats = {"mean_norm_img": rows[-1]["train/mean_norm_img"], "mean_norm_txt": rows[-1]["train/mean_norm_txt"]}
    for key in ("false_neg_batch", "false_neg_queue"):
        # Queue figures only from the steps that read a queue (after momentum.queue_start_step).
        values = [r[f"train/wscl_{key}"] for r in rows if f"train/wscl_{key}" in r
                  and (key == "false_neg_batch" or r.get("train/queue_fill", 0) > 0)]
        stats[key] = float(np.mean(values)) if values else float("nan")
    return stats


def label_truth(config) -> dict:
    """Over all ordered pairs (i != j) of training reports: the fraction the extracted labels call
    false negatives (identical label sets), and the truly same-label pairs they miss or the
    different pairs they wrongly remove (the corpus's own labels are the truth)."""
    source = pipeline.synthetic_source(config)
    extractor = pipeline.label_extractor(config)
    language = config.data.reports.language
    pairs = collections.Counter()
    for i in range(len(source)):
        record = source.record(i)
        true = tuple(np.flatnonzero(record["labels"]))
        extracted = tuple(np.flatnonzero(extractor.extract(record[f"report_{language}"])))
        pairs[(true, extracted)] += 1
    n = sum(pairs.values())
    total = n * (n - 1)

    def same(key_index):
        groups = collections.Counter()
        for key, count in pairs.items():
            groups[key[key_index]] += count
        return sum(c * (c - 1) for c in groups.values())

    both = sum(c * (c - 1) for c in pairs.values())  # same true AND same extracted label set
    true_same, removed = same(0), same(1)
    return {"pairs": total, "removed_fraction": removed / total, "true_same_fraction": true_same / total,
            "missed": true_same - both, "wrongly_removed": removed - both}


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
