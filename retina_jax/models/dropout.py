"""Dropout whose mask costs a quarter of `jax.random`'s threefry calls (docs/methods.md, "Dropout
draws"; issue 19's step-speed work).

flax's `nn.Dropout` draws one uniform float per element through `jax.random.bernoulli`; with
partitionable threefry (the trainer's setting) each element costs one threefry-2x32 evaluation
(20 rounds) whose two 32-bit outputs are XORed into one word. On CPU that evaluation dominates
dropout's cost (benchmarks/RESULTS.md, "The train step against PyTorch eager on the same
architecture", its dropout paragraphs). `Dropout(draw='packed')`
keeps all 64 output bits of each evaluation and reads them as four 16-bit uniforms: one threefry
call per four elements.

The mask stays a function of the key and the array's shape alone, as flax's is: the counters are
the positions of the packed array (an iota, which XLA partitions with the array), so a
rematerialised step, a sharded step and a 2-process step draw the same mask. An element is kept
when its 16-bit draw is >= round(rate * 2^16), so the dropout rate is that threshold / 2^16 (0.1 ->
0.100006); kept values are scaled by 2^16 / (2^16 - threshold), the inverse of the exact keep
probability, so the layer stays unbiased.

`draw='flax'` is flax's `nn.Dropout` itself (the masks of every run recorded before the switch;
tests/test_golden_steps.py replays those).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend.random import threefry2x32_p

DROPOUT_DRAWS = ("packed", "flax")
_LEVELS = 2 ** 16  # one uniform per 16 bits of a threefry output word


def packed_keep_mask(key, shape, rate: float):
    """Boolean keep mask of `shape`, P(keep) = 1 - round(rate * 2^16) / 2^16, four elements per
    threefry-2x32 evaluation. Returns (mask, scale) with scale the inverse keep probability."""
    threshold = round(rate * _LEVELS)
    if not 0 < threshold < _LEVELS:  # not a silent change of the rate
        raise ValueError(f"dropout rate {rate} is {threshold}/65536 in the packed draw's 16-bit resolution; "
                         "use model.txt.dropout_draw='flax' for it")
    shape = tuple(shape)
    last = shape[-1] if shape else 1
    packed = shape[:-1] + (-(-last // 4),)
    if math.prod(packed) >= 2 ** 32:
        raise ValueError(f"dropout mask of shape {shape} is over 2^34 elements: the packed draw's "
                         "32-bit counters would repeat")
    # Row-major position in the packed array as the threefry counter (the high counter word is 0).
    counts = jnp.zeros(packed, jnp.uint32)
    stride = 1
    for axis in range(len(packed) - 1, -1, -1):
        counts = counts + jax.lax.broadcasted_iota(jnp.uint32, packed, axis) * jnp.uint32(stride)
        stride *= packed[axis]
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    if data.shape != (2,):
        raise ValueError(f"the packed dropout draw needs a threefry key (2 words), got key data of shape {data.shape}")
    k1, k2 = data[0].astype(jnp.uint32), data[1].astype(jnp.uint32)
    bits1, bits2 = threefry2x32_p.bind(k1, k2, jnp.zeros_like(counts), counts)
    lo16 = jnp.uint32(0xFFFF)
    draws = jnp.stack([bits1 & lo16, bits1 >> 16, bits2 & lo16, bits2 >> 16], axis=-1)
    draws = draws.reshape(packed[:-1] + (packed[-1] * 4,))[..., :last].reshape(shape)
    return draws >= jnp.uint32(threshold), _LEVELS / (_LEVELS - threshold)


class Dropout(nn.Dropout):
    """flax's `nn.Dropout` with `draw` picking how the mask is drawn (DROPOUT_DRAWS).

    A subclass of the same class name, so a layer keeps flax's automatic name (`Dropout_0`) and
    with it the rng path: `draw='flax'` gives exactly the masks `nn.Dropout` gave in its place."""

    draw: str = "packed"

    @nn.compact
    def __call__(self, inputs, deterministic: bool | None = None, rng=None):
        if self.draw == "flax":
            return super().__call__(inputs, deterministic, rng)
        if self.draw != "packed":
            raise ValueError(f"dropout draw {self.draw!r} not in {DROPOUT_DRAWS}")
        if self.broadcast_dims:
            raise NotImplementedError("the packed dropout draw has no broadcast_dims")
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if deterministic or self.rate == 0.0:
            return inputs
        if self.rate >= 1.0:
            return jnp.zeros_like(inputs)
        keep, scale = packed_keep_mask(self.make_rng(self.rng_collection) if rng is None else rng,
                                       inputs.shape, self.rate)
        return jax.lax.select(keep, inputs * jnp.asarray(scale, inputs.dtype), jnp.zeros_like(inputs))
