"""The transfer-evaluation suite (docs/methods.md, "FLAIR": Transfer protocols): FLAIR's splits, the adapters
against NumPy, fine-tuning's early stopping on a copy, retrieval recall@k, the reports, and the
evaluate CLI running every protocol on a tiny trained checkpoint."""
import json
import os
import random
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from configs import common
from retina_jax.evals import adapters, base, finetune, linear_probe, report, retrieval, splits, suite
from retina_jax.evals.metrics import classification_metrics
from test_train import DEMO, REPO, cli_flags, subprocess_env, tiny_config


# --------------------------------------------------------------------------------------- splits
def _labels(counts):
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return np.random.default_rng(0).permutation(labels)


def test_split_counts_and_percentages_per_class():
    labels = _labels([10, 7, 5])
    s = splits.class_split(labels, 0, shots_train="50%", shots_test=2, shots_val="20%")
    for c, n in enumerate([10, 7, 5]):
        # test: 2; train: floor(0.5 n); val: floor(0.2 n), each counted on the class's examples.
        assert np.sum(labels[s.test] == c) == 2
        assert np.sum(labels[s.train] == c) == int(0.5 * n)
        assert np.sum(labels[s.val] == c) == int(0.2 * n)
    parts = [set(s.train.tolist()), set(s.val.tolist()), set(s.test.tolist())]
    assert sum(map(len, parts)) == len(set().union(*parts))  # disjoint, no repeats


def test_split_folds_reproduce_flair_and_differ():
    labels = _labels([9, 6, 4])

    def flair(seed, n_test_frac=0.2, n_train_frac=0.8):  # get_dataloader_splits, transliterated
        data = [{"i": i, "label": int(y)} for i, y in enumerate(labels)]
        random.seed(seed)
        random.shuffle(data)
        ys = np.array([d["label"] for d in data])
        train, test = [], []
        for c in np.unique(ys):
            idx = list(np.squeeze(np.argwhere(ys == c)))
            n_train, n_test = int(80 / 100 * len(idx)), int(20 / 100 * len(idx))
            test += [data[i]["i"] for i in idx[:n_test]]
            train += [data[i]["i"] for i in idx[n_test:n_test + n_train]]
        return train, test

    folds = splits.fold_splits(labels, 3, "80%", "20%")
    for k, s in enumerate(folds):
        train, test = flair(k)
        assert s.seed == k and s.train.tolist() == train and s.test.tolist() == test
    assert folds[0].test.tolist() != folds[1].test.tolist()
    again = splits.fold_splits(labels, 3, "80%", "20%")
    assert all(a.train.tolist() == b.train.tolist() for a, b in zip(folds, again))


def test_split_too_few_examples_names_the_class():
    with pytest.raises(ValueError, match=r"class 'glaucoma' has 3 examples, too few"):
        splits.class_split(_labels([8, 3]), 0, shots_train=2, shots_test=2, classes=["normal", "glaucoma"])
    with pytest.raises(ValueError, match=r"shots_train='abc'"):
        splits.class_split(_labels([8, 3]), 0, shots_train="abc", shots_test=1)


def test_split_balance_oversamples_train_to_the_largest_class():
    labels = _labels([12, 4])
    s = splits.class_split(labels, 1, "75%", "25%", balance=True)
    assert np.bincount(labels[s.train]).tolist() == [9, 9]
    assert set(s.train.tolist()).isdisjoint(s.test.tolist())
    assert len(set(s.train[labels[s.train] == 1].tolist())) == 3  # class 1's 3 train examples, repeated


def test_fold_summary_mean_and_population_std():
    out = splits.fold_summary([{"aca": 0.5, "n": 2}, {"aca": 0.7, "n": 4}])
    assert out["mean"]["aca"] == pytest.approx(0.6) and out["std"]["aca"] == pytest.approx(0.1)


# ------------------------------------------------------------------------------------- adapters
def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _separable(seed, n_per_class=30, classes=3, dim=16, noise=0.3, noise_seed=None):
    """Unit features around 3 class means, and noisy (but informative) prototypes of them."""
    rng = np.random.default_rng(seed)
    means = _unit(rng.normal(size=(classes, dim)))
    protos = (means + 0.5 * rng.normal(size=means.shape) / np.sqrt(dim)).astype(np.float32)
    y = np.repeat(np.arange(classes), n_per_class)
    noise_rng = rng if noise_seed is None else np.random.default_rng(noise_seed)
    x = _unit(means[y] + noise * noise_rng.normal(size=(len(y), dim)) / np.sqrt(dim)).astype(np.float32)
    return x, y, protos


