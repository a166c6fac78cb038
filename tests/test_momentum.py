"""EMA update and the replicated feature queues of ViLReF (docs/methods.md, "ViLReF") against hand computations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retina_jax import momentum


def test_ema_update_against_hand_computation():
    ema = {"a": jnp.asarray([1.0, 2.0]), "b": {"c": jnp.asarray(4.0)}}
    online = {"a": jnp.asarray([3.0, -2.0]), "b": {"c": jnp.asarray(0.0)}}
    once = momentum.ema_update(ema, online, 0.9)
    np.testing.assert_allclose(once["a"], [0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * -2], rtol=1e-6)
    np.testing.assert_allclose(once["b"]["c"], 3.6, rtol=1e-6)
    twice = momentum.ema_update(once, online, 0.9)  # m^2 * e + (1 - m^2) * p for a fixed p
    np.testing.assert_allclose(twice["a"], [0.81 * 1 + 0.19 * 3, 0.81 * 2 + 0.19 * -2], rtol=1e-6)
    # No gradient flows into the online parameters through the momentum copy.
    g = jax.grad(lambda p: momentum.ema_update(ema, p, 0.9)["a"].sum())(online)
    assert np.all(np.asarray(g["a"]) == 0)


def test_queue_wraps_around_and_tracks_validity():
    q = momentum.init_queues(size=6, dim=2, num_labels=3)
    assert not np.any(q.valid) and int(q.ptr) == 0
    enqueue = jax.jit(momentum.enqueue)
    batches = [np.full((2, 2), float(i + 1), np.float32) for i in range(4)]
    for i, x in enumerate(batches):
        q = enqueue(q, x, -x, np.eye(3, dtype=np.float32)[[i % 3, (i + 1) % 3]])
        if i == 0:
            np.testing.assert_array_equal(q.valid, [True, True, False, False, False, False])
    # 4 writes of 2 into 6 slots: batches 1-3 filled [0, 6), batch 4 overwrote [0, 2); ptr = 8 % 6.
    assert int(q.ptr) == 2
    np.testing.assert_array_equal(q.img[:, 0], [4, 4, 2, 2, 3, 3])
    np.testing.assert_array_equal(q.txt[:, 0], [-4, -4, -2, -2, -3, -3])
    np.testing.assert_array_equal(q.labels.argmax(1), [0, 1, 1, 2, 2, 0])
    assert np.all(q.valid)


def test_queue_size_must_be_a_multiple_of_the_global_batch():
    q = momentum.init_queues(size=10, dim=2, num_labels=1)
    with pytest.raises(ValueError, match="multiple of the global batch 4"):
        momentum.enqueue(q, np.zeros((4, 2)), np.zeros((4, 2)), np.zeros((4, 1)))
