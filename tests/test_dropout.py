"""The text tower's dropout draws (retina_jax/models/dropout.py; docs/methods.md, "Dropout draws"):
'flax' is flax's nn.Dropout mask for mask, 'packed' reads four 16-bit uniforms from each
threefry-2x32 evaluation, checked against a NumPy Threefry-2x32 written from the Random123 paper,
and both are a function of the key alone under remat and sharding."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from retina_jax import config as config_lib
from retina_jax.models.dropout import Dropout, packed_keep_mask

RATE = 0.1
THRESHOLD = round(RATE * 2 ** 16)  # 6554


def threefry2x32(key, counts_hi, counts_lo):
    """Threefry-2x32, 20 rounds (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"),
    in NumPy uint32 arithmetic."""
    rotations = [(13, 15, 26, 6), (17, 29, 16, 24)]
    k0, k1 = np.uint32(key[0]), np.uint32(key[1])
    ks = [k0, k1, np.uint32(0x1BD11BDA) ^ k0 ^ k1]
    x0, x1 = counts_hi.astype(np.uint32) + ks[0], counts_lo.astype(np.uint32) + ks[1]
    rotl = lambda v, r: (v << np.uint32(r)) | (v >> np.uint32(32 - r))  # noqa: E731
    for block in range(5):
        for r in rotations[block % 2]:
            x0 = x0 + x1
            x1 = rotl(x1, r) ^ x0
        x0 = x0 + ks[(block + 1) % 3]
        x1 = x1 + ks[(block + 2) % 3] + np.uint32(block + 1)
    return x0, x1


def test_the_numpy_threefry_matches_the_papers_known_answer():
    # Random123's known-answer vector for threefry2x32_20 (the one jax's own tests use).
    with np.errstate(over="ignore"):
        hi, lo = threefry2x32((0x13198A2E, 0x03707344), np.array([0x243F6A88], np.uint32),
                              np.array([0x85A308D3], np.uint32))
    assert (int(hi[0]), int(lo[0])) == (0xC4923A9C, 0x483DF7A0)


@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 7), (6, 4, 9, 11)])
def test_packed_mask_is_four_16_bit_draws_per_threefry_evaluation(shape):
    key = jax.random.key(7)
    keep, scale = packed_keep_mask(key, shape, RATE)
    last = shape[-1]
    groups = -(-last // 4)
    rows = int(np.prod(shape[:-1]))
    counters = np.arange(rows * groups, dtype=np.uint32)  # row-major position in the packed array
    with np.errstate(over="ignore"):
        b1, b2 = threefry2x32(np.asarray(jax.random.key_data(key)), np.zeros_like(counters), counters)
    draws = np.stack([b1 & 0xFFFF, b1 >> 16, b2 & 0xFFFF, b2 >> 16], axis=-1).reshape(rows, groups * 4)
    expected = (draws[:, :last] >= THRESHOLD).reshape(shape)
    np.testing.assert_array_equal(np.asarray(keep), expected)
    assert scale == 2 ** 16 / (2 ** 16 - THRESHOLD)


def test_packed_dropout_keeps_at_its_rate_and_stays_unbiased():
    x = jnp.full((64, 100, 512), 3.0)
    y = np.asarray(Dropout(RATE).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)}))
    kept = y != 0
    p_keep = 1 - THRESHOLD / 2 ** 16
    n = kept.size
    assert abs(kept.mean() - p_keep) < 5 * np.sqrt(p_keep * (1 - p_keep) / n)  # 5 sigma of a binomial
    np.testing.assert_array_equal(np.unique(y[kept]), np.float32(3.0 * 2 ** 16 / (2 ** 16 - THRESHOLD)))
    # The four lanes of one evaluation are independent: neighbours are dropped together at p^2.
    dropped = ~kept.reshape(-1, 4)
    p = 1 - p_keep
    for a, b in [(0, 1), (1, 2), (2, 3), (0, 3)]:
        both = (dropped[:, a] & dropped[:, b]).mean()
        assert abs(both - p * p) < 5 * np.sqrt(p * p * (1 - p * p) / dropped.shape[0])
    assert np.array_equal(Dropout(RATE).apply({}, x, deterministic=True), x)


def test_flax_draw_is_nn_dropouts_mask_in_its_place():
    class Block(nn.Module):
        layer: type
        kwargs: dict

        @nn.compact
        def __call__(self, x):
            return self.layer(RATE, **self.kwargs)(nn.Dense(8)(x), deterministic=False)

    x = jnp.ones((4, 16, 8))
    variables = Block(nn.Dropout, {}).init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    rngs = {"dropout": jax.random.key(2)}
    theirs = Block(nn.Dropout, {}).apply(variables, x, rngs=rngs)
    ours = Block(Dropout, {"draw": "flax"}).apply(variables, x, rngs=rngs)
    packed = Block(Dropout, {}).apply(variables, x, rngs=rngs)
    np.testing.assert_array_equal(ours, theirs)
    assert not np.array_equal(packed, theirs)


def test_packed_mask_is_the_same_under_remat_and_sharding(devices):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 12, 20)), jnp.float32)
    key = jax.random.key(5)
    drop = lambda x: Dropout(RATE).apply({}, x, deterministic=False, rngs={"dropout": key})  # noqa: E731
    plain = jax.jit(drop)(x)
    # Backward through a rematerialised layer re-draws the mask: its gradient is mask * scale.
    grad_remat = jax.jit(jax.grad(lambda x: jax.checkpoint(drop)(x).sum()))(x)
    np.testing.assert_array_equal(grad_remat != 0, plain != 0)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.jit(drop, in_shardings=NamedSharding(mesh, P("data")),
                      out_shardings=NamedSharding(mesh, P("data")))(x)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(plain))


def test_the_draw_is_a_validated_config_field():
    config = config_lib.load("configs/flair.py:demo")
    assert config.model.txt.dropout_draw == "packed"
    config_lib.override(config, {"model.txt.dropout_draw": "philox"})
    with pytest.raises(config_lib.ConfigError, match=r"model.txt.dropout_draw: 'philox' not in \('packed', 'flax'\)"):
        config_lib.validate(config, 8)


@pytest.mark.parametrize("rate", [1e-6, 0.999995])
def test_a_rate_the_16_bit_draw_cannot_hold_is_an_error(rate):
    with pytest.raises(ValueError, match=r"in the packed draw's 16-bit resolution"):
        packed_keep_mask(jax.random.key(0), (4, 8), rate)
