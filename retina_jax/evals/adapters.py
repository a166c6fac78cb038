"""FLAIR's few-shot vision-language adapters (docs/methods.md, "FLAIR", Transfer protocols):
CLIP-Adapter, Tip-Adapter and Tip-Adapter-F, as jusiro/FLAIR
`flair/transferability/modeling/adapters.py` (its linear probe is evals/linear_probe.py, shared with
ViLReF's multi-label probe).

Inputs are frozen features: the L2-normalised image embeddings `zimg` and the zero-shot class
prototypes (mean of normalised text embeddings, not re-normalised). Settings are the original's,
including where they differ from the adapters' own papers:
- CLIP-Adapter: `x' = norm(0.2 * relu(W2 relu(W1 x)) + 0.8 x)`, D -> D/4 -> D without bias (torch's
  default uniform init), trained with CE on `s * x' @ proto.T` for 40 epochs at batch size 1 (the
  sample order shuffled once and reused every epoch), AdamW lr 1e-3 (eps 1e-4, torch's default weight
  decay 0.01) with a per-step cosine decay to 0.
- Tip-Adapter: `logits = 100 * x @ proto.T + alpha * exp(-beta (1 - x @ keys.T)) @ onehot(values)`
  with FLAIR's fixed alpha = 1, beta = 5 (the Tip-Adapter paper searches both on a validation split:
  `search_tip_hyperparameters` reproduces gaopengcuhk/Tip-Adapter's `search_hp`, off by default).
- Tip-Adapter-F: the keys (initialised from the cache, the train features) are trained for 40 epochs
  at batch size 1 with AdamW lr 1e-3 (eps 1e-4, wd 0.01) and no schedule (Tip-Adapter's own code
  decays it with a cosine and trains on augmented images; FLAIR on the cache features). Its training logits
  are `s * x @ proto.T + alpha * s * exp(-beta (1 - x @ keys.T)) @ values / N` (the model's scale,
  and the cache term divided by the cache size N), while prediction uses the Tip-Adapter form above:
  the quirk is kept. The trained keys are not re-normalised (neither original does).

Training runs the originals' batch-size-1 steps, epochs x N of them, in one jitted `lax.scan`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

CLIP_ADAPTER_RATIO = 0.2
CLIP_ADAPTER_REDUCTION = 4
TIP_ALPHA = 1.0
TIP_BETA = 5.0
TIP_ZERO_SHOT_SCALE = 100.0  # Tip-Adapter's fixed CLIP logit scale at prediction time
ADAPTER_EPOCHS = 40
ADAPTER_LR = 1e-3
ADAPTER_EPS = 1e-4  # both originals pass eps=1e-4 to AdamW
ADAPTER_WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default: neither original sets it


# ------------------------------------------------------------------------------------ shared bits
def torch_linear_init(key, fan_in: int, fan_out: int) -> jax.Array:
    """[fan_in, fan_out] weight drawn like torch.nn.Linear's default (kaiming_uniform, a = sqrt(5)),
    i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)
    return jax.random.uniform(key, (fan_in, fan_out), jnp.float32, -bound, bound)


def _check(x, y, prototypes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y, prototypes = np.asarray(x, np.float32), np.asarray(y), np.asarray(prototypes, np.float32)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or prototypes.ndim != 2 or prototypes.shape[1] != x.shape[1]:
        raise ValueError(f"features [N, D], labels [N] and prototypes [C, D] expected, got {x.shape}, {y.shape} "
                         f"and {prototypes.shape}")
    if len(y) and (y.min() < 0 or y.max() >= len(prototypes)):
        raise ValueError(f"labels must be class ids in [0, {len(prototypes)}), got range [{y.min()}, {y.max()}]")
    return x, y.astype(np.int32), prototypes


@functools.partial(jax.jit, static_argnames=("loss_fn", "epochs", "lr", "cosine"))
def _single_sample_sgd(params, x, y, aux, *, loss_fn, epochs: int, lr: float, cosine: bool):
    """`epochs` passes at batch size 1 over (x, y), already in the one shuffled order the originals use
    for every epoch (they shuffle their index list once, before the epoch loop), with AdamW (eps 1e-4,
    wd 0.01) at `lr`, cosine-decayed per step to 0 when `cosine`. `loss_fn(params, x [1, D], y [1],
    aux)` is a module-level function, so every fold of one shape reuses one compilation.
    Returns (params, per-epoch mean loss)."""
    schedule = optax.cosine_decay_schedule(lr, epochs * len(x)) if cosine else lr
    tx = optax.adamw(schedule, eps=ADAPTER_EPS, weight_decay=ADAPTER_WEIGHT_DECAY)

    def step(carry, i):
        p, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(p, x[i][None], y[i][None], aux)
        updates, opt_state = tx.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss

    def epoch(carry, _):
        return jax.lax.scan(step, carry, jnp.arange(len(x)))

    (params, _), losses = jax.lax.scan(epoch, (params, tx.init(params)), length=epochs)
    return params, losses.mean(axis=1)


def _shuffled(x, y, seed: int):
    order = np.random.default_rng(seed).permutation(len(x))
    return jnp.asarray(x[order]), jnp.asarray(y[order])


def _softmax(logits) -> np.ndarray:
    return np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1), np.float64)


