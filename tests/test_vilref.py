"""ViLReF in the trainer (docs/methods.md, "ViLReF"): paper config, report stream with extracted labels,
Chinese tokenisation, the drop-first-characters and logit_scale switches, ViLReF augmentation,
momentum encoders and queues in the jitted step, exact resume after a crash, and the evaluations."""
import os

import jax
import numpy as np
import pytest
from test_train import REPO, assert_trees_equal, crash_and_resume, leaves, train_rows

from retina_jax import checkpointing, config as config_lib, losses, optim
from retina_jax.config import ConfigError, validate
from retina_jax.data import knowledge, pipeline, transforms
from retina_jax.data.synthetic import CorpusSpec, SyntheticFundus
from retina_jax.evals import zeroshot
from retina_jax.models.two_tower import build_model
from retina_jax.train import Trainer

VILREF = os.path.join(REPO, "configs", "vilref.py")
ZH_TEMPLATES = config_lib.load(VILREF).prompts.templates

# 32 px, batch 16, 12 steps, queue of 2 batches (so it wraps), checkpoints every 4.
TINY_RUN = {
    "data.batch_size": 16,
    "data.image_size": 32,
    "data.synthetic.image_size": 32,
    "data.synthetic.size": 64,
    "data.worker_count": 0,
    "data.reports.coverage_size": 64,
    "text.vocab_corpus_size": 60,
    "text.max_len": 48,
    "train.epochs": 3.0,
    "optim.schedule_epochs": 3.0,
    "optim.warmup_steps": 2,
    "train.log_every": 1,
    "train.checkpoint_every": 4,
    "train.progress": False,
    "train.async_checkpoint": False,
    "heldout.batch_size": 32,
    "heldout.conditions.size": 48,
    "heldout.findings.train_size": 64,
    "heldout.findings.test_size": 48,
    "evals.multilabel_finetune.at_end": True,
    "evals.multilabel_finetune.epochs": 1,
    "evals.multilabel_finetune.batch_size": 16,
}

# Stage `vilref` from scratch (the demo starts from stage `clip`'s workdir), with the paper's
# momentum keys and a queue of 2 batches.
TINY = {**TINY_RUN, "model_init": "", "text.tokenizer": "learn", "momentum.decay": 0.95, "momentum.queue_size": 32,
        "momentum.queue_max_fraction": 0.5}  # 32 of the 64 training examples


def tiny_vilref(**extra):
    return config_lib.override(config_lib.load(VILREF + ":demo"), {**TINY, **extra})


@pytest.fixture(scope="module")
def vilref_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("vilref"))
    trainer = Trainer(tiny_vilref(), workdir)  # logit_scale_reset on, as configs/vilref.py
    params_before_eval = None

    evaluate = trainer.evaluate

    def evaluate_and_keep(state, step, evaluators=None):
        nonlocal params_before_eval
        params_before_eval = leaves(state.params)
        return evaluate(state, step, evaluators)

    trainer.evaluate = evaluate_and_keep
    result = trainer.train()
    return trainer, result, workdir, params_before_eval


# ------------------------------------------------------------------------------------------ config

def test_paper_config_has_vilref_settings():
    c = config_lib.load(VILREF)
    assert (c.data.batch_size, c.data.image_size, c.text.max_len) == (256, 224, 100)
    assert (c.momentum.queue_size, c.momentum.decay, c.momentum.key_features) == (65_536, 0.995, "momentum")
    assert (c.optim.lr, c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay) == (3e-5, 0.9, 0.98, 1e-6, 0.001)
    assert (c.optim.warmup_steps, c.optim.schedule_epochs, c.train.epochs) == (100, 20.0, 20.0)
    assert (c.model.img.name, c.model.img.vit.patch_size, c.model.img.vit.width, c.model.img.vit.layers) == \
        ("vit", 16, 768, 12)
    assert (c.model.txt.pooling, c.model.txt.add_pooler, c.model.img_projection, c.model.txt_projection) == \
        ("cls", False, "linear", "linear")
    assert (c.data.preprocess, c.data.augment.kind, tuple(c.data.augment.crop_scale)) == ("clip", "vilref", (0.9, 1.0))
    assert (c.model.logit_scale_clamp, c.model.logit_scale_reset, c.data.reports.drop_chars) == \
        ("after_step", True, 0)
    assert (c.data.stream, c.data.reports.language, c.loss.name) == ("reports", "zh", "wscl")
    validate(c, 8)
    # The full-size model (Chinese RoBERTa's vocabulary): ViT-B/16 768 -> 512 and RoBERTa 768 -> 512.
    model = build_model(c.model, 21_128, c.data.image_size)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *[np.zeros(s, t) for s, t in (
        ((1, 224, 224, 3), np.float32), ((1, 100), np.int32), ((1, 100), np.int32))]))["params"]
    assert shapes["img_proj"]["dense"]["kernel"].shape == (768, 512)
    assert shapes["txt_proj"]["dense"]["kernel"].shape == (768, 512)
    assert shapes["img"]["positional_embedding"].shape == (197, 768)
    assert shapes["txt"]["embeddings"]["word_embeddings"]["embedding"].shape == (21_128, 768)
    assert "pooler" not in shapes["txt"]

    rn50 = config_lib.load(VILREF + ":rn50")
    assert (rn50.model.img.name, rn50.model.embed_dim, rn50.model.img_projection) == ("clip_resnet", 1024, "none")
    validate(rn50, 8)


