"""Full fine-tuning of the image tower with a linear softmax head and early stopping (docs/methods.md,
"FLAIR", Transfer protocols), as jusiro/FLAIR `flair/transferability/modeling/finetuning.py`
(`FineTuning`, method "FT") with `main_transferability.py`'s defaults:
- a copy of the tower plus a new `Linear(F, C)` head (torch's default uniform init) on the
  pre-projection feature, every parameter trained (FLAIR's `freeze_weights` never matches its
  'resnet_v1' tower, so nothing is frozen), BatchNorm in train mode (`update_bn=True`);
- softmax cross-entropy, AdamW lr 1e-4 (eps 1e-4, torch's default weight decay 0.01 on every
  parameter), gradient clipping at global norm 1, batch size 4 reshuffled every epoch with the last
  partial batch kept, no augmentation (`fta=False`), up to 50 epochs;
- after every epoch the macro F1 on the validation split; the weights of the best epoch (strictly
  better than every earlier one) are kept, training stops once `patience` (10) epochs in a row have
  not improved it, and the best weights are restored before testing.
One difference: FLAIR's best score starts at 0, so a run whose validation F1 stays 0 has no best
weights and crashes; here the first epoch is always the first best.

The caller's variables are never modified: the step donates its own copy (the original also
deep-copies the model, unlike ViLReF's multi-label fine-tuning; docs/methods.md, "ViLReF").
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
from retina_jax.evals.metrics import classification_metrics

FINETUNE_EPOCHS = 50
FINETUNE_LR = 1e-4
FINETUNE_BATCH_SIZE = 4
FINETUNE_PATIENCE = 10
FINETUNE_EPS = 1e-4
FINETUNE_WEIGHT_DECAY = 0.01
FINETUNE_GRAD_CLIP = 1.0


@dataclasses.dataclass
class FinetuneResult:
    test_probs: np.ndarray  # [N_test, C] softmax of the restored best model
    history: list[dict]  # per epoch: epoch (1-based), train_loss, val_f1
    best_epoch: int  # 1-based
    variables: dict  # the restored model on the host: {'params': {'tower', 'head'}, 'batch_stats'}


def _check(name: str, images, y, num_classes: int) -> None:
    if np.ndim(y) != 1 or len(images) != len(y):
        raise ValueError(f"finetune {name}: images [N, ...] and class ids [N] expected, got {np.shape(images)} "
                         f"and {np.shape(y)}")
    if len(y) and (np.min(y) < 0 or np.max(y) >= num_classes):
        raise ValueError(f"finetune {name}: class ids must lie in [0, {num_classes})")


def _optimizer(lr: float, weight_decay: float) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(FINETUNE_GRAD_CLIP),
                       optax.adamw(lr, eps=FINETUNE_EPS, weight_decay=weight_decay))


def _logits(params, stats, images, train: bool, apply_features):
    feats, new_stats = apply_features({"params": params["tower"], "batch_stats": stats}, images, train)
    logits = feats.astype(jnp.float32) @ params["head"]["w"] + params["head"]["b"]
    return logits, stats if new_stats is None else new_stats


# Module-level jits keyed on the (hashable) tower function and hyperparameters: every fold of one
# run reuses the same compilation.
@functools.partial(jax.jit, static_argnames=("apply_features", "lr", "weight_decay"), donate_argnums=(0, 1, 2))
def _step(params, stats, opt_state, images, y, *, apply_features, lr: float, weight_decay: float):
    def loss_fn(params):
        logits, new_stats = _logits(params, stats, images, True, apply_features)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = _optimizer(lr, weight_decay).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss


@functools.partial(jax.jit, static_argnames=("apply_features",))
def _predict(params, stats, images, apply_features):
    return jax.nn.softmax(_logits(params, stats, images, False, apply_features)[0])


def finetune(apply_features: Callable, variables, train_images, train_y, val_images, val_y, test_images, *,
             num_classes: int, epochs: int = FINETUNE_EPOCHS, batch_size: int = FINETUNE_BATCH_SIZE,
             lr: float = FINETUNE_LR, weight_decay: float = FINETUNE_WEIGHT_DECAY,
             patience: int = FINETUNE_PATIENCE, seed: int = 0, eval_batch_size: int = 64) -> FinetuneResult:
    """Fine-tune a copy of `variables` ({'params', 'batch_stats'}) of an image tower.

    `apply_features(variables, images, train) -> ([B, F] features, new batch_stats or None)`.
    """
    _check("train", train_images, train_y, num_classes)
    _check("val", val_images, val_y, num_classes)
    if not len(val_y):
        raise ValueError("finetune needs a non-empty validation split for early stopping (shots_val)")
    if not len(train_y):
        raise ValueError("finetune needs a non-empty train split (shots_train)")
    if epochs < 1 or patience < 1:
        raise ValueError(f"finetune needs epochs >= 1 and patience >= 1, got {epochs} and {patience}")
    train_y = np.asarray(train_y, np.int32)
    feature_dim = jax.eval_shape(lambda v, x: apply_features(v, x, False)[0], variables, train_images[:1]).shape[-1]
    # Our own buffers, so the step may donate them while the caller's model stays intact and usable.
    owned = jax.tree.map(lambda a: jnp.array(a, copy=True), dict(variables))
    k_w, k_b = jax.random.split(jax.random.PRNGKey(seed))
    head = {"w": torch_linear_init(k_w, feature_dim, num_classes),
            "b": torch_linear_init(k_b, feature_dim, num_classes)[0]}  # torch's bias: U(+-1/sqrt(fan_in)) too
    params = {"tower": owned["params"], "head": head}
    stats = owned.get("batch_stats", {})
    opt_state = _optimizer(lr, weight_decay).init(params)
    hyper = {"apply_features": apply_features, "lr": lr, "weight_decay": weight_decay}

    def predict(params, stats, images) -> np.ndarray:
        out = []
        for start in range(0, len(images), eval_batch_size):
            chunk = np.asarray(images[start:start + eval_batch_size])
            # Zero-padded to one shape, so the prediction compiles once.
            padded = np.zeros((eval_batch_size, *chunk.shape[1:]), chunk.dtype)
            padded[:len(chunk)] = chunk
            out.append(np.asarray(_predict(params, stats, jnp.asarray(padded), apply_features))[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, num_classes))

    rng = np.random.default_rng(seed)
    history, best_f1, best, best_epoch, since_best = [], -np.inf, None, 0, 0
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(train_y))
        losses = []
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            params, stats, opt_state, loss = _step(params, stats, opt_state, jnp.asarray(train_images[idx]),
                                                   jnp.asarray(train_y[idx]), **hyper)
            losses.append(loss)
        val_f1 = classification_metrics(val_y, predict(params, stats, val_images))["f1"]
        history.append({"epoch": epoch, "train_loss": float(np.mean(jax.device_get(losses))), "val_f1": val_f1})
        logging.info("finetune epoch %d/%d: train CE %.4f, val macro F1 %.4f", epoch, epochs,
                     history[-1]["train_loss"], val_f1)
        if val_f1 > best_f1:
            best_f1, since_best = val_f1, 0
            # A host copy: on CPU a device_get may alias the buffers the next step donates.
            best = jax.tree.map(lambda a: np.array(a, copy=True), {"params": params, "batch_stats": stats})
            best_epoch = epoch
        else:
            since_best += 1
            if since_best >= patience:
                logging.info("finetune: no validation improvement for %d epochs, stopping at epoch %d", patience, epoch)
                break
    params, stats = jax.tree.map(jnp.asarray, best["params"]), jax.tree.map(jnp.asarray, best["batch_stats"])
    return FinetuneResult(test_probs=predict(params, stats, test_images), history=history, best_epoch=best_epoch,
                          variables={"params": best["params"], "batch_stats": best["batch_stats"]})
