"""Contrastive loss terms as pure functions on arrays.

- `clip_loss`: CLIP InfoNCE (identity targets), used by KeepFIT's expert stream (docs/methods.md, "KeepFIT").
- `keepfit_loss`: KeepFIT's `L_pub + w_mm * L_mm + w_rev * L_rev` (docs/methods.md, "KeepFIT"): FLAIR's
  loss on the public batch, CLIP's on the expert pairs, and `revision_loss`, the MSE between the
  public text embeddings and the knowledge attention's revision.
- `flair_loss`: FLAIR's label-aware soft CLIP loss (docs/methods.md, "FLAIR"): rows/columns whose
  *original* category ids are equal are all positives, with the target spread uniformly over them.
- `token_cross_entropy`: KeepFIT V2's masked-LM loss (stage `text`) and caption loss (stage `vl`,
  docs/methods.md, "KeepFIT V2"): cross-entropy over the weighted tokens, normalised by the weight sum of the
  GLOBAL batch, so the value does not depend on how the batch is split over devices.
- `wscl_loss`: ViLReF's Weighted Similarity Coupling Loss (docs/methods.md, "ViLReF"; reconstructed): keys are
  the in-batch items plus a queue, negatives are weighted by label dissimilarity, false negatives
  (identical label sets) and invalid queue slots are dropped.

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
LOGITS_SCOPE = "contrastive_logits"


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
    # each stays row-sharded: the softmax reduction then never crosses devices for the rows. The
    # scope names the ops in compiled programs and profiles (tests/test_sharding.py reads it).
    with jax.named_scope(LOGITS_SCOPE):
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


def scoped(loss_fn, num_groups: int = 1, row_sharding=None):
    """`loss_fn(*arrays, logit_scale=...)` in the configured scope: over the global batch with
    row-sharded logits (`loss.scope='global'`) or, with `num_groups > 1`, per device group ('local')."""
    if num_groups > 1:
        return grouped(loss_fn, num_groups)
    return lambda *arrays, logit_scale: loss_fn(*arrays, logit_scale, row_sharding=row_sharding)


# ------------------------------------------------------------------------------------- KeepFIT

def revision_loss(ztxt: jax.Array, revised: jax.Array) -> jax.Array:
    """KeepFIT's L_rev: mean((ztxt - revised) ** 2) over all B x D elements (torch MSELoss)."""
    return jnp.mean(jnp.square(ztxt.astype(jnp.float32) - revised.astype(jnp.float32)))


def keepfit_loss(zimg: jax.Array, ztxt: jax.Array, category_ids: jax.Array, kimg: jax.Array, ktxt: jax.Array,
                 revised: jax.Array | None, logit_scale: jax.Array, *, mm_weight: float = 1.0,
                 rev_weight: float = 100.0, num_groups: int = 1, row_sharding=None):
    """KeepFIT's loss -> (total, {'pub', 'mm', 'rev'}).

    zimg, ztxt [B, D] and category_ids [B]: the public batch; kimg, ktxt [Bk, D]: the expert pairs;
    revised [B, D]: `knowledge(q=zimg, k=kimg, v=ktxt)` (None when rev_weight is 0). One temperature
    serves both contrastive terms. `num_groups > 1` computes both per device group
    (`loss.scope='local'`, as the original); terms with weight 0 are still reported.
    """
    l_pub = scoped(flair_loss, num_groups, row_sharding)(zimg, ztxt, category_ids, logit_scale=logit_scale)
    l_mm = scoped(clip_loss, num_groups, row_sharding)(kimg, ktxt, logit_scale=logit_scale)
    terms = {"pub": l_pub, "mm": l_mm}
    total = l_pub + mm_weight * l_mm
    if revised is not None:
        terms["rev"] = revision_loss(ztxt, revised)
        total = total + rev_weight * terms["rev"]
    elif rev_weight:
        raise ValueError(f"keepfit_loss: rev_weight={rev_weight} needs the knowledge attention's output `revised`")
    return total, terms


# ------------------------------------------------------------------------------ KeepFIT V2

