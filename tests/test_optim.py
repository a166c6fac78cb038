"""Optimizer: warm-up + cosine with a separate horizon, weight-decay masks, clipping."""
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from retina_jax import optim


def optim_config(**kw):
    c = ml_collections.ConfigDict(dict(lr=1e-4, weight_decay=1e-5, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0,
                                       warmup_epochs=1.0, warmup_steps=-1, schedule_epochs=100.0,
                                       wd_exclude=()))
    c.update(kw)
    return c


def test_warmup_then_cosine_over_a_separate_horizon():
    schedule = optim.make_schedule(optim_config(), steps_per_epoch=10)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(5)), 0.5e-4, rtol=1e-6)  # linear warm-up over 1 epoch
    np.testing.assert_allclose(float(schedule(10)), 1e-4, rtol=1e-6)
    # FLAIR trains 15 of 100 cosine epochs: at step 150 the lr has barely decayed
    expected = 0.5e-4 * (1 + np.cos(np.pi * (150 - 10) / (1000 - 10)))
    np.testing.assert_allclose(float(schedule(150)), expected, rtol=1e-5)
    assert float(schedule(150)) > 0.9e-4
    np.testing.assert_allclose(float(schedule(1000)), 0.0, atol=1e-12)


def test_warmup_steps_override_warmup_epochs():
    """ViLReF warms up for a fixed number of steps (100), whatever the epoch length."""
    schedule = optim.make_schedule(optim_config(warmup_steps=4, schedule_epochs=2.0), steps_per_epoch=10)
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 2, 4)], [0.0, 0.5e-4, 1e-4], rtol=1e-6)
    assert float(schedule(12)) < 1e-4 and float(schedule(20)) == 0.0


def test_weight_decay_mask_excludes_matching_paths():
    params = {"img": {"conv1": {"kernel": jnp.ones(2)}, "bn1": {"scale": jnp.ones(2), "bias": jnp.ones(2)}},
              "logit_scale": jnp.ones(())}
    mask = optim.weight_decay_mask(params, [r"bias$", r"^logit_scale$", r"bn\d*/"])
    assert mask == {"img": {"conv1": {"kernel": True}, "bn1": {"scale": False, "bias": False}}, "logit_scale": False}
    assert all(optim.weight_decay_mask(params, ())["img"]["bn1"].values())  # FLAIR: decay everything


@pytest.mark.parametrize("exclude", [(), (r"^b$",)])
def test_adamw_applies_decay_only_where_masked(exclude):
    tx, _ = optim.make_optimizer(optim_config(lr=0.1, weight_decay=0.5, warmup_epochs=0.0, schedule_epochs=10.0,
                                              wd_exclude=exclude), steps_per_epoch=10)
    params = {"a": jnp.ones(3), "b": jnp.ones(3)}
    zero = {"a": jnp.zeros(3), "b": jnp.zeros(3)}
    updates, _ = tx.update(zero, tx.init(params), params)
    # zero gradients: only weight decay moves the params (-lr * wd * p)
    np.testing.assert_allclose(updates["a"], -0.05, rtol=1e-6)
    np.testing.assert_allclose(updates["b"], 0.0 if exclude else -0.05, rtol=1e-6, atol=1e-12)


def test_gradients_are_clipped_by_global_norm_before_adamw():
    cfg = dict(lr=0.1, weight_decay=0.0, warmup_epochs=0.0, schedule_epochs=10.0)
    clipped_tx, _ = optim.make_optimizer(optim_config(grad_clip=1.0, **cfg), steps_per_epoch=10)
    plain_tx, _ = optim.make_optimizer(optim_config(grad_clip=0.0, **cfg), steps_per_epoch=10)
    params = {"a": jnp.zeros(4)}
    big, small = {"a": jnp.full(4, 10.0)}, {"a": jnp.asarray([0.1, -0.2, 0.3, 0.05])}
    big_clipped = {"a": big["a"] / float(optax.global_norm(big))}  # norm 20 -> 1

    def two_steps(tx, g1, g2):
        state = tx.init(params)
        _, state = tx.update(g1, state, params)
        updates, _ = tx.update(g2, state, params)
        return np.asarray(updates["a"])

    # Adam's first step is scale-invariant, so the clip shows in the second step's moments.
    np.testing.assert_allclose(two_steps(clipped_tx, big, small), two_steps(plain_tx, big_clipped, small), rtol=1e-5)
    assert not np.allclose(two_steps(clipped_tx, big, small), two_steps(plain_tx, big, small), rtol=1e-3)