def test_weight_decay_excludes_biases_norms_1d_params_and_logit_scale():
    c = config_lib.load(VILREF + ":demo")
    model = build_model(c.model, 100, 32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32),
                                               np.zeros((1, 8), np.int32), np.ones((1, 8), np.int32)))["params"]
    mask = optim.weight_decay_mask(params, c.optim.wd_exclude)
    decayed = {}
    jax.tree_util.tree_map_with_path(lambda p, m, a: decayed.setdefault(optim.param_path(p), (m, a.ndim)), mask, params)
    for path, (m, ndim) in decayed.items():
        # Chinese-CLIP: p.ndim < 2 or "bn"/"ln"/"bias"/"logit_scale" in the name -> no decay.
        expect_excluded = ndim < 2 or "bias" in path or "logit_scale" in path or "/bn" in path or "/ln" in path
        assert m == (not expect_excluded), path
    assert decayed["img/conv1/kernel"][0] and not decayed["logit_scale"][0]


def test_validate_names_vilref_fields():
    c = tiny_vilref(**{"momentum.queue_size": 40})
    with pytest.raises(ConfigError, match=r"momentum.queue_size: queue size 40 must be a positive multiple"):
        validate(c, 8)
    c = tiny_vilref(**{"loss.name": "flair"})
    with pytest.raises(ConfigError, match=r"loss.name: 'flair' needs the category ids"):
        validate(c, 8)
    c = tiny_vilref(**{"momentum.enabled": False})
    with pytest.raises(ConfigError, match=r"momentum.key_features: 'momentum' keys need momentum.enabled"):
        validate(c, 8)
    c = tiny_vilref(**{"data.reports.language": "fr", "loss.wscl.coupling": "product"})
    with pytest.raises(ConfigError) as e:
        validate(c, 8)
    assert "data.reports.language" in str(e.value) and "loss.wscl.coupling" in str(e.value)


# -------------------------------------------------------------------------------------------- data

def test_report_stream_labels_are_the_extracted_ones_and_equal_the_ground_truth():
    config = tiny_vilref()
    source = pipeline.synthetic_source(config)
    transform = pipeline.ReportTransform(32, "clip", None, "zh", 0, pipeline.label_extractor(config))
    given = pipeline.ReportTransform(32, "clip", None, "zh", 0, None)  # data.reports.labels='given'
    for i in range(40):
        example = source[i]
        out = transform(example, np.random.default_rng(i))
        np.testing.assert_array_equal(out["labels"], example["labels"].astype(np.float32))
        np.testing.assert_array_equal(given(example, np.random.default_rng(i))["labels"], out["labels"])
        assert out["prompt"] == example["report_zh"]
        assert out["image"].shape == (32, 32, 3)
    assert pipeline.num_labels(config) == len(knowledge.FINDINGS)


def test_report_labels_are_extracted_once_per_report_and_the_cache_is_bounded(monkeypatch):
    config = tiny_vilref()
    source = pipeline.synthetic_source(config)
    extractor = pipeline.label_extractor(config)
    transform = pipeline.ReportTransform(32, "clip", None, "zh", 0, extractor)
    asked = []
    monkeypatch.setattr(extractor, "extract", lambda text, eye=None: asked.append((text, eye))
                        or type(extractor).extract(extractor, text, eye=eye))
    examples = [source[i] for i in range(6)]
    for epoch in range(2):
        for i, example in enumerate(examples):
            out = transform(example, np.random.default_rng(i))
            np.testing.assert_array_equal(out["labels"], example["labels"].astype(np.float32))
    assert asked == [(e["report_zh"], e["eye"]) for e in examples]  # the second epoch asked nothing
    out["labels"][:] = 9  # a caller's change does not reach the cache
    np.testing.assert_array_equal(transform(examples[-1], np.random.default_rng(0))["labels"], examples[-1]["labels"])
    monkeypatch.setattr(pipeline.ReportTransform, "CACHE_SIZE", 6)
    transform(source[6], np.random.default_rng(0))
    assert list(transform._labels) == [(source[6]["report_zh"], source[6]["eye"])]


