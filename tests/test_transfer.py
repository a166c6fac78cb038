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

from retina_jax.evals import adapters, finetune, report, retrieval, splits, suite
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


def test_linear_probe_is_flairs_balanced_logistic_regression():
    rng = np.random.default_rng(4)
    y = np.array([0] * 40 + [1] * 8 + [2] * 12)
    x = rng.normal(size=(len(y), 6)) + 0.8 * np.eye(6)[y]
    clf = adapters.fit_linear_probe(x, y)
    params = clf.get_params()
    assert params["C"] == 0.316 and params["class_weight"] == "balanced" and params["max_iter"] == 1000
    reference = LogisticRegression(C=0.316, class_weight="balanced", max_iter=1000).fit(x, y)
    np.testing.assert_allclose(clf.coef_, reference.coef_, rtol=1e-4, atol=1e-6)
    unbalanced = LogisticRegression(C=0.316, max_iter=1000).fit(x, y)
    assert np.abs(clf.coef_ - unbalanced.coef_).max() > 1e-2
    probs = adapters.linear_probe_probs(clf, x[:5], 4)  # a 4th class absent from train: probability 0
    assert probs.shape == (5, 4) and np.all(probs[:, 3] == 0) and np.allclose(probs.sum(axis=1), 1)


def test_every_adapter_separates_separable_features():
    x, y, protos = _separable(5)
    test_x, test_y, _ = _separable(5, noise_seed=6)  # the same classes, fresh examples
    scale = 20.0
    results = {
        "linear_probe": adapters.linear_probe_probs(adapters.fit_linear_probe(x, y), test_x, 3),
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
    f1 = [h["val_f1"] for h in out.history]
    assert out.best_epoch == int(np.argmax(f1)) + 1 and len(f1) == out.best_epoch + 3 < 12
    # Re-running up to the best epoch gives the same weights and test predictions: the best were restored.
    upto = finetune.finetune(_apply_features, variables, x[:64], y[:64], x[64:80], 1 - y[64:80], x[80:],
                             epochs=out.best_epoch, patience=100, **kwargs)
    jax.tree.map(np.testing.assert_array_equal, out.variables, upto.variables)
    np.testing.assert_allclose(out.test_probs, upto.test_probs, rtol=1e-6)
    tuned = out.variables["params"]["tower"]["Dense_0"]["kernel"]
    assert np.abs(tuned - before["params"]["Dense_0"]["kernel"]).max() > 0
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, variables))


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
    s = suite.split_settings("linear_probe", task, shots_test="2")
    assert s == [{"shots_train": "5", "shots_val": "0%", "shots_test": "2", "folds": 3, "balance": False}]
    curve = suite.split_settings("tip_adapter", task, shots_train=["1", "4"])
    assert [c["shots_train"] for c in curve] == ["1", "4"] and curve[0]["folds"] == 5
    with pytest.raises(KeyError, match="unknown protocol 'lp'"):
        suite.split_settings("lp", task)
    with pytest.raises(ValueError, match=r"option 'tip_alpha=x'"):
        suite.Options.parse(["tip_alpha=x"])


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
    assert {p: suite.default_task(config, p) for p in ("tip_adapter", "multilabel", "retrieval", "segmentation")} == {
        "tip_adapter": "synthetic_conditions", "multilabel": "synthetic_findings", "retrieval": "synthetic_reports",
        "segmentation": "synthetic_lesions"}
    grade = suite.load_task(config, "synthetic_dr_grade")
    record = grade.source.record(3)
    assert grade.label(record) == record["dr_grade"] and len(grade.classes) == 5
    # The shipped task file's defaults: KeepFIT's 5-shot adapters, FLAIR's zero-shot on everything.
    conditions = suite.load_task(config, "synthetic_conditions")
    assert suite.split_settings("tip_adapter", conditions)[0]["shots_train"] == "5"
    assert suite.split_settings("zero_shot", conditions)[0]["shots_test"] == "100%"
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        suite.load_task(config, "nope")


