"""Multi-label evaluation (docs/methods.md, "ViLReF"): metrics, linear probe, fine-tuning on a copy."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from retina_jax.evals.multilabel import finetune, linear_probe, multilabel_metrics


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


def test_linear_probe_separable_random_and_deterministic():
    rng = np.random.default_rng(0)
    x, y = _separable(rng, 600)
    out = linear_probe(x[:400], y[:400], x[400:], y[400:], steps=300, lr=0.05)
    assert out["macro_auc"] > 0.95 and out["map"] > 0.9, out
    assert out == linear_probe(x[:400], y[:400], x[400:], y[400:], steps=300, lr=0.05)

    noise = (rng.random(y.shape) < 0.3).astype(np.int32)
    out = linear_probe(x[:400], noise[:400], x[400:], noise[400:], steps=300, lr=0.05)
    assert abs(out["macro_auc"] - 0.5) < 0.1, out


def test_linear_probe_class_absent_from_train():
    rng = np.random.default_rng(1)
    x, y = _separable(rng, 300)
    train_y = y[:200].copy()
    train_y[:, 0] = 0  # no positive in train: the head still exists and its bias learns the prior
    out = linear_probe(x[:200], train_y, x[200:], y[200:], steps=100)
    assert np.isfinite(out["train_loss"]) and out["num_classes_scored"] == 4


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
    out = finetune(apply_features, variables, x[:256], y[:256], x[256:], y[256:], feature_dim=16, steps=60,
                   batch_size=32, lr=1e-2, weight_decay=1e-4, seed=0)
    assert out["train_loss_last"] < out["train_loss_first"], out
    assert out["macro_auc"] > 0.75, out
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, variables))
    np.testing.assert_array_equal(apply_features(variables, x[:4], False)[0],
                                  apply_features(before, x[:4], False)[0])