@pytest.mark.parametrize("per_eye", [True, False])
def test_per_eye_switch_labels_an_image_from_its_own_section(per_eye):
    config = tiny_vilref(**{"data.reports.per_eye": per_eye})
    transform = pipeline.train_transform(config)
    assert transform.per_eye is per_eye and config.data.reports.per_eye is per_eye
    report = "右眼：视网膜散在微血管瘤。左眼：黄斑区玻璃膜疣。"
    example = {"index": 0, "image": np.zeros((32, 32, 3), np.uint8), "report_zh": report, "eye": "left"}
    labels = transform(example, np.random.default_rng(0))["labels"]
    want = ["drusen"] if per_eye else ["microaneurysm", "drusen"]
    assert [knowledge.FINDINGS[i] for i in np.flatnonzero(labels)] == want
    unknown = transform({**example, "eye": ""}, np.random.default_rng(0))["labels"]   # no eye given: the whole report
    assert [knowledge.FINDINGS[i] for i in np.flatnonzero(unknown)] == ["microaneurysm", "drusen"]
    assert tiny_vilref().data.reports.per_eye is True   # the default


def test_drop_first_characters_switch():
    example = {"index": 7, "report_zh": "右眼：后极部可见微血管瘤。", "report_en": "Right eye: drusen."}
    assert pipeline.report_text(example, "zh", 0) == "右眼：后极部可见微血管瘤。"  # default: off
    assert pipeline.report_text(example, "zh", 3) == "后极部可见微血管瘤。"  # ViLReF's original
    with pytest.raises(ValueError, match="example 7: empty zh report after dropping its first 3 characters"):
        pipeline.report_text({"index": 7, "report_zh": "右眼："}, "zh", 3)
    with pytest.raises(ValueError, match="example 3: empty en report"):
        pipeline.report_text({"index": 3, "report_en": "  "}, "en", 0)


def test_chinese_reports_tokenise_one_character_per_token(vilref_run):
    trainer, *_ = vilref_run
    tok = trainer.tokenize.tokenizer
    text = "后极部可见微血管瘤，四个象限可见视网膜出血"
    tokens = tok.encode(text).tokens
    content = [t for t in tokens if t not in ("[CLS]", "[SEP]", "[PAD]")]
    assert content == [c for c in text]
    assert "[UNK]" not in tok.encode(SyntheticFundus(CorpusSpec(seed=5, size=3)).record(2)["report_zh"]).tokens
    assert trainer.tokenize.max_len == 48


def test_vilref_augmentation_crops_scale_and_ratio_and_is_reproducible():
    cfg = config_lib.load(VILREF + ":demo").data.augment
    for seed in range(50):
        top, left, h, w = transforms.random_resized_crop_box(300, 400, np.random.default_rng(seed), (0.9, 1.0))
        assert 0.9 * 120_000 - 800 <= h * w <= 120_000 and 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
        assert 0 <= top <= 300 - h and 0 <= left <= 400 - w
    image = SyntheticFundus(CorpusSpec(size=1, image_size=64))[0]["image"]
    a = pipeline._augmented_image(image, np.random.default_rng(3), 48, "clip", cfg)
    b = pipeline._augmented_image(image, np.random.default_rng(3), 48, "clip", cfg)
    c = pipeline._augmented_image(image, np.random.default_rng(4), 48, "clip", cfg)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (48, 48, 3) and np.abs(a - c).max() > 0.05


def test_zero_shot_prompt_ensembles_in_chinese_and_english():
    zh = zeroshot.class_prompts(["normal", "glaucoma"], ("诊断：{}。", "{}"), language="zh")
    assert zh[1][:2] == ["诊断：青光眼。", "诊断：视杯扩大。"] and "青光眼" in zh[1]
    assert len(zh[1]) == 2 * len(knowledge.CATEGORY_DESCRIPTIONS_ZH["glaucoma"])
    en = zeroshot.class_prompts(["glaucoma"], ("Diagnosis: {}.",), language="en")
    assert en[0][0] == "Diagnosis: glaucoma." and len(en[0]) == 1 + len(knowledge.CATEGORY_DESCRIPTIONS["glaucoma"])
    with pytest.raises(ValueError, match="language 'fr'"):
        zeroshot.class_prompts(["glaucoma"], "{}", language="fr")


# ------------------------------------------------------------------------------------------- train