# test_train's 32 px TINY run, 4 steps with one checkpoint (the compiled train step is test_train's, so a
# session that ran it reuses the compilation), with held-out sets small enough for a CPU: 96
# single-condition images for the classification protocols, 32 + 32 for the multi-label heads.
HELDOUT = {"eval.zero_shot.size": 96, "eval.linear_probe.train_size": 32, "eval.linear_probe.test_size": 32,
           "eval.linear_probe.steps": 20, "eval.finetune.steps": 2, "eval.finetune.batch_size": 8}
RUN = {"train.epochs": 1.0, "train.checkpoint_every": 100}


def bound(trainer, state):
    """(config, encoder bound to `state`): what the transfer suite takes instead of the trainer."""
    return trainer.config, trainer.encoder.at(state.params, state.batch_stats)


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
    task = suite.load_task(trainer.config, trainer.config.eval.zero_shot.name)
    out = suite.run_protocol(*bound(trainer, state), "zero_shot", task, str(tmp_path))
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
    features = suite.TaskFeatures(*bound(trainer, trainer.state), task)
    probe = suite.run_protocol(*bound(trainer, trainer.state), "linear_probe", task, str(tmp_path / "out"), features=features)
    assert [f["num_train"] for f in probe["settings"][0]["folds"]] == [6, 6]
    assert os.path.isfile(tmp_path / "out" / "photos" / "linear_probe.md")
    zero = suite.run_protocol(*bound(trainer, trainer.state), "zero_shot", task, str(tmp_path / "out"), features=features)
    assert zero["settings"][0]["folds"][0]["num_test"] == 12
    # FLAIR's quirk switch `tip_test_augment`: Tip-Adapter scores the test images' augmented features
    # (on, the default) or their plain ones (off).
    split = splits.Split(seed=0, train=np.arange(6), val=np.zeros((0,), np.int64), test=np.arange(6, 12))
    values = adapters.one_hot(features.labels[:6], len(task.classes))
    run = suite.get_protocol("tip_adapter").run
    for augment, test_features in ((True, features.zimg_augmented), (False, features.zimg)):
        probs, _ = run(features, split, suite.Options(tip_test_augment=augment))
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
    external = suite.TaskFeatures(*bound(trainer, trainer.state), suite.load_task(trainer.config, str(external_file),
                                                                          str(tmp_path)))
    out = suite.run_protocol(*bound(trainer, trainer.state), "linear_probe", task, str(tmp_path / "out"), features=features,
                             externals=[external])
    setting = out["settings"][0]
    assert [f["num_test"] for f in setting["folds"]] == [6, 6]  # the internal test split is unchanged
    flipped = setting["external"]["flipped"]
    for k, fold in enumerate(flipped["folds"]):
        split = splits.fold_splits(features.labels, 2, "2", "2")[k]
        clf = adapters.fit_linear_probe(features.features[split.train], features.labels[split.train])
        want = classification_metrics(external.labels,
                                      adapters.linear_probe_probs(clf, external.features, len(task.classes)))
        assert fold["num_test"] == 3 and fold["num_train"] == 6
        assert all(fold[m] == pytest.approx(want[m]) for m in ("aca", "kappa", "f1", "auc"))
    assert flipped["mean"]["aca"] == pytest.approx(np.mean([f["aca"] for f in flipped["folds"]]))
    markdown = open(tmp_path / "out" / "photos" / "linear_probe.md").read()
    assert "## External test flipped" in markdown
    # Only the external rows: an empty internal test split is then allowed.
    only = suite.run_protocol(*bound(trainer, trainer.state), "zero_shot", task, str(tmp_path / "out"), features=features,
                              shots_test="0", externals=[external])
    assert only["settings"][0]["folds"] == [] and only["settings"][0]["external"]["flipped"]["folds"][0]["num_test"] == 3
    with pytest.raises(ValueError, match="empty test split"):
        suite.run_protocol(*bound(trainer, trainer.state), "zero_shot", task, str(tmp_path / "out"), features=features,
                           shots_test="0")

    # name_prompt false (FLAIR's MMAC grades): the class names are no prompt, only the descriptions.
    descriptions = {c: [f"a fundus photograph with {c} signs"] for c in classes.values()}
    for name_prompt in (True, False):
        task_file.write_text(json.dumps({
            "name": "photos", "source": "test", "kind": "classification", "dataframe": "photos.csv",
            "classes": list(classes.values()), "descriptions": descriptions, "name_prompt": name_prompt,
            "splits": {}}))
        prompted = suite.load_task(trainer.config, str(task_file), str(tmp_path))
        assert prompted.name_prompt is name_prompt
        got = suite.TaskFeatures(*bound(trainer, trainer.state), prompted).prototypes
        templates = trainer.config.eval.zero_shot.templates
        texts = [([c] if name_prompt else []) + descriptions[c] for c in classes.values()]
        want = np.stack([features.text_embeddings([t.format(x) for t in templates for x in group]).mean(axis=0)
                         for group in texts])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_cli_runs_every_protocol_and_writes_its_report(trained, tmp_path):
    _, _, workdir = trained
    out = str(tmp_path / "reports")
    options = ["adapter_epochs=2", "finetune_epochs=2", "finetune_patience=1", "retrieval_size=24",
               "segmentation_train_size=16", "segmentation_test_size=8", "segmentation_steps=3",
               "segmentation_batch_size=8"]
    cmd = [sys.executable, "-m", "retina_jax.evaluate", f"--config={DEMO}", f"--workdir={workdir}",
           *cli_flags(**HELDOUT, **RUN), "--protocol=all", "--shots_train=2,4", "--shots_test=4", "--shots_val=2",
           "--folds=2", "--test_task=synthetic_conditions_external", f"--out={out}", *[f"--option={o}" for o in options]]
    # The subprocess shares this session's compilation cache: its Trainer's jits are the fixture's.
    env = {**subprocess_env(), "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert sorted(summary) == sorted(suite.PROTOCOLS)
    for protocol, entry in summary.items():
        folder = os.path.join(out, entry["task"])
        result = json.load(open(os.path.join(folder, f"{protocol}.json")))
        markdown = open(os.path.join(folder, f"{protocol}.md")).read()
        assert result["protocol"] == protocol and markdown.startswith(f"# {protocol}")
        if result["kind"] == "classification":
            assert [s["shots_train"] for s in result["settings"]] == ["2", "4"]
            assert all(len(s["folds"]) == 2 and s["folds"][0]["num_test"] == 4 * 6 for s in result["settings"])
            assert all(np.isfinite(s["mean"]["aca"]) for s in result["settings"])
            # Every classification protocol also scored the external test task, all 96 rows per fold.
            external = [s["external"]["synthetic_conditions_external"] for s in result["settings"]]
            assert all(len(e["folds"]) == 2 and e["folds"][0]["num_test"] == 96 for e in external)
            assert "## External test synthetic_conditions_external" in markdown
            assert "external/synthetic_conditions_external" in entry["settings"][0]
            for plot in ("confusion", "roc", "few_shot"):
                assert os.path.isfile(os.path.join(folder, f"{protocol}_{plot}.png"))
                assert f"]({protocol}_{plot}.png)" in markdown
    for protocol, plot in (("multilabel", "per_class_auc"), ("retrieval", "recall")):
        folder = os.path.join(out, summary[protocol]["task"])
        assert os.path.isfile(os.path.join(folder, f"{protocol}_{plot}.png"))
        assert f"]({protocol}_{plot}.png)" in open(os.path.join(folder, f"{protocol}.md")).read()
    assert summary["multilabel"]["task"] == "synthetic_findings"
    assert np.isfinite(summary["multilabel"]["metrics"]["linear_probe"]["macro_auc"])
    assert summary["retrieval"]["metrics"]["recall"]["num_pairs"] == 24
    # The summary's fine-tune figure is the mean of its folds' (each fold's own JSON entry).
    finetune = json.load(open(os.path.join(out, summary["finetune"]["task"], "finetune.json")))
    folds = finetune["settings"][0]["folds"]
    assert summary["finetune"]["settings"][0]["aca"] == pytest.approx(np.mean([f["aca"] for f in folds]), abs=1e-9)
    seg = summary["segmentation"]["metrics"]["segmentation"]
    assert summary["segmentation"]["task"] == "synthetic_lesions" and seg["num_examples"] == 8
    per_class = [v for k, v in seg.items() if k.startswith("dice/")]
    assert "dice/optic_disc" in seg and seg["mean_dice"] == pytest.approx(np.nanmean(per_class), abs=1e-9)