def token_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(loss, accuracy): sum(w * CE) / sum(w) and the weighted top-1 accuracy over all tokens.

    logits [B, L, V], targets and weights [B, L] (weights 1 on real / masked tokens, 0 on padding).
    Written on the whole (global) batch: under jit the sums reduce across devices before the
    division, so the normaliser is the real-token count of the global batch, not a mean of
    per-device means. An all-zero weight batch gives 0, not NaN.
    """
    weights = weights.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    count = jnp.maximum(jnp.sum(weights), 1.0)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(nll * weights) / count, jnp.sum(correct * weights) / count


# ---------------------------------------------------------------------------------------- WSCL

WSCL_COUPLINGS = ("similarity", "log", "none")
# A dropped key's logit: exp(MASKED - max) is exactly 0 in float32, and unlike -inf it keeps
# `target * log_softmax` finite where the target is 0 (momentum distillation's soft targets).
MASKED = -1e9


def label_cosine(labels: jax.Array, key_labels: jax.Array) -> jax.Array:
    """cos(y_i, y_k) of multi-hot label vectors [B, C] x [K, C] -> [B, K]; 0 where a vector is all zero."""
    y = labels.astype(jnp.float32)
    yk = key_labels.astype(jnp.float32)
    ny = jnp.linalg.norm(y, axis=1)  # [B]
    nk = jnp.linalg.norm(yk, axis=1)  # [K]
    denom = ny[:, None] * nk[None, :]  # [B, K]
    return jnp.where(denom > 0, (y @ yk.T) / jnp.where(denom > 0, denom, 1.0), 0.0)


def wscl_logits(sim: jax.Array, label_sim: jax.Array, key_valid: jax.Array, scale: jax.Array,
                coupling: str = "similarity") -> jax.Array:
    """Coupled logits [B, K] of one direction; the positive of row i is column i.

    W = 1 - Sy on negatives and 1 on the positive; 'similarity' (default): s * (W * S); 'log':
    s * S + log W; 'none': s * S. False negatives (same label set as the row, not the positive) and
    invalid keys (unfilled queue slots) get MASKED, i.e. exactly zero probability.
    """
    if coupling not in WSCL_COUPLINGS:
        raise ValueError(f"unknown WSCL coupling {coupling!r}; allowed: {WSCL_COUPLINGS}")
    b, k = sim.shape
    pos = jnp.arange(k)[None, :] == jnp.arange(b)[:, None]  # [B, K]; queue columns are never positive
    false_neg = (label_sim >= 1.0 - 1e-6) & ~pos  # [B, K]
    weight = jnp.where(pos, 1.0, 1.0 - label_sim)  # [B, K]
    if coupling == "similarity":
        z = scale * (weight * sim)
    elif coupling == "log":
        z = scale * sim + jnp.log(jnp.maximum(weight, 1e-12))  # W = 0 only on false negatives (dropped)
    else:
        z = scale * sim
    drop = false_neg | ~key_valid[None, :].astype(bool)
    return jnp.where(drop, MASKED, z)


def _wscl_direction(z: jax.Array, soft: jax.Array | None, alpha: float) -> jax.Array:
    """Cross-entropy of one direction: hard target = the positive (column i); with momentum
    distillation the target is (1 - alpha) * onehot + alpha * soft (ALBEF)."""
    logp = jax.nn.log_softmax(z, axis=-1)  # [B, K]
    b, k = z.shape
    onehot = (jnp.arange(k)[None, :] == jnp.arange(b)[:, None]).astype(logp.dtype)  # [B, K]
    target = onehot if soft is None else (1.0 - alpha) * onehot + alpha * soft
    return -jnp.mean(jnp.sum(jnp.where(target > 0, target * logp, 0.0), axis=-1))


def wscl_loss(zimg: jax.Array, ztxt: jax.Array, labels: jax.Array, logit_scale: jax.Array, *,
              keys_img: jax.Array | None = None, keys_txt: jax.Array | None = None,
              queue_img: jax.Array | None = None, queue_txt: jax.Array | None = None,
              queue_labels: jax.Array | None = None, queue_valid: jax.Array | None = None,
              coupling: str = "similarity", alpha: float = 0.0,
              momentum_img: jax.Array | None = None, momentum_txt: jax.Array | None = None,
              row_sharding=None) -> jax.Array:
    """ViLReF's WSCL, both directions averaged (docs/methods.md, "ViLReF").

    zimg, ztxt [B, D]: the online embeddings (queries). labels [B, C] multi-hot. Keys are
    `keys_img`/`keys_txt` [B, D] (the momentum features, ALBEF; default: the online ones) followed
    by the queue `queue_img`/`queue_txt` [Q, D] with `queue_labels` [Q, C] and `queue_valid` [Q].
    With `alpha > 0`, `momentum_img`/`momentum_txt` [B, D] (the momentum model's queries) give soft
    targets from the same coupled, masked logits (ALBEF momentum distillation), under stop_gradient.
    """
    scale = jnp.exp(clamp_logit_scale(logit_scale))
    keys_img = zimg if keys_img is None else keys_img
    keys_txt = ztxt if keys_txt is None else keys_txt
    key_labels, valid = labels, jnp.ones((zimg.shape[0],), bool)
    if queue_img is not None:
        keys_img = jnp.concatenate([keys_img, queue_img])  # [K, D]
        keys_txt = jnp.concatenate([keys_txt, queue_txt])  # [K, D]
        key_labels = jnp.concatenate([labels, queue_labels.astype(labels.dtype)])  # [K, C]
        valid = jnp.concatenate([valid, queue_valid.astype(bool)])  # [K]
    label_sim = _constrain(label_cosine(labels, key_labels), row_sharding)  # [B, K], rows sharded

    def direction(queries, keys, momentum_queries):
        z = wscl_logits(_constrain(queries @ keys.T, row_sharding), label_sim, valid, scale, coupling)  # [B, K]
        soft = None
        if alpha > 0:
            if momentum_queries is None:
                raise ValueError("wscl_loss: alpha > 0 needs the momentum model's features (momentum_img/txt)")
            z_m = wscl_logits(momentum_queries @ keys.T, label_sim, valid, scale, coupling)
            soft = jax.lax.stop_gradient(jax.nn.softmax(z_m, axis=-1))  # [B, K]
        return _wscl_direction(z, soft, alpha)

    return 0.5 * (direction(zimg, keys_txt, momentum_img) + direction(ztxt, keys_img, momentum_txt))


def wscl_statistics(zimg: jax.Array, keys_txt: jax.Array, labels: jax.Array, logit_scale: jax.Array, *,
                    queue_txt: jax.Array | None = None, queue_labels: jax.Array | None = None,
                    queue_valid: jax.Array | None = None, coupling: str = "similarity", row_sharding=None) -> dict:
    """What the image-to-text direction of `wscl_loss` does with its keys (docs/methods.md, ViLReF):

    - `false_neg_batch` / `false_neg_queue`: the fraction of in-batch negatives (B - 1 per row) and
      of valid queue slots dropped as false negatives (same label set);
    - `queue_mass`: the softmax probability the rows put on the queue's columns (0 without a queue);
    - `cos_positive`, `cos_negative`, `cos_queue`: the mean cosine of a query to its positive, to the
      other in-batch keys and to the valid queue entries. Collapsed features that escape a stale
      queue show cos_negative ~ cos_positive ~ 1 with cos_queue far below (docs/methods.md, ViLReF).

    Metrics only: every input is detached. The [B, K] matrices are row-sharded like the loss's.
    """
    zimg, keys_txt, labels = (jax.lax.stop_gradient(a) for a in (zimg, keys_txt, labels))
    scale = jnp.exp(clamp_logit_scale(jax.lax.stop_gradient(logit_scale)))
    b = zimg.shape[0]
    in_batch = label_cosine(labels, labels) >= 1.0 - 1e-6  # [B, B], the diagonal included
    cos = _constrain(zimg @ keys_txt.T, row_sharding)  # [B, B]
    stats = {"false_neg_batch": (jnp.sum(in_batch) - b) / max(b * (b - 1), 1),
             "cos_positive": jnp.mean(jnp.diagonal(cos)),
             "cos_negative": (jnp.sum(cos) - jnp.sum(jnp.diagonal(cos))) / max(b * (b - 1), 1)}
    if queue_txt is None:
        return {**stats, "false_neg_queue": jnp.zeros(()), "queue_mass": jnp.zeros(()), "cos_queue": jnp.zeros(())}
    valid = queue_valid.astype(bool)
    keys = jnp.concatenate([keys_txt, queue_txt])
    key_labels = jnp.concatenate([labels, queue_labels.astype(labels.dtype)])
    key_valid = jnp.concatenate([jnp.ones((b,), bool), valid])
    label_sim = _constrain(label_cosine(labels, key_labels), row_sharding)
    sim = _constrain(zimg @ keys.T, row_sharding)  # [B, K]
    probs = jax.nn.softmax(wscl_logits(sim, label_sim, key_valid, scale, coupling), axis=-1)
    queue_fn = (label_sim[:, b:] >= 1.0 - 1e-6) & valid[None, :]
    stats["false_neg_queue"] = jnp.sum(queue_fn) / jnp.maximum(b * jnp.sum(valid), 1)
    stats["queue_mass"] = jnp.mean(jnp.sum(probs[:, b:], axis=-1))
    stats["cos_queue"] = jnp.sum(sim[:, b:] * valid[None, :]) / jnp.maximum(b * jnp.sum(valid), 1)
    return stats
