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
    """NumPy reference written from docs/methods.md, "FLAIR", with analytic gradients."""
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


# ----------------------------------------------------------------------------------------- WSCL


def np_wscl_direction(sim, label_sim, valid, s, coupling="similarity"):
    """NumPy reference of one WSCL direction (docs/methods.md, "ViLReF") from a [B, K] similarity matrix."""
    b, k = sim.shape
    pos = np.eye(b, k, dtype=bool)
    drop = ((label_sim >= 1 - 1e-6) & ~pos) | ~valid[None, :]  # false negatives, unfilled slots
    w = np.where(pos, 1.0, 1.0 - label_sim)
    with np.errstate(divide="ignore", invalid="ignore"):  # log W <= 0 only where the key is dropped anyway
        z = {"similarity": s * w * sim, "log": s * sim + np.log(w), "none": s * sim}[coupling]
    z = np.where(drop, -np.inf, z)
    return -np.mean(_log_softmax(z)[np.arange(b), np.arange(b)])


def np_wscl(sim_i2t, sim_t2i, label_sim, valid, s, coupling="similarity"):
    return 0.5 * (np_wscl_direction(sim_i2t, label_sim, valid, s, coupling)
                  + np_wscl_direction(sim_t2i, label_sim, valid, s, coupling))


def _wscl_inputs(rng, b=6, q=8, d=5, c=4):
    zimg, ztxt = _unit(rng, b, d), _unit(rng, b, d)
    labels = (rng.random((b, c)) < 0.4).astype(np.float32)
    labels[1] = labels[0]  # an in-batch false negative pair
    labels[2] = 0  # an all-zero label vector (cosine 0 with everything)
    queue = dict(queue_img=_unit(rng, q, d), queue_txt=_unit(rng, q, d),
                 queue_labels=(rng.random((q, c)) < 0.4).astype(np.float32),
                 queue_valid=np.arange(q) < q - 3)  # the last 3 slots not filled yet
    queue["queue_labels"][0] = labels[3]  # a queue false negative of row 3
    return zimg, ztxt, labels, queue


def _np_label_cosine(y, yk):
    ny, nk = np.linalg.norm(y, axis=1), np.linalg.norm(yk, axis=1)
    denom = ny[:, None] * nk[None, :]
    return np.where(denom > 0, y @ yk.T / np.where(denom > 0, denom, 1), 0.0)


@pytest.mark.parametrize("coupling", ["similarity", "log", "none"])
def test_wscl_matches_numpy_reference(coupling):
    zimg, ztxt, labels, queue = _wscl_inputs(np.random.default_rng(6))
    ki, kt = np.concatenate([zimg, queue["queue_img"]]), np.concatenate([ztxt, queue["queue_txt"]])
    label_sim = _np_label_cosine(labels, np.concatenate([labels, queue["queue_labels"]]))
    valid = np.concatenate([np.ones(6, bool), queue["queue_valid"]])
    ref = np_wscl(zimg @ kt.T, ztxt @ ki.T, label_sim, valid, math.exp(2.5), coupling)
    got = losses.wscl_loss(zimg, ztxt, labels, jnp.asarray(2.5), coupling=coupling, **queue)
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_wscl_is_clip_loss_without_shared_labels_or_queue():
    rng = np.random.default_rng(7)
    zimg, ztxt = _unit(rng, 8, 4).astype(np.float32), _unit(rng, 8, 4).astype(np.float32)
    labels = np.eye(8, dtype=np.float32)  # no two items share a finding
    empty = dict(queue_img=_unit(rng, 16, 4), queue_txt=_unit(rng, 16, 4), queue_labels=np.zeros((16, 8)),
                 queue_valid=np.zeros(16, bool))  # a fresh queue: nothing valid yet
    for coupling in ("similarity", "log", "none"):
        got = losses.wscl_loss(zimg, ztxt, labels, jnp.asarray(2.0), coupling=coupling, **empty)
        np.testing.assert_allclose(got, losses.clip_loss(zimg, ztxt, jnp.asarray(2.0)), rtol=1e-6)