def test_tip_adapter_logits_formula():
    rng = np.random.default_rng(0)
    x, keys, protos = _unit(rng.normal(size=(5, 8))), _unit(rng.normal(size=(7, 8))), rng.normal(size=(3, 8))
    values = adapters.one_hot(rng.integers(0, 3, 7), 3)
    expected = 100 * x @ protos.T + 1.5 * np.exp(-4.0 * (1 - x @ keys.T)) @ values
    np.testing.assert_allclose(adapters.tip_adapter_logits(x, protos, keys, values, alpha=1.5, beta=4.0), expected,
                               rtol=1e-5, atol=1e-4)
    # FLAIR's defaults: alpha 1, beta 5.
    np.testing.assert_allclose(adapters.tip_adapter_logits(x, protos, keys, values),
                               100 * x @ protos.T + np.exp(-5 * (1 - x @ keys.T)) @ values, rtol=1e-5, atol=1e-4)


def test_tip_adapter_f_training_logits_keep_flairs_form():
    rng = np.random.default_rng(1)
    x, keys, protos = _unit(rng.normal(size=(2, 8))), _unit(rng.normal(size=(6, 8))), rng.normal(size=(3, 8))
    values = adapters.one_hot(rng.integers(0, 3, 6), 3)
    expected = 20 * x @ protos.T + 1.0 * 20 * np.exp(-5 * (1 - x @ keys.T)) @ values / 6
    np.testing.assert_allclose(adapters.tip_adapter_f_train_logits(jnp.asarray(keys, jnp.float32), jnp.asarray(
        x, jnp.float32), jnp.asarray(protos, jnp.float32), jnp.asarray(values), 20.0), expected, rtol=1e-5, atol=1e-4)


def test_tip_adapter_f_keys_start_from_the_cache_and_train():
    x, y, protos = _separable(2)
    untrained = adapters.train_tip_adapter_f(x, y, protos, 10.0, epochs=1, lr=0.0)
    np.testing.assert_array_equal(untrained, x)  # lr 0: the keys are the cache, in its order
    trained = adapters.train_tip_adapter_f(x, y, protos, 10.0, epochs=3, lr=1e-3)
    assert np.abs(trained - x).max() > 1e-3


def test_clip_adapter_residual_form():
    rng = np.random.default_rng(3)
    params = adapters.clip_adapter_init(jax.random.PRNGKey(0), 16)
    assert params["w1"].shape == (16, 4) and params["w2"].shape == (4, 16)
    bound = 1 / np.sqrt(16)  # torch's Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert np.abs(params["w1"]).max() <= bound and np.abs(params["w1"]).max() > 0.8 * bound
    x = _unit(rng.normal(size=(4, 16))).astype(np.float32)
    w1, w2 = np.asarray(params["w1"]), np.asarray(params["w2"])
    mixed = 0.2 * np.maximum(np.maximum(x @ w1, 0) @ w2, 0) + 0.8 * x
    np.testing.assert_allclose(adapters.clip_adapter_features(params, x), _unit(mixed), rtol=1e-5, atol=1e-6)


def _minimise_logistic(x, y, weights, c, softmax: bool):
    """The probe's objective minimised by scipy's BFGS, independently of scikit-learn: sum_i w_i CE_i +
    ||W||^2 / (2C), the intercept unpenalised. Softmax: y class ids, returns [M, K] coefficient
    function; sigmoid: y in {0, 1}."""
    from scipy.optimize import minimize
    from scipy.special import log_softmax, log_expit
    num_features = x.shape[1]
    k = int(y.max()) + 1 if softmax else 1

    def unpack(theta):
        return theta[:num_features * k].reshape(num_features, k), theta[num_features * k:]

    def objective(theta):
        w, b = unpack(theta)
        logits = x @ w + b
        if softmax:
            nll = -log_softmax(logits, axis=1)[np.arange(len(y)), y]
        else:
            z = logits[:, 0]
            nll = -(y * log_expit(z) + (1 - y) * log_expit(-z))
        return np.sum(weights * nll) + np.sum(w ** 2) / (2 * c)

    theta = minimize(objective, np.zeros(num_features * k + k), method="BFGS", options={"gtol": 1e-9}).x
    return unpack(theta)


def test_linear_probe_single_label_is_flairs_balanced_logistic_regression():
    rng = np.random.default_rng(4)
    y = np.array([0] * 40 + [1] * 8 + [2] * 12)
    x = rng.normal(size=(len(y), 6)) + 0.8 * np.eye(6)[y]
    test_x = rng.normal(size=(7, 6))
    probs, info = linear_probe.fit_predict(x, y, test_x, num_classes=4, c=0.316, balanced=True)
    # 'balanced': each class weighted by N / (K n_c); the optimum of that objective, found by scipy.
    counts = np.bincount(y)
    w, b = _minimise_logistic(x, y, (len(y) / (3 * counts))[y], 0.316, softmax=True)
    logits = test_x @ w + b
    want = np.exp(logits - logits.max(1, keepdims=True))
    # Within lbfgs's stopping tolerance (scikit-learn's default tol 1e-4, which FLAIR keeps).
    np.testing.assert_allclose(probs[:, :3], want / want.sum(1, keepdims=True), atol=2e-3)
    assert np.all(probs[:, 3] == 0) and info["iterations"] > 0  # a 4th class absent from train: probability 0
    unbalanced, _ = linear_probe.fit_predict(x, y, test_x, num_classes=4, c=0.316)
    assert np.abs(unbalanced - probs).max() > 1e-2


