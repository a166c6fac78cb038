"""Multi-label transfer evaluation of ViLReF (docs/methods.md, "ViLReF").

A sigmoid head on the pre-projection image feature (768 ViT / 1024 RN50) is trained with BCE, either
on frozen features (`linear_probe`) or end to end with the image tower (`finetune`), and scored by
macro ROC AUC and mAP. `finetune` works on a copy of the variables: the original code fine-tunes the
pretraining model in place (a bug), so whatever ran after it saw a modified model.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from sklearn import metrics as skm


def multilabel_metrics(labels, scores) -> dict:
    """Macro AUC over classes with both positives and negatives; mAP over classes with a positive."""
    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    if labels.ndim != 2 or labels.shape != scores.shape:
        raise ValueError(f"labels and scores must both be [N, C], got {labels.shape} and {scores.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be multi-hot (0/1)")
    positives = labels.sum(axis=0)
    auc_classes = np.flatnonzero((positives > 0) & (positives < len(labels)))
    aucs = [skm.roc_auc_score(labels[:, c], scores[:, c]) for c in auc_classes]
    aps = [skm.average_precision_score(labels[:, c], scores[:, c]) for c in np.flatnonzero(positives)]
    return {"macro_auc": float(np.mean(aucs)) if aucs else float("nan"),
            "map": float(np.mean(aps)) if aps else float("nan"),
            "num_classes_scored": len(aucs), "num_examples": len(labels)}


def _check_pair(name: str, x, y) -> None:
    if np.ndim(y) != 2 or len(x) != len(y):
        raise ValueError(f"{name}: inputs [N, ...] and labels [N, C] expected, got {np.shape(x)} and {np.shape(y)}")


def _head(key, feature_dim: int, train_y: np.ndarray) -> dict:
    # The bias starts at the (clipped) train prior logit: the head of a class with no positive (or no
    # negative) in train then only has to keep pushing its bias, and the others start near their optimum.
    prior = np.clip(train_y.mean(axis=0), 1e-3, 1 - 1e-3)
    return {"w": 0.01 * jax.random.normal(key, (feature_dim, train_y.shape[1]), jnp.float32),
            "b": jnp.asarray(np.log(prior / (1 - prior)), jnp.float32)}


def linear_probe(train_x, train_y, test_x, test_y, *, l2: float = 1e-4, steps: int = 500, lr: float = 1e-2,
                 seed: int = 0, scores_out: dict | None = None) -> dict:
    """Full-batch Adam on BCE + l2 * mean_c ||w_c||^2 over frozen, train-standardised features.
    `scores_out`, when given, receives the test scores [N, C] under 'scores' (for the report's plots)."""
    _check_pair("train", train_x, train_y)
    _check_pair("test", test_x, test_y)
    train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
    train_y = np.asarray(train_y, np.float32)
    mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
    x, y = jnp.asarray((train_x - mean) / std), jnp.asarray(train_y)
    num_classes = train_y.shape[1]
    tx = optax.adam(lr)

    def bce(p):
        return optax.sigmoid_binary_cross_entropy(x @ p["w"] + p["b"], y).mean()

    def objective(p):
        # Divided by C so each class's problem (mean BCE + l2 ||w_c||^2) does not depend on C.
        return bce(p) + l2 * jnp.sum(p["w"] ** 2) / num_classes

    @jax.jit
    def fit(params):
        def step(carry, _):
            p, opt_state = carry
            updates, opt_state = tx.update(jax.grad(objective)(p), opt_state, p)
            return (optax.apply_updates(p, updates), opt_state), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), length=steps)
        return params, bce(params)

    params, loss = fit(_head(jax.random.PRNGKey(seed), x.shape[1], train_y))
    logging.info("linear probe: %d steps, final train BCE %.4f", steps, float(loss))
    logits = jnp.asarray((test_x - mean) / std) @ params["w"] + params["b"]
    scores = np.asarray(jax.nn.sigmoid(logits))
    if scores_out is not None:
        scores_out["scores"] = scores
    return {**multilabel_metrics(test_y, scores), "train_loss": float(loss)}


def finetune(apply_features: Callable, variables, train_images, train_y, test_images, test_y, *,
             feature_dim: int, steps: int = 200, batch_size: int = 32, lr: float = 1e-5,
             weight_decay: float = 1e-3, seed: int = 0, scores_out: dict | None = None) -> dict:
    """Fine-tunes the image tower and a sigmoid head with BCE (AdamW) on a copy of `variables`.

    `apply_features(variables, images, train) -> ([B, F] features, new batch_stats or None)`;
    `scores_out` as for `linear_probe`.
    """
    _check_pair("train", train_images, train_y)
    _check_pair("test", test_images, test_y)
    train_y = np.asarray(train_y, np.float32)
    # Our own buffers, so the step may donate them while the caller's model stays intact and usable.
    owned = jax.tree.map(lambda a: jnp.array(a, copy=True), dict(variables))
    params = {"tower": owned["params"], "head": _head(jax.random.PRNGKey(seed), feature_dim, train_y)}
    stats = owned.get("batch_stats", {})
    # No decay on biases and norm scales, as in pretraining.
    tx = optax.adamw(lr, weight_decay=weight_decay, mask=lambda p: jax.tree.map(lambda a: a.ndim > 1, p))
    opt_state = tx.init(params)

    def logits_fn(params, stats, images, train):
        feats, new_stats = apply_features({"params": params["tower"], "batch_stats": stats}, images, train)
        if feats.shape[-1] != feature_dim:
            raise ValueError(f"apply_features gave features {feats.shape}, expected [B, {feature_dim}]")
        logits = feats.astype(jnp.float32) @ params["head"]["w"] + params["head"]["b"]
        return logits, stats if new_stats is None else new_stats

    def loss_fn(params, stats, images, y):
        logits, stats = logits_fn(params, stats, images, True)
        return optax.sigmoid_binary_cross_entropy(logits, y).mean(), stats

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, stats, opt_state, images, y):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, images, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    rng = np.random.default_rng(seed)
    window = max(1, steps // 10)  # logging interval, and the "few steps" the first/last losses average
    losses = []
    for i in range(steps):
        idx = np.sort(rng.choice(len(train_y), size=min(batch_size, len(train_y)), replace=False))
        params, stats, opt_state, loss = step(params, stats, opt_state, jnp.asarray(train_images[idx]),
                                              jnp.asarray(train_y[idx]))
        losses.append(loss)
        if (i + 1) % window == 0:
            logging.info("finetune step %d/%d: train BCE %.4f", i + 1, steps, float(loss))
    losses = np.asarray(jax.device_get(losses), np.float64)

    predict = jax.jit(lambda params, stats, images: jax.nn.sigmoid(logits_fn(params, stats, images, False)[0]))
    scores = np.concatenate([np.asarray(predict(params, stats, jnp.asarray(test_images[i:i + batch_size])))
                             for i in range(0, len(test_images), batch_size)])
    if scores_out is not None:
        scores_out["scores"] = scores
    return {**multilabel_metrics(test_y, scores), "train_loss_first": float(losses[:window].mean()),
            "train_loss_last": float(losses[-window:].mean())}
