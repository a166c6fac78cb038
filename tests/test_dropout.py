"""The text tower's dropout drawn by XLA's threefry (retina_jax/models/dropout.py,
`model.txt.dropout_rng`): the words' uniformity and independence and the keep rate against the
binomial law, the same masks on every mesh, the layer against inverted dropout, and the switch in
BERT and the config."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from retina_jax import config as config_lib
from retina_jax.config import ConfigError
from retina_jax.models import bert as bert_lib
from retina_jax.models.dropout import XlaDropout, drop_threshold, dropout, keep_mask, random_words

N = 1 << 20


def within(observed, p, n, sigmas=5.0):
    return abs(observed - p) < sigmas * math.sqrt(p * (1 - p) / n)


def test_words_are_uniform_and_independent():
    words = np.asarray(random_words(jax.random.key(0), (N,)), dtype=np.uint64)
    # Every one of the 32 bits is a fair coin, and the top 4 bits fall in 16 equal bins (chi-square,
    # 15 degrees of freedom: 37.7 is its 0.999 quantile).
    for bit in range(32):
        assert within(((words >> bit) & 1).mean(), 0.5, N), f"bit {bit}"
    counts = np.bincount((words >> 28).astype(np.int64), minlength=16)
    assert ((counts - N / 16) ** 2 / (N / 16)).sum() < 37.7
    # Neighbours, and the same index under another key, are uncorrelated (|r| < 5 / sqrt(n)).
    u = words.astype(np.float64) / 2 ** 32
    other = np.asarray(random_words(jax.random.key(1), (N,)), dtype=np.float64) / 2 ** 32
    for a, b in ((u[:-1], u[1:]), (u, other)):
        assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(N)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_keep_rate_follows_the_binomial_law(rate):
    assert drop_threshold(rate) == round(rate * 2 ** 32)
    mask = np.asarray(keep_mask(jax.random.key(2), (N,), rate))
    assert within(mask.mean(), 1 - rate, N)
    assert within((mask[:-1] & mask[1:]).mean(), (1 - rate) ** 2, N)


def test_masks_do_not_depend_on_the_mesh():
    x = jnp.ones((64, 100, 128))
    drop = jax.jit(lambda rng, x: XlaDropout(0.1).apply({}, x, deterministic=False, rngs={"dropout": rng}))
    one = np.asarray(drop(jax.random.key(3), x))
    for shape, names in (((8,), ("data",)), ((2, 4), ("data", "fsdp"))):
        mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))
        sharded = jax.device_put(x, NamedSharding(mesh, P(names)))
        np.testing.assert_array_equal(np.asarray(drop(jax.random.key(3), sharded)), one)


def test_layer_is_inverted_dropout():
    rate = 0.25
    x = jax.random.normal(jax.random.key(1), (32, 50, 16)) + 2.0
    layer = XlaDropout(rate)
    out = np.asarray(layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(7)}))
    kept = out != 0
    np.testing.assert_allclose(out[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-6)
    assert within(kept.mean(), 1 - rate, kept.size)
    again = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(7)})
    other = np.asarray(layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(8)})) != 0
    np.testing.assert_array_equal(np.asarray(again), out)
    assert within((other & kept).mean(), (1 - rate) ** 2, kept.size)  # another key: an independent mask
    np.testing.assert_array_equal(np.asarray(layer.apply({}, x, deterministic=True)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(XlaDropout(0.0).apply({}, x, deterministic=False)), np.asarray(x))
    assert not np.asarray(XlaDropout(1.0).apply({}, x, deterministic=False)).any()


def test_bert_dropout_rng_changes_training_masks_only():
    ids = jnp.array([[2, 5, 6, 7, 3, 0], [2, 8, 3, 0, 0, 0]])
    mask = (ids != 0).astype(jnp.int32)
    models = {rng: bert_lib.BertModel(bert_lib.bert_tiny_config(16, dropout_rng=rng)) for rng in ("xla", "jax")}
    params = models["jax"].init(jax.random.key(0), ids, mask)
    assert jax.tree.structure(params) == jax.tree.structure(models["xla"].init(jax.random.key(0), ids, mask))
    train = {rng: m.apply(params, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(1)})
             for rng, m in models.items()}
    evaluation = {rng: m.apply(params, ids, mask) for rng, m in models.items()}
    np.testing.assert_array_equal(np.asarray(evaluation["xla"]["last_hidden_state"]),
                                  np.asarray(evaluation["jax"]["last_hidden_state"]))
    assert not np.allclose(np.asarray(train["xla"]["last_hidden_state"]), np.asarray(train["jax"]["last_hidden_state"]))
    # 'jax' is flax's own layer, so runs made before the switch keep their masks.
    assert type(dropout(0.1, "jax")).__module__ == "flax.linen.stochastic"


def test_config_default_and_refusal():
    config = config_lib.load("configs/flair.py:demo")
    assert config.model.txt.dropout_rng == "xla"
    config_lib.override(config, {"model.txt.dropout_rng": "philox"})
    with pytest.raises(ConfigError, match="model.txt.dropout_rng"):
        config_lib.validate(config, 1)