def test_linear_probe_multilabel_is_one_standardised_logistic_regression_per_finding():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(80, 5)) * [1.0, 3.0, 0.5, 2.0, 1.0] + [0.0, 5.0, -1.0, 0.0, 2.0]
    y = np.stack([(x[:, 0] + rng.normal(size=80) > 0), (x[:, 1] > 5.5), np.zeros(80, bool)], axis=1).astype(int)
    test_x = rng.normal(size=(9, 5))
    scores, _ = linear_probe.fit_predict(x, y, test_x, num_classes=3, c=0.5, standardize=True)
    mean, std = x.mean(axis=0), x.std(axis=0)  # population std, as StandardScaler
    for k in (0, 1):
        w, b = _minimise_logistic((x - mean) / std, y[:, k], np.ones(80), 0.5, softmax=False)
        want = 1 / (1 + np.exp(-(((test_x - mean) / std) @ w + b)[:, 0]))
        np.testing.assert_allclose(scores[:, k], want, atol=2e-3)
    # A finding without a positive in train is scored by that constant.
    np.testing.assert_array_equal(scores[:, 2], 0.0)


def test_every_adapter_separates_separable_features():
    x, y, protos = _separable(5)
    test_x, test_y, _ = _separable(5, noise_seed=6)  # the same classes, fresh examples
    scale = 20.0
    results = {
        "linear_probe": linear_probe.fit_predict(x, y, test_x, num_classes=3, balanced=True)[0],
        "clip_adapter": adapters.clip_adapter_probs(adapters.train_clip_adapter(x, y, protos, scale, epochs=5), test_x,
                                                    protos, scale),
        "tip_adapter": adapters.tip_adapter_probs(test_x, protos, x, adapters.one_hot(y, 3)),
        "tip_adapter_f": adapters.tip_adapter_probs(test_x, protos, adapters.train_tip_adapter_f(x, y, protos, scale,
                                                                                                 epochs=5),
                                                    adapters.one_hot(y, 3)),
    }
    for name, probs in results.items():
        assert classification_metrics(test_y, probs)["aca"] > 0.9, name


def test_tip_search_picks_the_best_validation_pair():
    x, y, protos = _separable(8)
    values = adapters.one_hot(y, 3)
    wrong = -protos  # misleading prototypes: only a large cache weight gets it right
    alpha, beta = adapters.search_tip_hyperparameters(x, y, wrong, x, values, scale=(7.0, 3.0), steps=(5, 4))
    acc = np.mean(adapters.tip_adapter_logits(x, wrong, x, values, alpha, beta).argmax(1) == y)
    assert acc == max(np.mean(adapters.tip_adapter_logits(x, wrong, x, values, a, b).argmax(1) == y)
                      for a in (0.1, 0.825, 1.55, 2.275) for b in (0.1, 1.48, 2.86, 4.24, 5.62))


# ------------------------------------------------------------------------------------- finetune
class _Tower(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(16)(x)
        return nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))


def _apply_features(variables, images, train):
    if train:
        feats, updates = _Tower().apply(variables, images, train=True, mutable=["batch_stats"])
        return feats, updates["batch_stats"]
    return _Tower().apply(variables, images, train=False), None


def test_finetune_early_stopping_restores_the_best_epoch_on_a_copy():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(96, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    variables = _Tower().init(jax.random.PRNGKey(0), x[:2], train=False)
    before = jax.tree.map(np.array, variables)
    # Validation labels inverted: the better the model fits train, the worse its validation F1, so the best
    # epoch comes early and training stops `patience` epochs later.
    kwargs = dict(num_classes=2, batch_size=16, lr=3e-2, seed=0, eval_batch_size=32)
    out = finetune.finetune(_apply_features, variables, x[:64], y[:64], x[64:80], 1 - y[64:80], x[80:], epochs=12,
                            patience=3, **kwargs)
    f1 = [h["val_score"] for h in out.history]
    assert out.best_epoch == int(np.argmax(f1)) + 1 and len(f1) == out.best_epoch + 3 < 12
    # Re-running up to the best epoch gives the same weights and test predictions: the best were restored.
    upto = finetune.finetune(_apply_features, variables, x[:64], y[:64], x[64:80], 1 - y[64:80], x[80:],
                             epochs=out.best_epoch, patience=100, **kwargs)
    jax.tree.map(np.testing.assert_array_equal, out.variables, upto.variables)
    np.testing.assert_allclose(out.test_probs, upto.test_probs, rtol=1e-6)
    tuned = out.variables["params"]["tower"]["Dense_0"]["kernel"]
    assert np.abs(tuned - before["params"]["Dense_0"]["kernel"]).max() > 0
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, variables))


