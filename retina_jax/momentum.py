"""Momentum (EMA) encoders and feature queues for ViLReF's batch expansion (docs/methods.md,
"ViLReF": reconstructed, ALBEF mechanics).

- `ema_update`: `p_m <- m * p_m + (1 - m) * p` over a whole parameter tree (same tree, same
  shardings as the online parameters); the momentum copy never receives gradients.
- `decay_at`: the momentum of a step: constant (ALBEF, ViLReF) or raised to 1 on a half cosine
  over the run (BYOL, DINO): `m_t = 1 - (1 - m) * (cos(pi * t / T) + 1) / 2`.
- `Queues`: replicated ring buffers of the momentum image/text features, their label vectors and a
  validity mask, with a write pointer. `enqueue` writes the WHOLE global batch at `[ptr, ptr + B)`
  and advances `ptr = (ptr + B) % Q`; Q must be a multiple of the global batch so a write never
  straddles the end. Slots not written yet stay invalid and are masked out of the loss (not used as
  random negatives).

Both are pure functions for use inside the jitted train step; every input is under stop_gradient.
"""
from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp

SCHEDULES = ("constant", "cosine")


def ema_update(ema_params, params, momentum: float):
    """m * ema + (1 - m) * params, leaf by leaf (params under stop_gradient)."""
    return jax.tree.map(lambda e, p: momentum * e + (1.0 - momentum) * jax.lax.stop_gradient(p).astype(e.dtype),
                        ema_params, params)


def decay_at(step, base: float, schedule: str, total_steps: int):
    """The momentum used at `step` (0-based) of a `total_steps` run."""
    if schedule == "constant":
        return jnp.asarray(base, jnp.float32)
    if schedule != "cosine":
        raise ValueError(f"unknown momentum schedule {schedule!r}; allowed: {SCHEDULES}")
    progress = jnp.asarray(step, jnp.float32) / max(total_steps, 1)
    return 1.0 - (1.0 - base) * (jnp.cos(math.pi * progress) + 1.0) / 2.0


@flax.struct.dataclass
class Queues:
    img: jax.Array  # [Q, D] momentum image features (unit norm)
    txt: jax.Array  # [Q, D] momentum text features
    labels: jax.Array  # [Q, C] multi-hot labels
    valid: jax.Array  # [Q] bool: written at least once
    ptr: jax.Array  # [] int32: next slot to write

    @property
    def size(self) -> int:
        return self.img.shape[0]


def init_queues(size: int, dim: int, num_labels: int) -> Queues:
    """Empty queues: zeros, every slot invalid, pointer at 0."""
    return Queues(img=jnp.zeros((size, dim), jnp.float32), txt=jnp.zeros((size, dim), jnp.float32),
                  labels=jnp.zeros((size, num_labels), jnp.float32), valid=jnp.zeros((size,), bool),
                  ptr=jnp.zeros((), jnp.int32))


def check_queue_size(size: int, global_batch: int) -> None:
    if size <= 0 or global_batch <= 0 or size % global_batch:
        raise ValueError(f"queue size {size} must be a positive multiple of the global batch {global_batch}, "
                         "so each step's write fits without wrapping")


def enqueue(queues: Queues, img: jax.Array, txt: jax.Array, labels: jax.Array) -> Queues:
    """Write the global batch's momentum features and labels at [ptr, ptr + B); ptr += B mod Q."""
    batch = img.shape[0]
    check_queue_size(queues.size, batch)
    write = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(
        buf, jax.lax.stop_gradient(x).astype(buf.dtype), queues.ptr, axis=0)
    return Queues(img=write(queues.img, img), txt=write(queues.txt, txt), labels=write(queues.labels, labels),
                  valid=write(queues.valid, jnp.ones((batch,), bool)),
                  ptr=((queues.ptr + batch) % queues.size).astype(jnp.int32))


def restart_at(queues: Queues, step, start: int) -> Queues:
    """Empty the queue at step `start` (`momentum.queue_start_step`), so it fills afresh from the
    re-synced momentum model; unchanged at every other step, and always when `start` is 0."""
    if not start:
        return queues
    fresh = jnp.asarray(step) == start
    return queues.replace(valid=queues.valid & ~fresh, ptr=jnp.where(fresh, 0, queues.ptr).astype(jnp.int32))


def enqueue_from(queues: Queues, step, start: int, img: jax.Array, txt: jax.Array, labels: jax.Array) -> Queues:
    """`enqueue` from step `start` on; before it the queue is left untouched (never written)."""
    written = enqueue(queues, img, txt, labels)
    if not start:
        return written
    active = jnp.asarray(step) >= start
    return jax.tree.map(lambda new, old: jnp.where(active, new, old), written, queues)


def resync_at(ema_params, params, step, start: int):
    """At step `start` the momentum model restarts as a copy of the online one (its EMA history is
    dropped, as if the run began there); unchanged at every other step."""
    if not start:
        return ema_params
    fresh = jnp.asarray(step) == start
    return jax.tree.map(lambda e, p: jnp.where(fresh, jax.lax.stop_gradient(p).astype(e.dtype), e), ema_params, params)
