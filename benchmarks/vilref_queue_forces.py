"""Why the momentum queue fails from random init (docs/methods.md, "ViLReF"; issue 4's ablation).

Runs `wscl` and `wscl_queue` of benchmarks/vilref_ablation.py from the same init and data order
and, before every step, splits the WSCL gradient on the online query features by key:

  g_i = 0.5 / B * sum_k (p_ik - [k = i]) * s * W_ik * key_k      (one direction; keys constant)

(total) into the part from the in-batch keys and the part from the queue keys, keeping only each g_i's
component tangent to the unit sphere at q_i (the radial part is removed by the normalisation).
For each part it reports the norm and the COMMON-MODE fraction B * |mean_i g_i|^2 / sum_i |g_i|^2:
1 when the force moves every example the same way (a drift of the whole feature set), ~1/B when it
separates examples. Also logged: the queue's share of the softmax mass, and the norm of the
batch-mean image embedding (1.0 = every image has the same embedding: collapse).

  python benchmarks/vilref_queue_forces.py --steps 64 --out workdirs/vilref_queue_forces
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np
from absl import flags, logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vilref_ablation import REPO, SCRATCH, VARIANTS, parse_sets  # noqa: E402  (the same variants and schedule)

from retina_jax import config as config_lib, losses  # noqa: E402
from retina_jax.data import pipeline  # noqa: E402
from retina_jax.train import Trainer  # noqa: E402


def _label_cosine(y, yk):
    ny, nk = np.linalg.norm(y, axis=1), np.linalg.norm(yk, axis=1)
    denom = ny[:, None] * nk[None, :]
    return np.where(denom > 0, y @ yk.T / np.where(denom > 0, denom, 1.0), 0.0)


def _common_mode(g: np.ndarray) -> float:
    total = float(np.sum(g * g))
    return float(len(g) * np.sum(g.mean(axis=0) ** 2) / total) if total > 0 else 0.0


def forces(queries, keys, label_sim, valid, s, batch):
    """Tangent gradient parts of one WSCL direction ('similarity' coupling) -> dict of figures."""
    b, k = queries.shape[0], keys.shape[0]
    pos = np.eye(b, k, dtype=bool)
    w = np.where(pos, 1.0, 1.0 - label_sim)
    drop = ((label_sim >= 1 - 1e-6) & ~pos) | ~valid[None, :]
    z = np.where(drop, -np.inf, s * w * (queries @ keys.T))
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    coef = 0.5 / b * (p - pos) * s * w  # [B, K]
    out = {"queue_mass": float(p[:, batch:].sum(axis=1).mean())}
    for name, cols in (("total", slice(0, k)), ("inbatch", slice(0, batch)), ("queue", slice(batch, k))):
        g = coef[:, cols] @ keys[cols]
        g = g - np.sum(g * queries, axis=1, keepdims=True) * queries  # tangent to the sphere at q_i
        out[f"{name}_norm"] = float(np.linalg.norm(g))
        out[f"{name}_common"] = _common_mode(g)
    return out


def run(variant: str, steps: int, common: dict, workdir: str) -> list[dict]:
    # The ablation's `--start scratch` protocol: random init, lr 1e-3, 192 steps.
    config = config_lib.load(os.path.join(REPO, "configs", "vilref.py") + ":demo")
    config_lib.override(config, {"data.synthetic.comorbidity_prob": 0.0, "train.progress": False,
                                 **SCRATCH, **VARIANTS[variant], **common})
    trainer = Trainer(config, workdir)
    state = trainer.init_state()
    decay = config.momentum.decay

    def features(state, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def forward(params, key):
            return trainer.model.apply({"params": params, "batch_stats": state.batch_stats}, batch["image"],
                                       batch["input_ids"], batch["attention_mask"], train=True,
                                       rngs={"dropout": key}, mutable=["batch_stats"])[0]

        out = forward(state.params, rng)
        if not config.momentum.enabled:
            return out, out
        # The step's own order: EMA update first, then the momentum forward (train.py).
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, state.params)
        return out, forward(ema, jax.random.fold_in(rng, 1))

    features = jax.jit(features)
    rows = []
    batches = iter(pipeline.train_dataset(trainer.config, trainer.tokenize))
    for step in range(steps):
        batch = pipeline.make_global(next(batches), trainer.batch_sharding)
        out, mom = jax.device_get(features(state, batch))
        labels = np.asarray(batch["labels"], np.float64)
        b = len(labels)
        zimg, ztxt = np.asarray(out["zimg"], np.float64), np.asarray(out["ztxt"], np.float64)
        keys_img, keys_txt = (np.asarray(mom["zimg"], np.float64), np.asarray(mom["ztxt"], np.float64)) \
            if config.momentum.key_features == "momentum" else (zimg, ztxt)
        key_labels, valid = labels, np.ones(b, bool)
        if config.momentum.queue_size:
            q = jax.device_get(state.queues)
            keys_img, keys_txt = np.concatenate([keys_img, q.img]), np.concatenate([keys_txt, q.txt])
            key_labels, valid = np.concatenate([labels, q.labels]), np.concatenate([valid, q.valid])
        label_sim = _label_cosine(labels, key_labels)
        s = float(np.exp(np.clip(jax.device_get(state.params["logit_scale"]), 0, losses.LOGIT_SCALE_MAX)))
        i2t = forces(zimg, keys_txt, label_sim, valid, s, b)
        state, metrics = trainer.train_step(state, batch)
        row = {"step": step + 1, "loss": float(metrics["train/loss"]),
               "mean_embedding_norm": float(np.linalg.norm(zimg.mean(axis=0))), **i2t}
        rows.append(row)
        print(variant, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="workdirs/vilref_queue_forces")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--variants", default="wscl,wscl_queue")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args()
    common = parse_sets(parser, args.set)
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    logging.set_verbosity(logging.WARNING)
    results = {v: run(v, args.steps, common, os.path.join(args.out, v)) for v in args.variants.split(",")}
    with open(os.path.join(args.out, "forces.json"), "w") as f:
        json.dump({"steps": args.steps, "set": common, "results": results}, f, indent=2)
    keys = ("loss", "mean_embedding_norm", "queue_mass", "total_norm", "total_common", "inbatch_norm",
            "inbatch_common", "queue_norm", "queue_common")
    print("| variant | steps | " + " | ".join(keys) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in keys) + " |")
    for variant, rows in results.items():
        for lo, hi in ((0, 8), (8, 16), (16, 32), (32, args.steps)):
            chunk = rows[lo:hi]
            if chunk:
                print(f"| {variant} | {lo + 1}-{hi} | "
                      + " | ".join(f"{np.mean([r[k] for r in chunk]):.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