def test_multilabel_finetune_trains_sigmoid_heads_to_the_last_epoch_on_a_copy():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(80, 8)).astype(np.float32)
    y = np.stack([x[:, 0] > 0, x[:, 1] > 0.5, np.zeros(80, bool)], axis=1).astype(np.float32)
    variables = _Tower().init(jax.random.PRNGKey(0), x[:2], train=False)
    before = jax.tree.map(np.array, variables)
    out = finetune.finetune(_apply_features, variables, x[:64], y[:64], x[:0], y[:0], x[64:], num_classes=3,
                            epochs=6, batch_size=16, lr=3e-2, grad_clip=0.0, seed=0, eval_batch_size=32)
    # No validation split: every epoch runs and the last one's weights are kept.
    assert [h["epoch"] for h in out.history] == list(range(1, 7)) and out.best_epoch == 6
    assert "val_score" not in out.history[0] and out.history[-1]["train_loss"] < out.history[0]["train_loss"]
    # The test scores are the sigmoids of the kept head on the kept tower, recomputed here.
    v = out.variables
    feats = _Tower().apply({"params": v["params"]["tower"], "batch_stats": v["batch_stats"]}, x[64:], train=False)
    logits = np.asarray(feats) @ v["params"]["head"]["w"] + v["params"]["head"]["b"]
    np.testing.assert_allclose(out.test_probs, 1 / (1 + np.exp(-logits)), rtol=1e-5, atol=1e-6)
    # The head of the finding without a positive started at its (clipped) prior and kept pushing down.
    assert out.test_probs[:, 2].max() < 1e-3
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, variables))
    with pytest.raises(ValueError, match=r"\[N, 3\] multi-hot labels"):
        finetune.finetune(_apply_features, variables, x, y[:, :2], x[:0], y[:0, :2], x, num_classes=3)


def test_finetune_needs_a_validation_split():
    x = np.zeros((8, 8), np.float32)
    variables = _Tower().init(jax.random.PRNGKey(0), x[:2], train=False)
    with pytest.raises(ValueError, match="validation split"):
        finetune.finetune(_apply_features, variables, x, np.zeros(8, int), x[:0], np.zeros(0, int), x, num_classes=2)


# ------------------------------------------------------------------------------------ retrieval
def _brute_recall(scores, positives, k):
    hits = []
    for s, p in zip(scores, positives):
        # Descending score; among equal scores the wrong items first (ties against the query).
        order = np.lexsort((p.astype(int), -s))
        hits.append(p[order[:k]].any())
    return float(np.mean(hits))


def test_recall_at_k_against_brute_force_with_ties():
    rng = np.random.default_rng(10)
    scores = np.round(rng.normal(size=(40, 40)), 1)  # coarse: many exact ties
    texts = [f"report {i % 31}" for i in range(40)]  # some identical reports: several correct items
    positives = retrieval.pair_positives(texts)
    got = retrieval.recall_at_k(scores, positives, (1, 5, 10))
    for k in (1, 5, 10):
        assert got[k] == pytest.approx(_brute_recall(scores, positives, k))
    # A constant similarity ranks every wrong item level with the right one: no hit until k > N - 1.
    flat = retrieval.recall_at_k(np.zeros((4, 4)), np.eye(4, dtype=bool), (1, 3, 4))
    assert flat == {1: 0.0, 3: 0.0, 4: 1.0}


def test_retrieval_metrics_both_directions():
    z = _unit(np.random.default_rng(11).normal(size=(12, 8)))
    texts = [f"t{i}" for i in range(12)]
    out = retrieval.retrieval_metrics(z, z, texts)
    assert out["i2t_r1"] == out["t2i_r1"] == 1.0 and out["num_pairs"] == 12
    shuffled = retrieval.retrieval_metrics(z, z[::-1], texts)  # image i paired with text 11 - i
    assert shuffled["i2t_r1"] == pytest.approx(0.0)


# --------------------------------------------------------------------------------------- report
def test_report_writes_markdown_and_the_plots_it_references(tmp_path):
    rng = np.random.default_rng(12)
    labels = rng.integers(0, 3, 30)
    probs = rng.dirichlet(np.ones(3), 30)
    fold = {"fold": 0, "seed": 0, **classification_metrics(labels, probs)}
    settings = [{"shots_train": s, "shots_val": "0", "shots_test": "20%", "folds": [fold],
                 **splits.fold_summary([fold])} for s in ("1", "5")]
    result = {"task": "t", "protocol": "linear_probe", "kind": "classification", "classes": ["a", "b", "c"],
              "settings": settings}
    paths = report.write_report(str(tmp_path), result, {"labels": labels, "probs": probs})
    markdown = open(paths["markdown"]).read()
    for key in ("confusion", "roc", "few_shot"):
        name = os.path.basename(paths[key])
        assert f"]({name})" in markdown
        assert open(paths[key], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(paths["json"]))["settings"][1]["shots_train"] == "5"


