"""clip_loss and flair_loss against NumPy references (values and analytic gradients) and on 1 vs 8 devices."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from retina_jax import losses


def _unit(rng, b, d):
    x = rng.normal(size=(b, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def np_flair(zimg, ztxt, cats, logit_scale):
    """NumPy reference written from METHODS.md section 1, with analytic gradients."""
    s = math.exp(min(max(logit_scale, 0.0), math.log(100.0)))
    same = (cats[:, None] == cats[None, :]).astype(np.float64)
    target = same / same.sum(axis=1, keepdims=True)
    logits = s * ztxt @ zimg.T  # [B_txt, B_img]
    b = len(cats)
    l_t = -np.mean(np.sum(target * _log_softmax(logits), axis=1))
    l_i = -np.mean(np.sum(target * _log_softmax(logits.T), axis=1))
    loss = 0.5 * (l_t + l_i)
    p_t = np.exp(_log_softmax(logits))
    p_i = np.exp(_log_softmax(logits.T))
    g = 0.5 * ((p_t - target) / b + ((p_i - target) / b).T)  # dL/dlogits
    grads = {"ztxt": s * g @ zimg, "zimg": s * g.T @ ztxt, "logit_scale": np.sum(g * logits)}
    return loss, grads


def _jax_grads(fn, zimg, ztxt, *args):
    f = lambda zi, zt, ls: fn(zi, zt, *args, ls)
    return jax.value_and_grad(f, argnums=(0, 1, 2))


@pytest.mark.parametrize("cats", [[0, 1, 2, 3, 4, 5], [0, 1, 0, 2, 1, 0], [3, 3, 3, 3, 3, 3]])
@pytest.mark.parametrize("logit_scale", [math.log(1 / 0.07), 5.3, -0.4])
def test_flair_loss_matches_numpy_values_and_gradients(cats, logit_scale):
    rng = np.random.default_rng(0)
    zimg, ztxt, cats = _unit(rng, 6, 5), _unit(rng, 6, 5), np.array(cats)
    ref, ref_grads = np_flair(zimg, ztxt, cats, logit_scale)
    with jax.enable_x64():
        f = lambda zi, zt, ls: losses.flair_loss(zi, zt, jnp.asarray(cats), ls)
        val, (gi, gt, gs) = jax.value_and_grad(f, argnums=(0, 1, 2))(
            jnp.asarray(zimg), jnp.asarray(ztxt), jnp.asarray(logit_scale, jnp.float64))
    np.testing.assert_allclose(val, ref, rtol=1e-10)
    np.testing.assert_allclose(gi, ref_grads["zimg"], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(gt, ref_grads["ztxt"], rtol=1e-8, atol=1e-12)
    # Outside [0, ln 100] the clamp is straight-through: exp() is differentiated at the clamped
    # value with a full gradient, as FLAIR's in-place `.data` clamp does.
    np.testing.assert_allclose(gs, ref_grads["logit_scale"], rtol=1e-8, atol=1e-12)


def test_flair_loss_with_distinct_categories_is_clip_loss():
    rng = np.random.default_rng(1)
    zimg, ztxt = jnp.asarray(_unit(rng, 8, 4)), jnp.asarray(_unit(rng, 8, 4))
    a = losses.flair_loss(zimg, ztxt, jnp.arange(8), jnp.asarray(2.0))
    b = losses.clip_loss(zimg, ztxt, jnp.asarray(2.0))
    np.testing.assert_allclose(a, b, rtol=1e-6)
    # ...and differs once two items share a category.
    c = losses.flair_loss(zimg, ztxt, jnp.asarray([0, 0, 1, 2, 3, 4, 5, 6]), jnp.asarray(2.0))
    assert abs(float(c) - float(a)) > 1e-4


def test_clip_loss_matches_numpy_values_and_gradients():
    rng = np.random.default_rng(2)
    zimg, ztxt = _unit(rng, 7, 3), _unit(rng, 7, 3)
    ref, ref_grads = np_flair(zimg, ztxt, np.arange(7), 2.5)  # identity target = CLIP
    with jax.enable_x64():
        val, (gi, gt, gs) = jax.value_and_grad(losses.clip_loss, argnums=(0, 1, 2))(
            jnp.asarray(zimg), jnp.asarray(ztxt), jnp.asarray(2.5, jnp.float64))
    np.testing.assert_allclose(val, ref, rtol=1e-10)
    np.testing.assert_allclose(gi, ref_grads["zimg"], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(gt, ref_grads["ztxt"], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(gs, ref_grads["logit_scale"], rtol=1e-8, atol=1e-12)


def test_logit_scale_is_clamped_to_ln100():
    rng = np.random.default_rng(3)
    zimg, ztxt = jnp.asarray(_unit(rng, 4, 3)), jnp.asarray(_unit(rng, 4, 3))
    hi = losses.clip_loss(zimg, ztxt, jnp.asarray(9.0))
    cap = losses.clip_loss(zimg, ztxt, jnp.asarray(math.log(100.0)))
    lo = losses.clip_loss(zimg, ztxt, jnp.asarray(-3.0))
    zero = losses.clip_loss(zimg, ztxt, jnp.asarray(0.0))
    np.testing.assert_allclose(hi, cap, rtol=1e-6)
    np.testing.assert_allclose(lo, zero, rtol=1e-6)


@pytest.mark.parametrize("name", ["flair", "clip"])
def test_loss_and_grads_equal_on_1_and_8_devices(devices, name):
    rng = np.random.default_rng(4)
    b, d = 32, 16
    zimg, ztxt = _unit(rng, b, d).astype(np.float32), _unit(rng, b, d).astype(np.float32)
    cats = rng.integers(0, 5, size=b).astype(np.int32)

    def run(devs):
        mesh = Mesh(np.asarray(devs), ("data",), axis_types=(AxisType.Auto,))
        rows = NamedSharding(mesh, P("data", None))
        batch = NamedSharding(mesh, P("data"))

        def f(zi, zt, c, ls):
            if name == "flair":
                return losses.flair_loss(zi, zt, c, ls, row_sharding=rows)
            return losses.clip_loss(zi, zt, ls, row_sharding=rows)

        step = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 3)))
        args = (jax.device_put(zimg, batch), jax.device_put(ztxt, batch), jax.device_put(cats, batch),
                jax.device_put(np.float32(2.7), NamedSharding(mesh, P())))
        val, grads = step(*args)
        hlo = step.lower(*args).compile().as_text()
        return float(val), [np.asarray(g) for g in grads], hlo

    v1, g1, _ = run(devices[:1])
    v8, g8, hlo8 = run(devices)
    np.testing.assert_allclose(v8, v1, rtol=1e-6)
    for a, b_ in zip(g8, g1):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-7)
    # Row-sharded logits: each device's program holds a [B/8, B] logits block, never [B, B].
    assert "f32[4,32]" in hlo8 and "f32[32,32]" not in hlo8


def test_local_scope_groups_the_batch():
    rng = np.random.default_rng(5)
    zimg, ztxt = jnp.asarray(_unit(rng, 8, 4)), jnp.asarray(_unit(rng, 8, 4))
    cats = jnp.asarray([0, 1, 0, 1, 2, 2, 3, 3])
    local = losses.grouped(losses.flair_loss, 2)(zimg, ztxt, cats, logit_scale=jnp.asarray(2.0))
    halves = [losses.flair_loss(zimg[i:i + 4], ztxt[i:i + 4], cats[i:i + 4], jnp.asarray(2.0)) for i in (0, 4)]
    np.testing.assert_allclose(local, np.mean(halves), rtol=1e-6)
    assert abs(float(local) - float(losses.flair_loss(zimg, ztxt, cats, jnp.asarray(2.0)))) > 1e-4