def test_vilref_run_fills_and_wraps_the_queue_and_reports_every_evaluation(vilref_run):
    trainer, result, workdir, params_before_eval = vilref_run
    rows = train_rows(workdir)
    assert [r["step"] for r in rows] == list(range(1, 13))
    # Queue of 32 = 2 global batches: half full after step 1, full from step 2 on.
    assert [r["train/queue_fill"] for r in rows[:3]] == [0.5, 1.0, 1.0]
    assert all(np.isfinite(r["train/loss"]) for r in rows)
    # At step 1 the momentum model IS the online one: the same images give the same embeddings
    # (no dropout in the image tower); the text tower's own dropout draw makes its texts differ.
    np.testing.assert_allclose(rows[0]["train/momentum_cos_img"], 1.0, rtol=1e-5)
    assert 0.5 < rows[0]["train/momentum_cos_txt"] < 1.0 - 1e-4
    assert all(-1.0 <= r["train/momentum_cos_img"] <= 1.0 + 1e-5 for r in rows)
    state = trainer.state
    q = jax.device_get(state.queues)
    assert int(q.ptr) == (12 * 16) % 32 and q.valid.all()
    # The queue holds unit-norm momentum features and 0/1 labels of the last two batches.
    np.testing.assert_allclose(np.linalg.norm(q.img, axis=1), 1.0, rtol=1e-5)
    assert set(np.unique(q.labels)) <= {0.0, 1.0} and q.labels.sum(axis=1).min() >= 1
    # The EMA params have the params' tree and moved away from them (and from their init).
    assert jax.tree.structure(state.ema_params) == jax.tree.structure(state.params)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(leaves(state.ema_params), leaves(state.params)))
    assert diff > 1e-6
    # logit_scale is clamped after each step (it stays in [0, ln 100]).
    assert 0.0 <= float(state.params["logit_scale"]) <= losses.LOGIT_SCALE_MAX
    # Every evaluation ran: Chinese zero-shot, multi-label linear probe and fine-tuning ...
    for key in ("aca", "auc", "linear_probe/macro_auc", "linear_probe/map", "finetune/macro_auc", "finetune/map"):
        assert np.isfinite(result[key]), key
    assert result["num_classes"] == 6 and result["linear_probe/num_examples"] == 48
    for name in ("synthetic_conditions", "multilabel_linear_probe", "multilabel_finetune"):
        assert os.path.isfile(os.path.join(workdir, f"eval_{name}.json"))
    # ... on a copy: the pretraining params are bit-identical after fine-tuning and still usable.
    for a, b in zip(params_before_eval, leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    # The extractor's coverage of the training reports was measured and logged.
    assert trainer.method.label_coverage["reports"] == 64 and trainer.method.label_coverage["unlabelled"] == 0


def test_logit_scale_reset_at_run_starts_but_not_at_the_own_workdir_resume(vilref_run, tmp_path):
    """The reset applies when a run starts from `config.resume` or `model_init` (ViLReF restarts its
    temperature whenever it loads a checkpoint), and never when a run resumes its own workdir."""
    reference, _, workdir, _ = vilref_run
    stored = float(reference.state.params["logit_scale"])
    stored_ema = float(reference.state.ema_params["logit_scale"])
    init = config_lib.load(VILREF).model.logit_scale_init
    assert abs(stored - init) > 1e-4 and abs(stored_ema - init) > 1e-6  # training moved both
    for reset in (True, False):
        for start, extra in (("own", {}), ("resume", {"resume": checkpointing.checkpoint_dir(workdir)}),
                             ("model_init", {"model_init": workdir})):
            run_dir = workdir if start == "own" else str(tmp_path / f"{start}_{reset}")
            trainer = Trainer(tiny_vilref(**{"model.logit_scale_reset": reset, **extra}), run_dir)
            mngr = checkpointing.manager(checkpointing.checkpoint_dir(run_dir), read_only=True)
            state = trainer.restore_or_init(mngr, None)
            mngr.close()
            assert int(state.step) == (0 if start == "model_init" else 12), start
            want = init if reset and start != "own" else stored
            np.testing.assert_allclose(float(state.params["logit_scale"]), want, rtol=1e-6, err_msg=start)
            # model_init starts the momentum model as a copy of the online one.
            want_ema = init if reset and start != "own" else (stored if start == "model_init" else stored_ema)
            np.testing.assert_allclose(float(state.ema_params["logit_scale"]), want_ema, rtol=1e-6, err_msg=start)


@pytest.mark.parametrize("clamp", ["after_step", "before_forward"])
def test_logit_scale_clamp_switch(vilref_run, clamp, tmp_path):
    """ViLReF clamps the stored value after every optimizer step; FLAIR clamps it before the forward,
    so after a step from above ln 100 only the ViLReF setting stores exactly ln 100."""
    trainer = Trainer(tiny_vilref(**{"model.logit_scale_clamp": clamp, "optim.warmup_steps": 0}), str(tmp_path))
    state = trainer.init_state()
    state = state.replace(params={**state.params, "logit_scale": jax.device_put(np.float32(5.0), trainer.replicated)})
    batch = pipeline.make_global(next(iter(pipeline.train_dataset(trainer.config, trainer.tokenize))),
                                 trainer.batch_sharding)
    new, metrics = trainer.train_step(state, batch)
    stored = float(new.params["logit_scale"])
    if clamp == "after_step":
        assert stored == np.float32(losses.LOGIT_SCALE_MAX)
    else:
        assert stored != np.float32(losses.LOGIT_SCALE_MAX) and abs(stored - losses.LOGIT_SCALE_MAX) < 0.01
    assert float(metrics["train/logit_scale"]) == pytest.approx(100.0 if clamp == "before_forward" else np.exp(5.0),
                                                                rel=1e-5)


def test_wscl_with_online_keys_and_no_momentum_model_or_queue_trains(tmp_path):
    """The ablation's middle setting: WSCL with online keys, no EMA tree and no queue in the state
    (benchmarks/vilref_ablation.py also runs CLIP on the same reports)."""
    config = tiny_vilref(**{"momentum.enabled": False, "momentum.key_features": "online", "momentum.queue_size": 0,
                            "train.epochs": 0.5, "optim.schedule_epochs": 0.5, "train.eval_at_end": False})
    trainer = Trainer(config, str(tmp_path / "wscl_online"))
    trainer.train()
    assert trainer.state.ema_params == {} and trainer.state.queues == {}
    rows = train_rows(trainer.workdir)
    assert len(rows) == 2 and all(np.isfinite(r["train/loss"]) for r in rows)
    assert "train/queue_fill" not in rows[0]


def test_one_train_step_with_a_filled_queue_matches_a_numpy_reference(vilref_run):
    """The whole jitted step's wiring with a full queue (docs/methods.md, "ViLReF"): EMA first, keys = the
    momentum features of this batch followed by the queue as it was BEFORE the step; loss = NumPy
    WSCL; gradient only through the online queries (the momentum keys and queue are constants);
    afterwards this batch's momentum features and labels sit at the old pointer."""
    from test_losses import _np_label_cosine, np_wscl

    trainer = vilref_run[0]
    before = jax.device_get(trainer.state)  # step 12: queue full, pointer at 0
    state = jax.device_put(before, trainer.state_sharding)  # a copy: the step donates its input
    batch = pipeline.make_global(next(iter(pipeline.train_dataset(trainer.config, trainer.tokenize))),
                                 trainer.batch_sharding)
    q = before.queues
    assert q.valid.all() and int(q.ptr) == 0
    m = trainer.config.momentum.decay

    rng = jax.random.fold_in(jax.random.wrap_key_data(before.rng), before.step)
    ema = jax.tree.map(lambda e, p: m * e + (1 - m) * p, before.ema_params, before.params)
    forward = lambda params, key: trainer.model.apply(
        {"params": params, "batch_stats": before.batch_stats}, batch["image"], batch["input_ids"],
        batch["attention_mask"], train=True, rngs={"dropout": key}, mutable=["batch_stats"])[0]
    jit_forward = jax.jit(forward)
    mom = jax.device_get(jit_forward(ema, jax.random.fold_in(rng, 1)))
    out = jax.device_get(jit_forward(before.params, rng))
    pullback = jax.jit(lambda params, cotangent: jax.vjp(lambda p: forward(p, rng), params)[1](cotangent)[0])
    zimg, ztxt = np.asarray(out["zimg"], np.float64), np.asarray(out["ztxt"], np.float64)
    labels = np.asarray(batch["labels"], np.float64)
    keys_img = np.concatenate([mom["zimg"], q.img]).astype(np.float64)
    keys_txt = np.concatenate([mom["ztxt"], q.txt]).astype(np.float64)
    label_sim = _np_label_cosine(labels, np.concatenate([labels, q.labels]))
    valid = np.ones(len(keys_img), bool)
    s = float(np.exp(np.clip(before.params["logit_scale"], 0, losses.LOGIT_SCALE_MAX)))
    want = np_wscl(zimg @ keys_txt.T, ztxt @ keys_img.T, label_sim, valid, s)

    # The analytic feature gradient of the coupled cross-entropy (keys constant), pulled back
    # through the online forward: its norm is the step's gradient norm.
    def feature_grad(queries, keys):
        b, k = queries.shape[0], keys.shape[0]
        pos = np.eye(b, k, dtype=bool)
        w = np.where(pos, 1.0, 1.0 - label_sim)
        z = np.where((label_sim >= 1 - 1e-6) & ~pos, -np.inf, s * w * (queries @ keys.T))
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        return 0.5 / b * ((p - pos) * s * w) @ keys

    cotangent = {key: np.zeros_like(v) for key, v in out.items()}
    cotangent["zimg"] = feature_grad(zimg, keys_txt).astype(np.float32)
    cotangent["ztxt"] = feature_grad(ztxt, keys_img).astype(np.float32)
    grads = jax.device_get(pullback(before.params, cotangent))

    new, metrics = trainer.train_step(state, batch)
    new = jax.device_get(new)
    np.testing.assert_allclose(float(metrics["train/loss"]), want, rtol=2e-5)
    want_norm = np.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(float(metrics["train/grad_norm"]), want_norm, rtol=1e-3)
    for got, ref in zip(leaves(new.ema_params), jax.tree.leaves(ema)):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    # The write: this batch's momentum features and labels at [0, 16), the rest untouched, ptr 16.
    np.testing.assert_allclose(new.queues.img[:16], mom["zimg"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.queues.txt[:16], mom["ztxt"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(new.queues.labels[:16], labels)
    np.testing.assert_array_equal(new.queues.img[16:], q.img[16:])
    assert int(new.queues.ptr) == 16 and new.queues.valid.all()


# ------------------------------------------------------------------ momentum queue switches

def test_queue_may_hold_at_most_its_fraction_of_the_training_set(tmp_path):
    """`momentum.queue_max_fraction`: TINY's 32-entry queue is half of its 64 training examples."""
    with pytest.raises(ConfigError, match=r"config\.momentum\.queue_size: 32 is over momentum\.queue_max_fraction="
                                          r"0\.25 of the 64 training examples \(at most 16\)"):
        Trainer(tiny_vilref(**{"momentum.queue_max_fraction": 0.25}), str(tmp_path / "over"))
    assert Trainer(tiny_vilref(**{"momentum.queue_max_fraction": 0.5}), str(tmp_path / "under")).total_steps == 12


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_momentum_schedule_sets_the_decay_of_each_step(vilref_run, schedule, tmp_path):
    """At step 6 of 12 the EMA update is m * ema + (1 - m) * params with m the configured 0.95
    (constant) or BYOL's 1 - 0.05 * (cos(pi * 6 / 12) + 1) / 2 = 0.975 (cosine)."""
    trainer = vilref_run[0] if schedule == "constant" else \
        Trainer(tiny_vilref(**{"momentum.schedule": "cosine"}), str(tmp_path / "cosine"))
    assert trainer.config.momentum.decay == 0.95 and trainer.total_steps == 12
    m = {"constant": 0.95, "cosine": 0.975}[schedule]
    state = jax.device_get(trainer.init_state())
    ema = jax.tree.map(lambda p: p + 1.0, state.params)  # a momentum model away from the online one
    state = jax.device_put(state.replace(step=np.int32(6), ema_params=ema), trainer.state_sharding)
    batch = pipeline.make_global(next(iter(pipeline.train_dataset(trainer.config, trainer.tokenize))),
                                 trainer.batch_sharding)
    params = leaves(state.params)
    new, _ = trainer.train_step(state, batch)
    for got, e, p in zip(leaves(new.ema_params), jax.tree.leaves(ema), params):
        np.testing.assert_allclose(got, m * e + (1.0 - m) * p, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def late_queue_run(tmp_path_factory):
    """TINY with the queue starting at step 5 of 12 (0-based), the cosine momentum schedule and
    the logit_scale reset on: the uninterrupted reference of the queue-start tests."""
    config = tiny_vilref(**{"momentum.queue_start_step": 5, "momentum.schedule": "cosine", "train.eval_at_end": False})
    trainer = Trainer(config, str(tmp_path_factory.mktemp("late_queue")))
    trainer.train()
    return trainer


def test_queue_start_step_leaves_the_queue_unwritten_then_resyncs_and_refills(late_queue_run, vilref_run):
    rows = train_rows(late_queue_run.workdir)
    # Rows are logged after steps 1..12: steps 0-4 never write the queue; step 5 writes half of it.
    assert [r["train/queue_fill"] for r in rows] == [0.0] * 5 + [0.5] + [1.0] * 6
    assert [r["train/wscl_queue_mass"] for r in rows[:6]] == [0.0] * 6  # nothing read before it fills
    assert rows[6]["train/wscl_queue_mass"] > 0.0
    # At the start the momentum model is re-synced: the same images embed identically (the image tower
    # has no dropout), while one step earlier the EMA lagged the online model.
    np.testing.assert_allclose(rows[5]["train/momentum_cos_img"], 1.0, rtol=1e-5)
    assert rows[4]["train/momentum_cos_img"] < 1.0 - 1e-4
    # With the start at 0 (the fixture) the queue fills from the first step.
    assert [r["train/queue_fill"] for r in train_rows(vilref_run[2])[:2]] == [0.5, 1.0]


def test_the_queue_is_not_read_before_its_start_step(late_queue_run):
    """A full queue of random unit features (as if it had been filled) changes nothing before the
    start step, nothing at it (the queue restarts empty there) and the loss after it."""
    trainer = late_queue_run
    base = jax.device_get(trainer.state)
    rng = np.random.default_rng(0)
    feats = rng.normal(size=base.queues.img.shape).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    full = base.queues.replace(img=feats, txt=feats[::-1].copy(), valid=np.ones_like(base.queues.valid))
    empty = base.queues.replace(valid=np.zeros_like(base.queues.valid))
    batch = pipeline.make_global(next(iter(pipeline.train_dataset(trainer.config, trainer.tokenize))),
                                 trainer.batch_sharding)
    loss_fn = jax.jit(trainer.loss_and_grads)
    loss = lambda step, queues: float(loss_fn(base.replace(step=np.int32(step), queues=queues), batch)[0])  # noqa: E731
    assert loss(3, full) == loss(3, empty)
    # From the start on the queue takes part (at the start itself it restarts empty first).
    assert loss(5, full) == loss(5, empty)
    assert abs(loss(6, full) - loss(6, empty)) > 1e-3


def test_crashed_run_resumes_bit_identically_across_the_queue_start(late_queue_run, tmp_path):
    """Crash at step 6, resume from the checkpoint of step 4 (before the queue's start at 5), with
    `model.logit_scale_reset` on as configs/vilref.py: the reset belongs to a run's start, so the
    resumed run ends with the uninterrupted run's exact EMA, queues, pointer and data position."""
    config = tiny_vilref(**{"momentum.queue_start_step": 5, "momentum.schedule": "cosine", "train.eval_at_end": False})
    assert config.model.logit_scale_reset
    resumed = crash_and_resume(config, str(tmp_path / "crashed"), crash_at=6, last_checkpoint=4)
    for field in ("params", "ema_params", "queues", "opt_state", "batch_stats"):
        assert_trees_equal(getattr(resumed.state, field), getattr(late_queue_run.state, field))
    assert int(resumed.state.queues.ptr) == int(late_queue_run.state.queues.ptr) == (7 * 16) % 32
    assert resumed.data_iter.get_state() == late_queue_run.data_iter.get_state()


# ------------------------------------------------------------------------------- two stages

def test_stage_configs_clip_stand_in_then_vilref_from_it():
    clip = config_lib.load(VILREF + ":stage=clip,demo,seed=3")
    assert (clip.loss.name, clip.momentum.enabled, clip.momentum.queue_size, clip.model_init, clip.seed) == \
        ("clip", False, 0, "", 3)
    demo = config_lib.load(VILREF + ":demo")
    assert (demo.model_init, demo.text.tokenizer) == ("workdirs/vilref_clip_demo", "workdirs/vilref_clip_demo/tokenizer")
    assert (demo.loss.name, demo.momentum.enabled, demo.momentum.key_features, demo.momentum.queue_size) == \
        ("wscl", True, "momentum", 512)
    assert demo.optim.lr < clip.optim.lr and demo.model.img == clip.model.img and demo.model.txt == clip.model.txt
    paper = config_lib.load(VILREF + ":clip_workdir=/ckpt/chinese_clip")
    assert (paper.model_init, paper.text.tokenizer) == ("/ckpt/chinese_clip", "/ckpt/chinese_clip/tokenizer")
    assert config_lib.load(VILREF).model_init == ""  # the paper config without a start: given on the command line
    missing = config_lib.load(VILREF + ":demo,clip_workdir=/nonexistent/clip")
    with pytest.raises(ConfigError, match=r"model_init: '/nonexistent/clip' is not a checkpoint directory: train the "
                                          r"stage it starts from first \(e\.g\. configs/vilref\.py:stage=clip"):
        validate(missing, 8)
    with pytest.raises(ValueError, match="stage='vl'; allowed: clip, vilref"):
        config_lib.load(VILREF + ":stage=vl")


def test_stage_vilref_starts_from_stage_clip(learning_runs, tmp_path):
    """Stage `vilref` loads stage `clip`'s towers and projections and its vocabulary; the momentum
    model starts as their copy, the queue empty, and the temperature at its initial value."""
    clip = learning_runs["clip"]
    clip_dir = clip.workdir
    trainer = Trainer(config_lib.override(config_lib.load(VILREF + f":demo,clip_workdir={clip_dir}"),
                                          {**LEARN, "momentum.queue_size": 64}), str(tmp_path / "vilref"))
    assert trainer.tokenize.path == os.path.join(clip_dir, "tokenizer")
    mngr = checkpointing.manager(checkpointing.checkpoint_dir(trainer.workdir), read_only=True)
    state = jax.device_get(trainer.restore_or_init(mngr, None))
    mngr.close()
    trained = jax.device_get(clip.state.params)
    assert int(state.step) == 0
    for path in ("img", "txt", "img_proj", "txt_proj"):
        assert_trees_equal(state.params[path], trained[path])
    assert_trees_equal(state.ema_params, state.params)
    assert abs(float(trained["logit_scale"]) - trainer.config.model.logit_scale_init) > 1e-4
    np.testing.assert_allclose(float(state.params["logit_scale"]), trainer.config.model.logit_scale_init, rtol=1e-6)
    assert not state.queues.valid.any()


# ---------------------------------------------------------------------------------- learning

# The learning test's tiny setting: 32 px, batch 32, a 256-image corpus and the full 100-token
# context. Small enough for CI, large enough that stage `clip` leaves contrastive learning's early
# collapse (its loss sits at ln 32 ~ 3.47 until about step 60, then falls to ~2 by step 240; the
# 64-image TINY_RUN never leaves it).
LEARN = {**TINY_RUN, "data.batch_size": 32, "data.synthetic.size": 256, "data.reports.coverage_size": 256,
         "text.vocab_corpus_size": 200, "text.max_len": 100, "train.log_every": 8, "train.checkpoint_every": 1000,
         "train.eval_at_end": False}
LEARN_QUEUE = {"momentum.queue_size": 64}  # 2 batches: the 0.25 of 256 queue_max_fraction allows


def _epochs(steps, warmup):
    epochs = steps * LEARN["data.batch_size"] / LEARN["data.synthetic.size"]
    return {"train.epochs": epochs, "optim.schedule_epochs": epochs, "optim.warmup_steps": warmup}


@pytest.fixture(scope="module")
def learning_runs(tmp_path_factory):
    """Stage `clip` (240 steps), then stage `vilref` from it with the demo's momentum encoders and
    queue (m 0.995, lr 3e-4; 64 steps), and the collapsed setting of the first ablations: the same
    queue from random init at lr 1e-3 with m 0.95 (64 steps)."""
    root = tmp_path_factory.mktemp("learning")
    runs = {}
    for name, spec, extra in (
            ("clip", ":stage=clip,demo", _epochs(240, 4)),
            ("staged", f":demo,clip_workdir={root / 'clip'}", {**LEARN_QUEUE, **_epochs(64, 2)}),
            ("scratch", ":demo", {**LEARN_QUEUE, **_epochs(64, 4), "model_init": "", "text.tokenizer": "learn",
                                  "optim.lr": 1e-3, "momentum.decay": 0.95})):
        runs[name] = Trainer(config_lib.override(config_lib.load(VILREF + spec), {**LEARN, **extra}), str(root / name))
        runs[name].train()
    return runs


def collapsed_floor(labels, scale):
    """The lowest WSCL loss a model reaches whose in-batch embeddings are one vector (docs/methods.md,
    ViLReF). Then every in-batch cosine is the same c, row i's logits are s * W_ij * c over its kept
    columns (W_ii = 1, W_ij = 1 - label cosine <= 1, false negatives dropped), and its loss is at
    least log sum_j exp(s * c * (W_ij - 1)), smallest at c = 1; queue columns only add to the sum.
    So a loss below this floor needs the in-batch examples told apart, whatever the queue does."""
    from test_losses import _np_label_cosine

    sim = _np_label_cosine(labels, labels)
    pos = np.eye(len(labels), dtype=bool)
    z = np.where(pos | (sim < 1 - 1e-6), scale * (np.where(pos, 1.0, 1.0 - sim) - 1.0), -np.inf)
    top = z.max(axis=1, keepdims=True)
    return float(np.mean(top[:, 0] + np.log(np.sum(np.exp(z - top), axis=1))))


def separation(trainer):
    """The step's loss, the collapsed floor of the same batch and temperature, and the batch-mean
    embedding norms, from one more step on the first training batch (on a copy of the state)."""
    host = jax.device_get(trainer.state)
    state = jax.device_put(host, trainer.state_sharding)  # a copy: the step donates its input
    scale = float(np.exp(np.clip(host.params["logit_scale"], 0, losses.LOGIT_SCALE_MAX)))
    batch = next(iter(pipeline.train_dataset(trainer.config, trainer.tokenize)))
    _, metrics = trainer.train_step(state, pipeline.make_global(batch, trainer.batch_sharding))
    floor = collapsed_floor(np.asarray(batch["labels"], np.float64), scale)
    return float(metrics["train/loss"]), floor, float(metrics["train/mean_norm_img"]), \
        float(metrics["train/mean_norm_txt"])


# Separated: the loss at least 0.25 below the collapsed floor and both batch-mean norms under 0.9.
# The norm of the mean of B unit vectors is sqrt(1/B + (1 - 1/B) * mean pairwise cosine): 1 when
# every example is the same vector (the collapsed ablation runs sat at 0.99-1.00), and under 0.9 at
# batch 32 only when the mean cosine between two different examples is below 0.80.
NORM_BOUND, LOSS_MARGIN = 0.9, 0.25


def separated(loss, floor, norm_img, norm_txt):
    return loss < floor - LOSS_MARGIN and norm_img < NORM_BOUND and norm_txt < NORM_BOUND


def test_vilref_with_the_queue_separates_the_examples_from_stage_clip_but_not_from_random_init(learning_runs):
    staged = learning_runs["staged"]
    assert staged.config.momentum.enabled and staged.config.momentum.key_features == "momentum"
    assert jax.device_get(staged.state.queues.valid).all()  # full: written at every step
    loss, floor, norm_img, norm_txt = separation(staged)
    assert separated(loss, floor, norm_img, norm_txt), (loss, floor, norm_img, norm_txt)
    # The first ablations' collapsed setting (the queue from random init) fails the same check: its
    # image embeddings are still one vector.
    collapsed = separation(learning_runs["scratch"])
    assert not separated(*collapsed), collapsed
    assert collapsed[2] > NORM_BOUND, collapsed


def test_predictor_prompts_a_vilref_run_in_its_own_language_and_templates(vilref_run):
    # Review defect: the predictor prompted every checkpoint in English with one template.
    from retina_jax.predict import Predictor
    _, _, workdir, _ = vilref_run
    predictor = Predictor.load(workdir)
    classes = ["normal", "glaucoma", "cataract"]
    own = predictor.prototypes(classes)
    chinese = predictor.prototypes(classes, ZH_TEMPLATES, language="zh")
    english = predictor.prototypes(classes, ("A fundus photograph of {}",), language="en")
    np.testing.assert_array_equal(own, chinese)
    assert np.abs(own - english).max() > 1e-3