def test_report_plots_multilabel_auc_and_retrieval_recall(tmp_path):
    rng = np.random.default_rng(3)
    labels = (rng.random((40, 4)) < 0.4).astype(np.uint8)
    labels[:, 3] = 0  # a class with no positive gets no bar (and no crash)
    scores = {"linear_probe": rng.random((40, 4)), "finetune": labels + 0.1 * rng.random((40, 4))}
    result = {"task": "t", "protocol": "multilabel", "kind": "multilabel", "classes": ["a", "b", "c", "d"],
              "metrics": {"linear_probe": {"macro_auc": 0.5}, "finetune": {"macro_auc": 1.0}}}
    paths = report.write_report(str(tmp_path), result, {"labels": labels, "scores": scores})
    assert open(paths["per_class_auc"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "](multilabel_per_class_auc.png)" in open(paths["markdown"]).read()
    z = _unit(rng.normal(size=(12, 8)))
    ranks = retrieval.retrieval_ranks(z, z[::-1], [str(i) for i in range(12)])
    assert retrieval.recall_summary(ranks) == retrieval.retrieval_metrics(z, z[::-1], [str(i) for i in range(12)])
    result = {"task": "t", "protocol": "retrieval", "kind": "retrieval", "metrics": {"recall": {"i2t_r1": 0.0}}}
    paths = report.write_report(str(tmp_path), result, {"ranks": ranks})
    assert open(paths["recall"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "](retrieval_recall.png)" in open(paths["markdown"]).read()


# -------------------------------------------------------------------------- suite and the CLI
def test_split_settings_layering():
    task = suite.TaskData("t", "classification", None, int, ("a", "b"),
                          splits={"linear_probe": {"shots_train": 5, "folds": 3}})
    probe, tip = suite.TransferLinearProbe, suite.TransferTipAdapter
    s = suite.split_settings(probe.protocol, probe.default_splits, task, shots_test="2")
    assert s == [{"shots_train": "5", "shots_val": "0%", "shots_test": "2", "folds": 3, "balance": False}]
    curve = suite.split_settings(tip.protocol, tip.default_splits, task, shots_train=["1", "4"])
    assert [c["shots_train"] for c in curve] == ["1", "4"] and curve[0]["folds"] == 5
    # An entry's settings are its type's; a misspelt one is an error naming the type's settings.
    with pytest.raises(ValueError, match=r"evaluator 'transfer_tip_adapter' has no settings \['alfa'\]"):
        common.evaluator("transfer_tip_adapter", alfa=2.0)
    with pytest.raises(ValueError, match="unknown evaluator type 'lp'"):
        common.evaluator("lp")


def test_synthetic_tasks_and_protocol_defaults():
    config = tiny_config()
    kinds = {name: suite.load_task(config, name).kind for name in suite.synthetic_task_names(config)}
    assert kinds == {"synthetic_conditions": "classification", "synthetic_dr_grade": "classification",
                     "synthetic_conditions_external": "classification", "synthetic_findings": "multilabel",
                     "synthetic_reports": "retrieval", "synthetic_lesions": "segmentation"}
    # The external stand-in: the zero-shot task's classes on other images.
    internal, external = (suite.load_task(config, n) for n in ("synthetic_conditions", "synthetic_conditions_external"))
    assert external.classes == internal.classes and len(external.source) == len(internal.source)
    assert external.source.record(0)["report_en"] != internal.source.record(0)["report_en"]
    suite.check_external(internal, external)
    with pytest.raises(ValueError, match=r"external test task 'synthetic_dr_grade' has classes"):
        suite.check_external(internal, suite.load_task(config, "synthetic_dr_grade"))
    with pytest.raises(ValueError, match=r"external tests apply to classification tasks"):
        suite.check_external(internal, suite.load_task(config, "synthetic_findings"))
    types = ("transfer_tip_adapter", "multilabel_linear_probe", "transfer_retrieval", "transfer_segmentation")
    assert [base.make(config, t).task_name() for t in types] == [
        "synthetic_conditions", "synthetic_findings", "synthetic_reports", "synthetic_lesions"]
    grade = suite.load_task(config, "synthetic_dr_grade")
    record = grade.source.record(3)
    assert grade.label(record) == record["dr_grade"] and len(grade.classes) == 5
    # The shipped task file's defaults: KeepFIT's 5-shot adapters, FLAIR's zero-shot on everything.
    conditions = suite.load_task(config, "synthetic_conditions")
    tip, zero = suite.TransferTipAdapter, suite.TransferZeroShot
    assert suite.split_settings(tip.protocol, tip.default_splits, conditions)[0]["shots_train"] == "5"
    assert suite.split_settings(zero.protocol, zero.default_splits, conditions)[0]["shots_test"] == "100%"
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        suite.load_task(config, "nope")


# test_train's 32 px TINY run, 4 steps with one checkpoint (the compiled train step is test_train's, so a
# session that ran it reuses the compilation), with held-out sets small enough for a CPU: 96
# single-condition images for the classification protocols, 32 + 32 for the multi-label heads.
HELDOUT = {"heldout.conditions.size": 96, "heldout.findings.train_size": 32, "heldout.findings.test_size": 32,
           "evals.multilabel_finetune.epochs": 1, "evals.multilabel_finetune.batch_size": 8}
RUN = {"train.epochs": 1.0, "train.checkpoint_every": 100}


def run_eval(trainer, encoder, type_, out_dir, data_root=None, **settings) -> dict:
    """The whole result of evaluator `type_` (its default settings, `settings` overridden) on the model
    bound to `encoder`; evaluators given the same bound encoder share its task features."""
    evaluator = base.make(trainer.config, type_, out_dir=str(out_dir), data_root=data_root, **settings)
    return evaluator.run(encoder)[1]["result"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from retina_jax.train import Trainer
    workdir = str(tmp_path_factory.mktemp("transfer_run"))
    trainer = Trainer(tiny_config(**HELDOUT, **RUN), workdir)
    result = trainer.train()
    return trainer, result, workdir


def test_zero_shot_protocol_equals_the_trainers_evaluation(trained, tmp_path):
    trainer, result, _ = trained
    state = trainer.state
    encoder = trainer.encoder.at(state.params, state.batch_stats)
    out = run_eval(trainer, encoder, "transfer_zero_shot", tmp_path)
    assert out["task"] == trainer.config.heldout.conditions.name
    assert out["settings"][0]["folds"][0]["num_test"] == 96
    for key in ("aca", "kappa", "f1", "auc"):
        assert out["settings"][0]["mean"][key] == pytest.approx(result[key], abs=1e-6)


def test_a_users_task_file_runs_on_real_photographs(trained, tmp_path):
    """A FLAIR-format dataframe of the three sample photographs (4 variants each) behind a task file."""
    from PIL import Image
    trainer = trained[0]
    samples = os.path.join(REPO, "tests", "data", "fundus_samples")
    classes = {"normal_sample.png": "normal", "sample_macular_hole.png": "macular hole",
               "severe_nonprol_dr.jpg": "diabetic retinopathy"}
    rows = []
    for file, category in classes.items():
        image = Image.open(os.path.join(samples, file)).convert("RGB")
        variants = [image, image.transpose(Image.FLIP_LEFT_RIGHT), image.rotate(8),
                    image.crop((0, 0, image.width * 9 // 10, image.height * 9 // 10))]
        for k, variant in enumerate(variants):
            name = f"{category.replace(' ', '_')}_{k}.png"
            variant.resize((64, 64)).save(tmp_path / name)
            rows.append(f"{len(rows)},{name},[],\"['{category}']\"")
    (tmp_path / "photos.csv").write_text(",image,atributes,categories\n" + "\n".join(rows) + "\n")
    task_file = tmp_path / "photos.json"
    task_file.write_text(json.dumps({
        "name": "photos", "source": "test", "kind": "classification", "dataframe": "photos.csv",
        "classes": list(classes.values()), "descriptions": {},
        "splits": {"linear_probe": {"shots_train": 2, "shots_test": 2, "folds": 2}}}))
    task = suite.load_task(trainer.config, str(task_file), str(tmp_path))
    assert task.classes == tuple(classes.values()) and len(task.source) == 12
    encoder = trainer.encoder.at(trainer.state.params, trainer.state.batch_stats)
    on_photos = dict(out_dir=tmp_path / "out", data_root=str(tmp_path), task=str(task_file))
    probe = run_eval(trainer, encoder, "transfer_linear_probe", **on_photos)
    assert [f["num_train"] for f in probe["settings"][0]["folds"]] == [6, 6]
    assert os.path.isfile(tmp_path / "out" / "photos" / "transfer_linear_probe.md")
    zero = run_eval(trainer, encoder, "transfer_zero_shot", **on_photos)
    assert zero["settings"][0]["folds"][0]["num_test"] == 12
    # The two evaluators shared one view of the task (the bound encoder's cache).
    [features] = [v for k, v in encoder.cache.items() if k[:2] == ("task", str(task_file))]
    # FLAIR's quirk switch `tip_test_augment`: Tip-Adapter scores the test images' augmented features
    # (on, the default) or their plain ones (off).
    split = splits.Split(seed=0, train=np.arange(6), val=np.zeros((0,), np.int64), test=np.arange(6, 12))
    values = adapters.one_hot(features.labels[:6], len(task.classes))
    for augment, test_features in ((True, features.zimg_augmented), (False, features.zimg)):
        probs, _ = base.make(trainer.config, "transfer_tip_adapter", test_augment=augment).fit_predict(features, split)
        # Tip-Adapter's formula in NumPy (FLAIR's alpha 1, beta 5): keys are the train images' plain features.
        x = np.asarray(test_features[6:], np.float64)
        logits = 100 * x @ features.prototypes.T + np.exp(-5.0 * (1 - x @ features.zimg[:6].T)) @ values
        want = np.exp(logits - logits.max(1, keepdims=True))
        np.testing.assert_allclose(probs, want / want.sum(1, keepdims=True), rtol=1e-4, atol=1e-6)
    assert not np.allclose(features.zimg_augmented[6:], features.zimg[6:])
    with pytest.raises(ValueError, match="data root"):
        suite.load_task(trainer.config, str(task_file))

    # An external test set (FLAIR's --experiment_test): each fold's fitted probe also predicts every row
    # of another task with the same classes (here the photographs flipped upside down).
    rows = []
    for k, (file, category) in enumerate(classes.items()):
        name = f"flipped_{k}.png"
        Image.open(os.path.join(samples, file)).convert("RGB").transpose(Image.FLIP_TOP_BOTTOM).resize(
            (64, 64)).save(tmp_path / name)
        rows.append(f"{k},{name},[],\"['{category}']\"")
    (tmp_path / "flipped.csv").write_text(",image,atributes,categories\n" + "\n".join(rows) + "\n")
    external_file = tmp_path / "flipped.json"
    external_file.write_text(json.dumps({"name": "flipped", "source": "test", "kind": "classification",
                                         "dataframe": "flipped.csv", "classes": list(classes.values()),
                                         "descriptions": {}, "splits": {}}))
    external = suite.TaskFeatures(trainer.config, encoder, suite.load_task(trainer.config, str(external_file),
                                                                           str(tmp_path)))
    out = run_eval(trainer, encoder, "transfer_linear_probe", **on_photos, test_task=str(external_file))
    setting = out["settings"][0]
    assert [f["num_test"] for f in setting["folds"]] == [6, 6]  # the internal test split is unchanged
    flipped = setting["external"]["flipped"]
    for k, fold in enumerate(flipped["folds"]):
        split = splits.fold_splits(features.labels, 2, "2", "2")[k]
        # FLAIR's probe, straight from scikit-learn.
        clf = LogisticRegression(C=0.316, class_weight="balanced", max_iter=1000).fit(
            features.features[split.train], features.labels[split.train])
        want = classification_metrics(external.labels, clf.predict_proba(external.features))
        assert fold["num_test"] == 3 and fold["num_train"] == 6
        assert all(fold[m] == pytest.approx(want[m]) for m in ("aca", "kappa", "f1", "auc"))
    assert flipped["mean"]["aca"] == pytest.approx(np.mean([f["aca"] for f in flipped["folds"]]))
    markdown = open(tmp_path / "out" / "photos" / "transfer_linear_probe.md").read()
    assert "## External test flipped" in markdown
    # Only the external rows: an empty internal test split is then allowed.
    only = run_eval(trainer, encoder, "transfer_zero_shot", **on_photos, shots_test="0", test_task=str(external_file))
    assert only["settings"][0]["folds"] == [] and only["settings"][0]["external"]["flipped"]["folds"][0]["num_test"] == 3
    with pytest.raises(ValueError, match="empty test split"):
        run_eval(trainer, encoder, "transfer_zero_shot", **on_photos, shots_test="0")

    # name_prompt false (FLAIR's MMAC grades): the class names are no prompt, only the descriptions.
    descriptions = {c: [f"a fundus photograph with {c} signs"] for c in classes.values()}
    for name_prompt in (True, False):
        task_file.write_text(json.dumps({
            "name": "photos", "source": "test", "kind": "classification", "dataframe": "photos.csv",
            "classes": list(classes.values()), "descriptions": descriptions, "name_prompt": name_prompt,
            "splits": {}}))
        prompted = suite.load_task(trainer.config, str(task_file), str(tmp_path))
        assert prompted.name_prompt is name_prompt
        got = suite.TaskFeatures(trainer.config, encoder, prompted).prototypes
        templates = trainer.config.prompts.templates
        texts = [([c] if name_prompt else []) + descriptions[c] for c in classes.values()]
        want = np.stack([features.text_embeddings([t.format(x) for t in templates for x in group]).mean(axis=0)
                         for group in texts])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_cli_runs_every_evaluator_and_writes_its_report(trained, tmp_path):
    _, trained_result, workdir = trained
    out = str(tmp_path / "reports")
    # Every setting is a config field, set like any other; the shot shorthands set every entry that has them.
    settings = {"evals.transfer_clip_adapter.epochs": 2, "evals.transfer_tip_adapter_f.epochs": 2,
                "evals.transfer_finetune.epochs": 2, "evals.transfer_finetune.patience": 1,
                "evals.transfer_retrieval.size": 24, "evals.transfer_segmentation.train_size": 16,
                "evals.transfer_segmentation.test_size": 8, "evals.transfer_segmentation.steps": 3,
                "evals.transfer_segmentation.batch_size": 8}
    cmd = [sys.executable, "-m", "retina_jax.evaluate", f"--config={DEMO}", f"--workdir={workdir}",
           *cli_flags(**HELDOUT, **RUN, **settings), "--eval=all", "--shots_train=2,4", "--shots_test=4",
           "--shots_val=2", "--folds=2", "--test_task=synthetic_conditions_external", f"--out={out}"]
    # The subprocess shares this session's compilation cache: its Trainer's jits are the fixture's.
    env = {**subprocess_env(), "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    # 'all': every entry that applies to a FLAIR run (not KeepFIT V2's captions or masked LM).
    assert sorted(summary) == sorted(["zero_shot", "multilabel_linear_probe", "multilabel_finetune",
                                      *common.TRANSFER_PROTOCOLS])
    # The held-out zero-shot evaluation of the checkpoint is the one training ran at its end.
    assert summary["zero_shot"]["aca"] == pytest.approx(trained_result["aca"], abs=1e-9)
    results = {}
    for name, entry in summary.items():
        if name == "zero_shot":
            continue
        folder = os.path.dirname(entry["report"])
        result = results[name] = json.load(open(os.path.join(folder, f"{name}.json")))
        markdown = open(entry["report"]).read()
        assert result["protocol"] == name and markdown.startswith(f"# {name}")
        if result["kind"] == "classification":
            assert [s["shots_train"] for s in result["settings"]] == ["2", "4"]
            assert all(len(s["folds"]) == 2 and s["folds"][0]["num_test"] == 4 * 6 for s in result["settings"])
            # The printed figure of a setting is the mean of its folds'.
            assert entry["shots_2/aca"] == pytest.approx(np.mean([f["aca"] for f in result["settings"][0]["folds"]]))
            # Every classification protocol also scored the external test task, all 96 rows per fold.
            external = [s["external"]["synthetic_conditions_external"] for s in result["settings"]]
            assert all(len(e["folds"]) == 2 and e["folds"][0]["num_test"] == 96 for e in external)
            assert "## External test synthetic_conditions_external" in markdown
            assert "shots_2/external/synthetic_conditions_external/aca" in entry
            for plot in ("confusion", "roc", "few_shot"):
                assert os.path.isfile(os.path.join(folder, f"{name}_{plot}.png"))
                assert f"]({name}_{plot}.png)" in markdown
    for name, plot in (("multilabel_linear_probe", "per_class_auc"), ("multilabel_finetune", "per_class_auc"),
                       ("transfer_retrieval", "recall")):
        assert f"]({name}_{plot}.png)" in open(summary[name]["report"]).read()
        assert os.path.isfile(os.path.join(os.path.dirname(summary[name]["report"]), f"{name}_{plot}.png"))
    probe = results["multilabel_linear_probe"]
    assert probe["task"] == "synthetic_findings" and probe["split"] == {"num_train": 32, "num_test": 32}
    assert summary["multilabel_linear_probe"]["macro_auc"] == probe["metrics"]["multilabel_linear_probe"]["macro_auc"]
    assert summary["transfer_retrieval"]["num_pairs"] == 24
    seg = summary["transfer_segmentation"]
    assert results["transfer_segmentation"]["task"] == "synthetic_lesions" and seg["num_examples"] == 8
    per_class = [v for k, v in seg.items() if k.startswith("dice/")]
    assert "dice/optic_disc" in seg and seg["mean_dice"] == pytest.approx(np.nanmean(per_class), abs=1e-9)


def test_cli_refuses_what_cannot_run(trained):
    _, _, workdir = trained
    base_cmd = [sys.executable, "-m", "retina_jax.evaluate", f"--config={DEMO}", f"--workdir={workdir}",
                *cli_flags(**HELDOUT, **RUN)]
    for args, message in ((["--eval=captions"], "config.evals.captions: needs the caption decoder"),
                          (["--eval=nope"], "config.evals.nope: no such entry"),
                          (["--shots_train=2"], "--shots_train sets a field of the entries named by --eval"),
                          (["--eval=zero_shot", "--folds=2"], "--folds sets config.evals.<name>.folds, which none of")):
        proc = subprocess.run(base_cmd + args, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr[-2000:])
