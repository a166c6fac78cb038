"""The one fine-tune of retina_jax (docs/methods.md, "FLAIR": Transfer protocols; "ViLReF":
Evaluation): a copy of the image tower plus a new linear head on its pre-projection feature, every
parameter trained, BatchNorm in train mode, AdamW, batches reshuffled every epoch with the last
partial batch kept, no augmentation. Both transfer evaluations use it:

- single-label (jusiro/FLAIR `flair/transferability/modeling/finetuning.py`, `FineTuning`, method
  "FT", with `main_transferability.py`'s defaults): softmax cross-entropy, a `Linear(F, C)` head with
  torch's default uniform init, lr 1e-4, eps 1e-4, torch's default weight decay 0.01 on every
  parameter, gradient clipping at global norm 1, batch size 4, up to 50 epochs, early stopping on
  the validation macro F1 (FLAIR's `freeze_weights` never matches its 'resnet_v1' tower, so nothing
  is frozen);
- multi-label (ViLReF's fine-tuned sigmoid heads): binary cross-entropy per finding, the head's bias
  starting at the train prior logit, early stopping on the validation macro AUC when a validation
  split is given, else the last epoch's weights.

Early stopping: after every epoch the validation score; the weights of the best epoch (strictly
better than every earlier one) are kept, training stops once `patience` epochs in a row have not
improved it, and the best weights are restored before testing. One difference from FLAIR: its best
score starts at 0, so a run whose validation F1 stays 0 has no best weights and crashes; here the
first epoch is always the first best.

The caller's variables are never modified: the step donates its own copy (FLAIR also deep-copies the
model; ViLReF's original fine-tunes the pretraining model in place, so whatever ran after it saw a
modified model: that bug is not reproduced).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from retina_jax.evals.adapters import torch_linear_init
from retina_jax.evals.metrics import classification_metrics, multilabel_metrics

FINETUNE_EPOCHS = 50
FINETUNE_LR = 1e-4
FINETUNE_BATCH_SIZE = 4
FINETUNE_PATIENCE = 10
FINETUNE_EPS = 1e-4
FINETUNE_WEIGHT_DECAY = 0.01
FINETUNE_GRAD_CLIP = 1.0


@dataclasses.dataclass
class FinetuneResult:
    test_probs: np.ndarray  # [N_test, C]: softmax (single-label) or sigmoids (multi-label) of the kept model
    history: list[dict]  # per epoch: epoch (1-based), train_loss, and val_score with a validation split
    best_epoch: int  # 1-based: the restored epoch (the last one without a validation split)
    variables: dict  # the kept model on the host: {'params': {'tower', 'head'}, 'batch_stats'}


def _check(name: str, images, y, num_classes: int, multilabel: bool) -> None:
    want = f"[N, {num_classes}] multi-hot labels" if multilabel else "[N] class ids"
    if np.ndim(y) != (2 if multilabel else 1) or len(images) != len(y) or (multilabel and np.shape(y)[1] != num_classes):
        raise ValueError(f"finetune {name}: images [N, ...] and {want} expected, got {np.shape(images)} and "
                         f"{np.shape(y)}")
    if not multilabel and len(y) and (np.min(y) < 0 or np.max(y) >= num_classes):
        raise ValueError(f"finetune {name}: class ids must lie in [0, {num_classes})")


def _optimizer(lr: float, weight_decay: float, grad_clip: float, eps: float) -> optax.GradientTransformation:
    adamw = optax.adamw(lr, eps=eps, weight_decay=weight_decay)
    return optax.chain(optax.clip_by_global_norm(grad_clip), adamw) if grad_clip > 0 else adamw


def _logits(params, stats, images, train: bool, apply_features):
    feats, new_stats = apply_features({"params": params["tower"], "batch_stats": stats}, images, train)
    logits = feats.astype(jnp.float32) @ params["head"]["w"] + params["head"]["b"]
    return logits, stats if new_stats is None else new_stats


def _loss(logits, y, multilabel: bool):
    if multilabel:
        return optax.sigmoid_binary_cross_entropy(logits, y).mean()
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# Module-level jits keyed on the (hashable) tower function and hyperparameters: every fold of one
# run reuses the same compilation.
@functools.partial(jax.jit, static_argnames=("apply_features", "lr", "weight_decay", "grad_clip", "eps", "multilabel"),
                   donate_argnums=(0, 1, 2))
def _step(params, stats, opt_state, images, y, *, apply_features, lr: float, weight_decay: float, grad_clip: float,
          eps: float, multilabel: bool):
    def loss_fn(params):
        logits, new_stats = _logits(params, stats, images, True, apply_features)
        return _loss(logits, y, multilabel), new_stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = _optimizer(lr, weight_decay, grad_clip, eps).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss


@functools.partial(jax.jit, static_argnames=("apply_features", "multilabel"))
def _predict(params, stats, images, apply_features, multilabel: bool):
    logits = _logits(params, stats, images, False, apply_features)[0]
    return jax.nn.sigmoid(logits) if multilabel else jax.nn.softmax(logits)


def _head(key, feature_dim: int, num_classes: int, train_y: np.ndarray, multilabel: bool) -> dict:
    if multilabel:
        # The bias starts at the (clipped) train prior logit: a finding with no positive in train only
        # has to keep pushing its bias, and the others start near their optimum.
        prior = np.clip(train_y.mean(axis=0), 1e-3, 1 - 1e-3)
        return {"w": 0.01 * jax.random.normal(key, (feature_dim, num_classes), jnp.float32),
                "b": jnp.asarray(np.log(prior / (1 - prior)), jnp.float32)}
    k_w, k_b = jax.random.split(key)
    return {"w": torch_linear_init(k_w, feature_dim, num_classes),
            "b": torch_linear_init(k_b, feature_dim, num_classes)[0]}  # torch's bias: U(+-1/sqrt(fan_in)) too


def finetune(apply_features: Callable, variables, train_images, train_y, val_images, val_y, test_images, *,
             num_classes: int, epochs: int = FINETUNE_EPOCHS, batch_size: int = FINETUNE_BATCH_SIZE,
             lr: float = FINETUNE_LR, weight_decay: float = FINETUNE_WEIGHT_DECAY,
             grad_clip: float = FINETUNE_GRAD_CLIP, eps: float = FINETUNE_EPS, patience: int = FINETUNE_PATIENCE,
             seed: int = 0, eval_batch_size: int = 64) -> FinetuneResult:
    """Fine-tune a copy of `variables` ({'params', 'batch_stats'}) of an image tower.

    `apply_features(variables, images, train) -> ([B, F] features, new batch_stats or None)`. Labels
    are class ids [N] (softmax head) or multi-hot [N, num_classes] (sigmoid heads); the validation
    split may be empty only for multi-label labels (then no early stopping). `grad_clip` 0 = none;
    `eps` is AdamW's (FLAIR's 1e-4; optax's default 1e-8 for ViLReF's multi-label heads).
    """
    multilabel = np.ndim(train_y) == 2
    _check("train", train_images, train_y, num_classes, multilabel)
    _check("val", val_images, val_y, num_classes, multilabel)
    if not len(val_y) and not multilabel:
        raise ValueError("finetune needs a non-empty validation split for early stopping (shots_val)")
    if not len(train_y):
        raise ValueError("finetune needs a non-empty train split (shots_train)")
    if epochs < 1 or patience < 1:
        raise ValueError(f"finetune needs epochs >= 1 and patience >= 1, got {epochs} and {patience}")
    train_y = np.asarray(train_y, np.float32 if multilabel else np.int32)
    feature_dim = jax.eval_shape(lambda v, x: apply_features(v, x, False)[0], variables, train_images[:1]).shape[-1]
    # Our own buffers, so the step may donate them while the caller's model stays intact and usable.
    owned = jax.tree.map(lambda a: jnp.array(a, copy=True), dict(variables))
    params = {"tower": owned["params"],
              "head": _head(jax.random.PRNGKey(seed), feature_dim, num_classes, train_y, multilabel)}
    stats = owned.get("batch_stats", {})
    opt_state = _optimizer(lr, weight_decay, grad_clip, eps).init(params)
    hyper = {"apply_features": apply_features, "lr": lr, "weight_decay": weight_decay, "grad_clip": grad_clip,
             "eps": eps, "multilabel": multilabel}

    def predict(params, stats, images) -> np.ndarray:
        out = []
        for start in range(0, len(images), eval_batch_size):
            chunk = np.asarray(images[start:start + eval_batch_size])
            # Zero-padded to one shape, so the prediction compiles once.
            padded = np.zeros((eval_batch_size, *chunk.shape[1:]), chunk.dtype)
            padded[:len(chunk)] = chunk
            out.append(np.asarray(_predict(params, stats, jnp.asarray(padded), apply_features, multilabel))[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, num_classes))

    def val_score(params, stats) -> float:
        probs = predict(params, stats, val_images)
        return multilabel_metrics(val_y, probs)["macro_auc"] if multilabel else classification_metrics(val_y, probs)["f1"]

    rng = np.random.default_rng(seed)
    history, best_score, best, best_epoch, since_best = [], -np.inf, None, 0, 0
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(train_y))
        losses = []
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            params, stats, opt_state, loss = _step(params, stats, opt_state, jnp.asarray(train_images[idx]),
                                                   jnp.asarray(train_y[idx]), **hyper)
            losses.append(loss)
        history.append({"epoch": epoch, "train_loss": float(np.mean(jax.device_get(losses)))})
        if not len(val_y):
            logging.info("finetune epoch %d/%d: train loss %.4f", epoch, epochs, history[-1]["train_loss"])
            continue
        score = history[-1]["val_score"] = val_score(params, stats)
        logging.info("finetune epoch %d/%d: train loss %.4f, validation %s %.4f", epoch, epochs,
                     history[-1]["train_loss"], "macro AUC" if multilabel else "macro F1", score)
        if score > best_score:
            best_score, since_best = score, 0
            # A host copy: on CPU a device_get may alias the buffers the next step donates.
            best = jax.tree.map(lambda a: np.array(a, copy=True), {"params": params, "batch_stats": stats})
            best_epoch = epoch
        else:
            since_best += 1
            if since_best >= patience:
                logging.info("finetune: no validation improvement for %d epochs, stopping at epoch %d", patience, epoch)
                break
    if best is None:  # no validation split: the last epoch's weights
        best, best_epoch = jax.tree.map(np.asarray, {"params": params, "batch_stats": stats}), len(history)
    params, stats = jax.tree.map(jnp.asarray, best["params"]), jax.tree.map(jnp.asarray, best["batch_stats"])
    return FinetuneResult(test_probs=predict(params, stats, test_images), history=history, best_epoch=best_epoch,
                          variables={"params": best["params"], "batch_stats": best["batch_stats"]})