def test_wscl_false_negatives_and_invalid_slots_get_zero_probability():
    zimg, ztxt, labels, queue = _wscl_inputs(np.random.default_rng(8))
    keys = np.concatenate([ztxt, queue["queue_txt"]])
    label_sim = losses.label_cosine(labels, np.concatenate([labels, queue["queue_labels"]]))
    valid = np.concatenate([np.ones(6, bool), queue["queue_valid"]])
    probs = np.asarray(jax.nn.softmax(losses.wscl_logits(zimg @ keys.T, label_sim, valid, 7.0), axis=-1))
    assert probs[0, 1] == 0.0 and probs[1, 0] == 0.0  # in-batch rows with identical label sets
    assert probs[3, 6 + 0] == 0.0  # the queue entry with row 3's label set
    assert np.all(probs[:, 6 + 5:] == 0.0)  # unfilled queue slots
    assert np.all(np.diag(probs[:, :6]) > 0) and np.allclose(probs.sum(1), 1.0)
    # The all-zero label row has cosine 0 with every key: no false negatives, weights 1.
    assert np.all(probs[2, :6 + 5] > 0)


def test_wscl_negative_gradients_are_scaled_by_label_dissimilarity():
    """dL/dS_ij = s * W_ij * p_ij / B on a negative (coupling 'similarity'), checked against central
    finite differences of the NumPy reference: each negative is pushed with a force scaled by W."""
    rng = np.random.default_rng(9)
    b, k, s = 4, 7, 5.0
    sim = rng.uniform(-1, 1, size=(b, k))
    label_sim = rng.choice([0.0, 0.25, 0.5, 0.8], size=(b, k))
    label_sim[0, 2] = 1.0  # a false negative: no gradient at all
    valid = np.ones(k, bool)

    direction = lambda S: np_wscl_direction(S, label_sim, valid, s)
    eps = 1e-6
    fd = np.zeros_like(sim)
    for i in range(b):
        for j in range(k):
            d = np.zeros_like(sim)
            d[i, j] = eps
            fd[i, j] = (direction(sim + d) - direction(sim - d)) / (2 * eps)
    grad = jax.grad(lambda S: losses._wscl_direction(
        losses.wscl_logits(S, jnp.asarray(label_sim, jnp.float32), jnp.asarray(valid), s), None, 0.0))(
        jnp.asarray(sim, jnp.float32))
    np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-5)
    z = np.asarray(losses.wscl_logits(jnp.asarray(sim, jnp.float32), jnp.asarray(label_sim, jnp.float32),
                                      jnp.asarray(valid), s))
    p = np.exp(_log_softmax(z.astype(np.float64)))
    neg = ~np.eye(b, k, dtype=bool) & (label_sim < 1)
    np.testing.assert_allclose(fd[neg], (s * (1 - label_sim) * p / b)[neg], rtol=1e-3, atol=1e-7)
    assert fd[0, 2] == 0.0  # the false negative is not pushed at all


def test_wscl_momentum_distillation_targets():
    zimg, ztxt, labels, queue = _wscl_inputs(np.random.default_rng(10))
    plain = losses.wscl_loss(zimg, ztxt, labels, jnp.asarray(2.0), **queue)
    same = losses.wscl_loss(zimg, ztxt, labels, jnp.asarray(2.0), alpha=0.4, momentum_img=zimg,
                            momentum_txt=ztxt, **queue)
    # (1 - alpha) * CE + alpha * H(p_m, p); with the momentum model equal to the online one the soft
    # term is the entropy of p. Checked by hand below.
    ki, kt = np.concatenate([zimg, queue["queue_img"]]), np.concatenate([ztxt, queue["queue_txt"]])
    label_sim = np.asarray(losses.label_cosine(labels, np.concatenate([labels, queue["queue_labels"]])))
    valid = np.concatenate([np.ones(6, bool), queue["queue_valid"]])

    def direction(q, keys):
        z = np.asarray(losses.wscl_logits(q @ keys.T, label_sim, valid, math.exp(2.0))).astype(np.float64)
        logp = _log_softmax(z)
        p = np.exp(logp)
        ce = -logp[np.arange(6), np.arange(6)]
        soft = -np.sum(np.where(p > 0, p * logp, 0.0), axis=1)
        return np.mean(0.6 * ce + 0.4 * soft)

    np.testing.assert_allclose(same, 0.5 * (direction(zimg, kt) + direction(ztxt, ki)), rtol=1e-5)
    assert float(same) != pytest.approx(float(plain))
    with pytest.raises(ValueError, match="momentum"):
        losses.wscl_loss(zimg, ztxt, labels, jnp.asarray(2.0), alpha=0.4, **queue)


