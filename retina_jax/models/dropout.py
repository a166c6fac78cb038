"""The text tower's dropout drawn by XLA's own threefry (docs/methods.md, "Dropout's random bits";
config field `model.txt.dropout_rng`).

BERT's dropout (HF `hidden_dropout_prob`, `attention_probs_dropout_prob`) is where most of the
demos' random numbers go: 6.6 M per step for ViLReF's 100-token demo text tower. flax's
`nn.Dropout` draws them with `jax.random`'s threefry, which costs about 8 ns an element on this
CPU, about a fifth of the ViLReF stage `clip` demo step. XLA's RngBitGenerator with the same
cipher (Threefry-2x32, `lax.RandomAlgorithm.RNG_THREE_FRY`) is expanded by XLA into one fused
elementwise kernel and draws the same number of 32-bit words about 4x faster
(benchmarks/RESULTS.md, "The train step against PyTorch eager"). Each element's word depends only
on the key and its index, so the masks do not change with the mesh (tests/test_dropout.py).

`dropout_rng='xla'` (the default) keeps an element when its 32-bit word is at least
round(rate x 2^32): the keep probability is 1 - rate to within 2^-33 (flax's float uniform: 2^-24).
The masks are other masks than flax's, as PyTorch's are: the same law, other draws.
`dropout_rng='jax'` is `nn.Dropout` itself, the masks of every run before the switch existed.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

DROPOUT_RNGS = ("xla", "jax")


def drop_threshold(rate: float) -> int:
    """An element whose 32-bit word is below this is dropped: P(drop) = threshold / 2^32."""
    return min(round(rate * 2.0 ** 32), 2 ** 32 - 1)


def random_words(rng, shape) -> jnp.ndarray:
    """uint32 words of `shape` from XLA's Threefry-2x32 keyed by `rng`'s two key words, counter 0."""
    key = jax.random.key_data(rng).reshape(-1)[:2].astype(jnp.uint32)
    state = jnp.concatenate([key, jnp.zeros((2,), jnp.uint32)])  # (u64 key, u64 counter) as 4 x u32
    _, words = jax.lax.rng_bit_generator(state, shape, jnp.uint32,
                                         algorithm=jax.lax.RandomAlgorithm.RNG_THREE_FRY)
    return words


def keep_mask(rng, shape, rate: float) -> jnp.ndarray:
    return random_words(rng, shape) >= jnp.uint32(drop_threshold(rate))


class XlaDropout(nn.Module):
    """`nn.Dropout(rate)` (inverted dropout: kept elements / (1 - rate)) drawn by `keep_mask`."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        mask = keep_mask(self.make_rng("dropout"), x.shape, self.rate)
        return jax.lax.select(mask, x / (1.0 - self.rate), jnp.zeros_like(x))


def dropout(rate: float, rng: str) -> nn.Module:
    """The dropout layer of `model.txt.dropout_rng`, built in the caller's scope (so 'jax' is
    `nn.Dropout` under its usual name, drawing the masks it always drew)."""
    if rng == "jax":
        return nn.Dropout(rate)
    if rng == "xla":
        return XlaDropout(rate)
    raise ValueError(f"model.txt.dropout_rng={rng!r} not in {DROPOUT_RNGS}")