# ----------------------------------------------------------------------------------- CLIP-Adapter
def clip_adapter_init(key, dim: int, reduction: int = CLIP_ADAPTER_REDUCTION) -> dict:
    k1, k2 = jax.random.split(key)
    return {"w1": torch_linear_init(k1, dim, dim // reduction), "w2": torch_linear_init(k2, dim // reduction, dim)}


def clip_adapter_features(params: dict, x, ratio: float = CLIP_ADAPTER_RATIO) -> jax.Array:
    """`norm(ratio * relu(relu(x W1) W2) + (1 - ratio) * x)`."""
    residual = jax.nn.relu(jax.nn.relu(x @ params["w1"]) @ params["w2"])
    mixed = ratio * residual + (1.0 - ratio) * x
    return mixed / jnp.linalg.norm(mixed, axis=-1, keepdims=True)


def _clip_adapter_loss(params, x, y, aux):
    logits = aux["scale"] * clip_adapter_features(params, x, aux["ratio"]) @ aux["prototypes"].T
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train_clip_adapter(x, y, prototypes, scale: float, *, epochs: int = ADAPTER_EPOCHS, lr: float = ADAPTER_LR,
                       ratio: float = CLIP_ADAPTER_RATIO, reduction: int = CLIP_ADAPTER_REDUCTION,
                       seed: int = 0) -> dict:
    """Fit CLIP-Adapter on train embeddings `x` [N, D] (normalised) and class ids `y` [N]; torch's
    CosineAnnealingLR(T_max = epochs * N) stepped after every sample is optax's per-step cosine decay."""
    x, y, prototypes = _check(x, y, prototypes)
    aux = {"prototypes": jnp.asarray(prototypes), "scale": jnp.float32(scale), "ratio": jnp.float32(ratio)}
    params, losses = _single_sample_sgd(clip_adapter_init(jax.random.PRNGKey(seed), x.shape[1], reduction),
                                        *_shuffled(x, y, seed), aux, loss_fn=_clip_adapter_loss, epochs=epochs,
                                        lr=lr, cosine=True)
    logging.info("CLIP-Adapter: %d epochs x %d samples, loss %.4f -> %.4f", epochs, len(x), losses[0], losses[-1])
    return jax.device_get(params)


def clip_adapter_probs(params: dict, x, prototypes, scale: float, ratio: float = CLIP_ADAPTER_RATIO) -> np.ndarray:
    logits = scale * clip_adapter_features(params, jnp.asarray(x, jnp.float32), ratio) @ jnp.asarray(prototypes).T
    return _softmax(logits)


# ------------------------------------------------------------------------------------ Tip-Adapter
def tip_adapter_logits(x, prototypes, keys, values, alpha: float = TIP_ALPHA, beta: float = TIP_BETA) -> jax.Array:
    """Tip-Adapter's prediction: `100 x proto^T + alpha exp(-beta (1 - x keys^T)) values`.

    x [Q, D], prototypes [C, D], keys [N, D] (the cache: train embeddings, or Tip-Adapter-F's trained
    ones), values [N, C] one-hot train labels.
    """
    x = jnp.asarray(x, jnp.float32)
    affinity = x @ jnp.asarray(keys, jnp.float32).T  # [Q, N]
    cache = jnp.exp(-beta * (1.0 - affinity)) @ jnp.asarray(values, jnp.float32)  # [Q, C]
    return TIP_ZERO_SHOT_SCALE * x @ jnp.asarray(prototypes, jnp.float32).T + alpha * cache


def tip_adapter_probs(x, prototypes, keys, values, alpha: float = TIP_ALPHA, beta: float = TIP_BETA) -> np.ndarray:
    return _softmax(tip_adapter_logits(x, prototypes, keys, values, alpha, beta))


def one_hot(y, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[np.asarray(y)]


def tip_adapter_f_train_logits(keys, x, prototypes, values, scale: float, alpha: float = TIP_ALPHA,
                               beta: float = TIP_BETA) -> jax.Array:
    """FLAIR's Tip-Adapter-F TRAINING logits (not its prediction's, the kept quirk):
    `s x proto^T + alpha s exp(-beta (1 - x keys^T)) values / N`, N = len(keys)."""
    cache = jnp.exp(-beta * (1.0 - x @ keys.T)) @ values / keys.shape[0] * scale
    return scale * x @ prototypes.T + alpha * cache


def _tip_adapter_f_loss(keys, x, y, aux):
    logits = tip_adapter_f_train_logits(keys, x, aux["prototypes"], aux["values"], aux["scale"], aux["alpha"],
                                        aux["beta"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train_tip_adapter_f(x, y, prototypes, scale: float, *, epochs: int = ADAPTER_EPOCHS, lr: float = ADAPTER_LR,
                        alpha: float = TIP_ALPHA, beta: float = TIP_BETA, seed: int = 0) -> np.ndarray:
    """Tip-Adapter-F: trainable keys [N, D] initialised from the cache `x` (the train embeddings),
    fitted on the cache itself (batch size 1, no schedule). Returns the trained keys."""
    x, y, prototypes = _check(x, y, prototypes)
    aux = {"prototypes": jnp.asarray(prototypes), "values": jnp.asarray(one_hot(y, len(prototypes))),
           "scale": jnp.float32(scale), "alpha": jnp.float32(alpha), "beta": jnp.float32(beta)}
    keys, losses = _single_sample_sgd(jnp.asarray(x), *_shuffled(x, y, seed), aux, loss_fn=_tip_adapter_f_loss,
                                      epochs=epochs, lr=lr, cosine=False)
    logging.info("Tip-Adapter-F: %d epochs x %d samples, loss %.4f -> %.4f", epochs, len(x), losses[0], losses[-1])
    return np.asarray(keys)


def search_tip_hyperparameters(x, y, prototypes, keys, values, *, scale=(7.0, 3.0),
                               steps=(200, 20)) -> tuple[float, float]:
    """gaopengcuhk/Tip-Adapter's `search_hp` on a validation set: beta over
    `[0.1 + i (scale[0] - 0.1) / steps[0]]`, alpha likewise with index 1 (its ImageNet grid by default),
    keeping the first pair with the strictly best top-1 accuracy. Returns (alpha, beta)."""
    x, y = jnp.asarray(x, jnp.float32), np.asarray(y)
    if not len(y):
        raise ValueError("the Tip-Adapter search needs a non-empty validation split (shots_val)")
    betas = [i * (scale[0] - 0.1) / steps[0] + 0.1 for i in range(steps[0])]
    alphas = [i * (scale[1] - 0.1) / steps[1] + 0.1 for i in range(steps[1])]
    affinity = x @ jnp.asarray(keys, jnp.float32).T
    clip_logits = TIP_ZERO_SHOT_SCALE * x @ jnp.asarray(prototypes, jnp.float32).T
    values = jnp.asarray(values, jnp.float32)

    @functools.partial(jax.vmap, in_axes=(0, None))
    @functools.partial(jax.vmap, in_axes=(None, 0))
    def accuracy(beta, alpha):
        logits = clip_logits + alpha * jnp.exp(-beta * (1.0 - affinity)) @ values
        return jnp.mean(jnp.argmax(logits, axis=-1) == y)

    acc = np.asarray(accuracy(jnp.asarray(betas), jnp.asarray(alphas)))  # [betas, alphas]
    b, a = np.unravel_index(np.argmax(acc), acc.shape)  # argmax: the first maximum in beta-major order
    return float(alphas[a]), float(betas[b])