def test_wscl_equal_on_1_and_8_devices(devices):
    rng = np.random.default_rng(11)
    b, q, d, c = 32, 64, 16, 6
    zimg, ztxt = _unit(rng, b, d).astype(np.float32), _unit(rng, b, d).astype(np.float32)
    labels = (rng.random((b, c)) < 0.3).astype(np.float32)
    queue = [_unit(rng, q, d).astype(np.float32), _unit(rng, q, d).astype(np.float32),
             (rng.random((q, c)) < 0.3).astype(np.float32), np.arange(q) < 40]

    def run(devs):
        mesh = Mesh(np.asarray(devs), ("data",), axis_types=(AxisType.Auto,))
        rows, batch, rep = (NamedSharding(mesh, P("data", None)), NamedSharding(mesh, P("data")),
                            NamedSharding(mesh, P()))

        def f(zi, zt, y, ls, qi, qt, qy, qv):
            return losses.wscl_loss(zi, zt, y, ls, queue_img=qi, queue_txt=qt, queue_labels=qy, queue_valid=qv,
                                    row_sharding=rows)

        step = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 3)))
        args = (jax.device_put(zimg, batch), jax.device_put(ztxt, batch), jax.device_put(labels, batch),
                jax.device_put(np.float32(2.7), rep), *(jax.device_put(a, rep) for a in queue))
        val, grads = step(*args)
        return float(val), [np.asarray(g) for g in grads], step.lower(*args).compile().as_text()

    v1, g1, _ = run(devices[:1])
    v8, g8, hlo8 = run(devices)
    np.testing.assert_allclose(v8, v1, rtol=1e-6)
    for a, b_ in zip(g8, g1):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-7)
    assert "f32[4,96]" in hlo8 and "f32[32,96]" not in hlo8  # [B/8, B + Q] logits per device


def test_wscl_statistics_count_false_negatives_queue_mass_and_cosines():
    """Against explicit counts on hand-set labels and a NumPy softmax of the coupled logits."""
    zimg, ztxt, labels, queue = _wscl_inputs(np.random.default_rng(11))
    b, q = len(labels), len(queue["queue_valid"])
    labels[4] = labels[5] = labels[0]  # rows 0, 1, 4, 5 share one label set: 4 * 3 ordered pairs
    labels[3] = [0, 0, 0, 1]
    labels[2] = [0, 0, 1, 0]
    queue["queue_labels"][:] = [1, 1, 1, 1]
    queue["queue_labels"][0] = labels[3]  # valid, row 3's set
    queue["queue_labels"][q - 1] = labels[3]  # an unfilled slot: not counted
    s = 10.0
    stats = jax.device_get(losses.wscl_statistics(
        zimg, ztxt, labels, np.float32(np.log(s)), queue_txt=queue["queue_txt"],
        queue_labels=queue["queue_labels"], queue_valid=queue["queue_valid"]))
    n_valid = int(queue["queue_valid"].sum())
    assert labels[0].sum() > 0 and not (labels[3] == labels[0]).all()
    np.testing.assert_allclose(stats["false_neg_batch"], 12 / (b * (b - 1)), rtol=1e-6)
    np.testing.assert_allclose(stats["false_neg_queue"], 1 / (b * n_valid), rtol=1e-6)
    keys = np.concatenate([ztxt, queue["queue_txt"]])
    label_sim = _np_label_cosine(labels, np.concatenate([labels, queue["queue_labels"]]))
    valid = np.concatenate([np.ones(b, bool), queue["queue_valid"]])
    pos = np.eye(b, b + q, dtype=bool)
    z = np.where(((label_sim >= 1 - 1e-6) & ~pos) | ~valid[None, :], -np.inf,
                 s * np.where(pos, 1.0, 1.0 - label_sim) * (zimg @ keys.T))
    p = np.exp(_log_softmax(z))
    np.testing.assert_allclose(stats["queue_mass"], p[:, b:].sum(axis=1).mean(), rtol=1e-5)
    cos = zimg @ ztxt.T
    np.testing.assert_allclose(stats["cos_positive"], np.trace(cos) / b, rtol=1e-5)
    np.testing.assert_allclose(stats["cos_negative"], (cos.sum() - np.trace(cos)) / (b * (b - 1)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats["cos_queue"], (zimg @ queue["queue_txt"][:n_valid].T).mean(), rtol=1e-5, atol=1e-7)
    # Without a queue: no queue figures, the in-batch ones unchanged.
    alone = jax.device_get(losses.wscl_statistics(zimg, ztxt, labels, np.float32(np.log(s))))
    assert alone["queue_mass"] == alone["false_neg_queue"] == alone["cos_queue"] == 0.0
    np.testing.assert_allclose(alone["false_neg_batch"], stats["false_neg_batch"])
