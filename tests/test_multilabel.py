"""Multi-label evaluation (docs/methods.md, "ViLReF": Evaluation): metrics, and the one linear probe and
fine-tune with sigmoid heads (the probe's objective against scipy is in tests/test_transfer.py)."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from retina_jax.evals import finetune as finetune_lib, linear_probe as probe_lib
from retina_jax.evals.metrics import multilabel_metrics


def test_metrics_hand_computed():
    labels = np.array([[1, 1, 0, 1], [1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 0, 1]])
    scores = np.tile(np.array([[0.9], [0.8], [0.3], [0.1]]), (1, 4))
    out = multilabel_metrics(labels, scores)
    # Class 0 is perfectly ranked (AUC 1, AP 1). Class 1 ranks P N P N: 3 of 4 (pos, neg) pairs are
    # ordered, AUC 0.75; AP = (1/1 + 2/3) / 2. Class 2 has no positive (no AUC, no AP); class 3 has no
    # negative (no AUC, AP 1).
    assert out["macro_auc"] == pytest.approx((1.0 + 0.75) / 2)
    assert out["map"] == pytest.approx((1.0 + 5 / 6 + 1.0) / 3)
    assert out["num_classes_scored"] == 2 and out["num_examples"] == 4


def test_metrics_shape_error():
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(4, 2\)"):
        multilabel_metrics(np.zeros((4, 3)), np.zeros((4, 2)))


def _separable(rng, n, features=16, classes=4):
    a = rng.normal(size=(features, classes))
    x = rng.normal(size=(n, features)).astype(np.float32)
    return x, (x @ a > 0).astype(np.int32)


def linear_probe(train_x, train_y, test_x, test_y):
    scores, info = probe_lib.fit_predict(train_x, train_y, test_x, num_classes=train_y.shape[1], c=0.5,
                                         standardize=True)
    return {**multilabel_metrics(test_y, scores), **info}


def test_linear_probe_separable_random_and_deterministic():
    rng = np.random.default_rng(0)
    x, y = _separable(rng, 600)
    out = linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert out["macro_auc"] > 0.95 and out["map"] > 0.9, out
    assert out == linear_probe(x[:400], y[:400], x[400:], y[400:])

    noise = (rng.random(y.shape) < 0.3).astype(np.int32)
    out = linear_probe(x[:400], noise[:400], x[400:], noise[400:])
    assert abs(out["macro_auc"] - 0.5) < 0.1, out


def test_linear_probe_class_absent_from_train():
    rng = np.random.default_rng(1)
    x, y = _separable(rng, 300)
    train_y = y[:200].copy()
    train_y[:, 0] = 0  # no positive in train: that finding is scored by the constant 0
    scores, _ = probe_lib.fit_predict(x[:200], train_y, x[200:], num_classes=4, standardize=True)
    assert np.all(scores[:, 0] == 0) and multilabel_metrics(y[200:], scores)["num_classes_scored"] == 4


class _Tower(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(16)(x)
        return nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))


def test_finetune_learns_on_a_copy():
    model = _Tower()
    rng = np.random.default_rng(2)
    x, y = _separable(rng, 320, features=8, classes=3)
    variables = model.init(jax.random.PRNGKey(0), x[:2], train=False)

    def apply_features(v, images, train):
        if train:
            feats, updates = model.apply(v, images, train=True, mutable=["batch_stats"])
            return feats, updates["batch_stats"]
        return model.apply(v, images, train=False), None

    before = jax.tree.map(np.array, variables)
    out = finetune_lib.finetune(apply_features, variables, x[:256], y[:256], x[:0], y[:0], x[256:], num_classes=3,
                                epochs=8, batch_size=32, lr=1e-2, weight_decay=1e-4, grad_clip=0.0, seed=0)
    assert out.history[-1]["train_loss"] < out.history[0]["train_loss"], out.history
    assert multilabel_metrics(y[256:], out.test_probs)["macro_auc"] > 0.75
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, variables))
    np.testing.assert_array_equal(apply_features(variables, x[:4], False)[0],
                                  apply_features(before, x[:4], False)[0])
