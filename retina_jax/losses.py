"""Contrastive loss terms as pure functions on arrays.

- `clip_loss`: CLIP InfoNCE (identity targets), used by KeepFIT's expert stream (METHODS.md section 2).
- `flair_loss`: FLAIR's label-aware soft CLIP loss (METHODS.md section 1): rows/columns whose
  *original* category ids are equal are all positives, with the target spread uniformly over them.

Both take L2-normalised embeddings `zimg`, `ztxt` `[B, D]` and the stored log-temperature parameter
`logit_scale`. The losses are written on the global batch: under `jit` with a mesh, pass
`row_sharding` (rows over the batch axes) so each device holds only its `[B_local, B]` slice of
each logits matrix instead of the whole `[B, B]`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOGIT_SCALE_MAX = math.log(100.0)


def clamp_logit_scale(logit_scale: jax.Array) -> jax.Array:
    """Clamp the stored log-temperature to [0, ln 100] with an identity gradient.

    FLAIR clamps `logit_scale.data` in place before use, so autograd differentiates exp() at the
    clamped value with a full (not zeroed) gradient. The straight-through form reproduces that;
    `jnp.clip` would zero the gradient outside the range (and halve it on the boundary).
    """
    clipped = jnp.clip(logit_scale, 0.0, LOGIT_SCALE_MAX)
    return logit_scale + jax.lax.stop_gradient(clipped - logit_scale)


def _constrain(x: jax.Array, sharding) -> jax.Array:
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def soft_cross_entropy(logits: jax.Array, target: jax.Array) -> jax.Array:
    """mean over rows of -sum_j target[i, j] * log_softmax(logits)[i, j]."""
    logp = jax.nn.log_softmax(logits, axis=-1)  # [B, B]
    return -jnp.mean(jnp.sum(target * logp, axis=-1))


def _paired_logits(zimg, ztxt, logit_scale, row_sharding):
    scale = jnp.exp(clamp_logit_scale(logit_scale))
    # Both directions are computed as row-major products (rather than transposing one matrix) so
    # each stays row-sharded: the softmax reduction then never crosses devices for the rows.
    logits_t2i = _constrain(scale * ztxt @ zimg.T, row_sharding)  # [B_txt, B_img], rows sharded
    logits_i2t = _constrain(scale * zimg @ ztxt.T, row_sharding)  # [B_img, B_txt], rows sharded
    return logits_t2i, logits_i2t


def clip_loss(zimg: jax.Array, ztxt: jax.Array, logit_scale: jax.Array, *, row_sharding=None) -> jax.Array:
    """Symmetric InfoNCE with the paired item as the only positive."""
    logits_t2i, logits_i2t = _paired_logits(zimg, ztxt, logit_scale, row_sharding)
    labels = jnp.arange(zimg.shape[0])

    def xent(logits):
        logp = jax.nn.log_softmax(logits, axis=-1)  # [B, B], rows sharded
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))

    return 0.5 * (xent(logits_t2i) + xent(logits_i2t))


def flair_loss(zimg: jax.Array, ztxt: jax.Array, category_ids: jax.Array, logit_scale: jax.Array,
               *, row_sharding=None) -> jax.Array:
    """FLAIR's soft CLIP loss: target[i, j] = [cat_i == cat_j] / #{k : cat_k == cat_i}.

    With all-distinct categories this equals `clip_loss`. The target matrix is symmetric, so the
    same target serves both directions.
    """
    same = (category_ids[:, None] == category_ids[None, :]).astype(zimg.dtype)  # [B, B]
    target = _constrain(same / jnp.sum(same, axis=1, keepdims=True), row_sharding)  # rows sum to 1
    logits_t2i, logits_i2t = _paired_logits(zimg, ztxt, logit_scale, row_sharding)
    return 0.5 * (soft_cross_entropy(logits_t2i, target) + soft_cross_entropy(logits_i2t, target))


def grouped(loss_fn, num_groups: int):
    """Evaluate `loss_fn` independently on `num_groups` contiguous slices of the batch, then average.

    This is `loss_scope='local'`: the original code computes the loss per device, so negatives only
    come from the same device's slice. Groups follow the batch sharding (contiguous rows).
    """
    def local_loss(*arrays, logit_scale):
        split = [a.reshape((num_groups, a.shape[0] // num_groups) + a.shape[1:]) for a in arrays]
        losses = jax.vmap(lambda *xs: loss_fn(*xs, logit_scale))(*split)  # [G]
        return jnp.mean(losses)

    return local_loss
