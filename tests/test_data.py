"""Input side: FLAIR preprocessing and prompts, the learned tokenizer, the grain pipeline and zero-shot protocol."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from retina_jax import config as config_lib
from retina_jax.data import knowledge, pipeline, transforms
from retina_jax.data.tokenizer import Tokenize, learn_wordpiece
from retina_jax.evals import metrics as eval_metrics
from retina_jax.evals import zeroshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(REPO, "tests", "data", "fundus_samples")  # copied from shared/data (README there)


def demo_config(**overrides):
    c = config_lib.load(os.path.join(REPO, "configs", "flair.py") + ":demo")
    small = {"data.synthetic.size": 64, "data.synthetic.image_size": 48, "data.image_size": 48,
             "data.batch_size": 8, "data.worker_count": 0, "text.vocab_corpus_size": 40}
    return config_lib.override(c, {**small, **overrides})


def test_resize_long_side_and_zero_pad_bottom_right():
    image = np.full((60, 90, 3), 200, np.uint8)
    out = transforms.resize_long_side_and_pad(image, 48)
    assert out.shape == (48, 48, 3) and out.dtype == np.float32
    # 90 -> 48 wide, 60 -> 32 tall; rows below 32 are zero padding, no mean/std normalisation
    np.testing.assert_allclose(out[:32], 200 / 255, atol=1e-6)
    assert np.all(out[32:] == 0)


@pytest.mark.parametrize("name", ["normal_sample.png", "sample_macular_hole.png", "severe_nonprol_dr.jpg"])
def test_real_fundus_photographs_preprocess(name):
    image = np.asarray(Image.open(os.path.join(SAMPLES, name)).convert("RGB"))
    out = transforms.resize_long_side_and_pad(image, 512)
    clip = transforms.preprocess(image, 224, "clip")  # square bicubic resize + CLIP mean/std
    assert clip.shape == (224, 224, 3)
    np.testing.assert_allclose(clip * transforms.CLIP_STD + transforms.CLIP_MEAN,
                               transforms.resize_square(image, 224), atol=1e-5)
    h, w = image.shape[:2]
    assert out.shape == (512, 512, 3) and 0.0 <= out.min() and out.max() <= 1.0
    if w > h:  # landscape: padded at the bottom
        assert np.all(out[round(h * 512 / w) + 1:] == 0)


def test_augment_is_a_function_of_the_generator():
    cfg = demo_config().data.augment
    cfg.affine_p = cfg.jitter_p = cfg.hflip_p = 1.0
    image = transforms.resize_long_side_and_pad(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8), 40)
    a = transforms.augment(image, np.random.default_rng(7), cfg)
    b = transforms.augment(image, np.random.default_rng(7), cfg)
    c = transforms.augment(image, np.random.default_rng(8), cfg)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert a.min() >= 0 and a.max() <= 1


def _augment_as_written(image, rng, cfg):
    """FLAIR's/ViLReF's augmentation in its plain formulas (issue 19's faster `augment` must give
    these values exactly)."""
    if rng.random() < cfg.hflip_p:
        image = image[:, ::-1]
    if rng.random() < cfg.affine_p:
        angle, scale = rng.uniform(-cfg.rotate_deg, cfg.rotate_deg), rng.uniform(cfg.scale_min, cfg.scale_max)
        image = transforms._rotate_scale(image, angle, scale)
    if rng.random() < cfg.jitter_p:
        brightness = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
        contrast = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
        image = image * brightness
        mean = image.mean()
        image = (image - mean) * contrast + mean
        if cfg.saturation > 0:
            saturation = rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
            grey = image @ np.array([0.299, 0.587, 0.114], np.float32)
            image = (image - grey[..., None]) * saturation + grey[..., None]
    return np.clip(image, 0.0, 1.0).astype(np.float32)


@pytest.mark.parametrize("kind", ["flair", "vilref"])
def test_augment_and_normalize_give_the_plain_formulas_exactly_and_leave_their_input(kind):
    cfg = config_lib.load(os.path.join(REPO, "configs", f"{kind}.py") + ":demo").data.augment
    cfg.jitter_p = 0.7
    image = transforms.resize_square(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8), 40)
    before = image.copy()
    for seed in range(24):
        got = transforms.augment(image, np.random.default_rng(seed), cfg)
        np.testing.assert_array_equal(got, _augment_as_written(image, np.random.default_rng(seed), cfg))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(transforms.normalize(got, "clip"),
                                      ((got - transforms.CLIP_MEAN) / transforms.CLIP_STD).astype(np.float32))
    np.testing.assert_array_equal(image, before)
    batch = np.stack([image, image[:, ::-1]])  # any leading axes, any strides
    np.testing.assert_array_equal(transforms.normalize(batch, "clip"), (batch - transforms.CLIP_MEAN) / transforms.CLIP_STD)
    np.testing.assert_array_equal(image, before)


def test_prompt_template_collapses_the_empty_attribute():
    template = demo_config().data.prompt_template
    assert pipeline.make_prompt(template, "", "glaucoma") == "A fundus photograph of glaucoma"
    assert pipeline.make_prompt(template, "noisy", "drusen") == "A noisy fundus photograph of drusen"


def test_flair_transform_samples_category_and_keeps_the_original_id():
    vocab = knowledge.category_vocabulary()
    t = pipeline.FlairTransform(32, "flair", None, "A {atr} fundus photograph of {cls}", description_swap=True)
    example = {"index": 0, "image": np.zeros((32, 32, 3), np.uint8), "categories": ["glaucoma"], "atributes": ["noisy"]}
    texts = set()
    for seed in range(60):
        out = t(example, np.random.default_rng(seed))
        assert out["category_id"] == vocab.index("glaucoma")
        assert out["prompt"].startswith("A noisy fundus photograph of ")
        texts.add(out["prompt"][len("A noisy fundus photograph of "):])
    # uniform over [name] + descriptions: every option shows up
    assert texts == {"glaucoma", *knowledge.CATEGORY_DESCRIPTIONS["glaucoma"]}
    no_swap = pipeline.FlairTransform(32, "flair", None, "A {atr} fundus photograph of {cls}", description_swap=False)
    assert no_swap(example, np.random.default_rng(0))["prompt"] == "A noisy fundus photograph of glaucoma"


def test_unknown_category_is_an_error_naming_the_example():
    t = pipeline.FlairTransform(32, "flair", None, "A {atr} fundus photograph of {cls}", description_swap=True)
    example = {"index": 17, "image": np.zeros((32, 32, 3), np.uint8), "categories": ["unicorn"], "atributes": []}
    with pytest.raises(ValueError, match="example 17: unknown category 'unicorn'"):
        t(example, np.random.default_rng(0))


def test_learned_vocabulary_is_identical_across_processes_and_covers_the_corpus(tmp_path):
    config = demo_config()
    texts = pipeline.vocabulary_texts(config)
    corpus = tmp_path / "texts.txt"
    corpus.write_text("\n".join(texts))
    code = ("import sys; from retina_jax.data.tokenizer import learn_wordpiece; "
            "learn_wordpiece(open(sys.argv[1]).read().splitlines(), sys.argv[2], vocab_size=800, "
            "lowercase=False, max_len=32)")
    for name in ("a", "b"):  # separate processes: hash seeds differ
        subprocess.run([sys.executable, "-c", code, str(corpus), str(tmp_path / name)], check=True)
    assert (tmp_path / "a" / "vocab.txt").read_bytes() == (tmp_path / "b" / "vocab.txt").read_bytes()
    tok = Tokenize(str(tmp_path / "a"), 32)
    ids, mask = tok(texts[:150])
    assert ids.shape == (150, 32) and mask.shape == (150, 32)
    unk = tok.tokenizer.token_to_id("[UNK]")
    assert not np.any(ids == unk), "corpus text tokenised to [UNK]"
    assert np.all(ids[:, 0] == tok.tokenizer.token_to_id("[CLS]"))
    # transformers reads the same directory and agrees token for token
    from transformers import BertTokenizerFast
    hf = BertTokenizerFast.from_pretrained(str(tmp_path / "a"))
    enc = hf(texts[:20], padding="max_length", truncation=True, max_length=32)
    np.testing.assert_array_equal(ids[:20], np.asarray(enc["input_ids"]))


def test_tokenize_encodes_a_text_once_and_gives_what_the_tokenizer_gives(tmp_path, monkeypatch):
    config = demo_config()
    tok = Tokenize(pipeline.prepare_tokenizer(config, str(tmp_path)), config.text.max_len)
    texts = ["A fundus photograph of glaucoma", "drusen", "A fundus photograph of glaucoma", "cataract"]
    plain = tok.tokenizer.encode_batch(texts)

    class Counting:  # the tokenizer, recording what it is asked to encode
        calls = []

        def encode_batch(self, batch):
            self.calls.append(list(batch))
            return tok_inner.encode_batch(batch)

    tok_inner, tok._tok = tok.tokenizer, Counting()
    for _ in range(2):
        ids, mask = tok(texts)
        np.testing.assert_array_equal(ids, [e.ids for e in plain])
        np.testing.assert_array_equal(mask, [e.attention_mask for e in plain])
        assert ids.dtype == mask.dtype == np.int32
    assert Counting.calls == [["A fundus photograph of glaucoma", "drusen", "cataract"]]  # each distinct text once
    tok._tok = tok_inner
    assert sorted(tok._cache) == sorted(set(texts))
    monkeypatch.setattr(Tokenize, "CACHE_SIZE", 3)  # a fourth distinct text starts the cache afresh
    ids, _ = tok(["retinal detachment"])
    np.testing.assert_array_equal(ids[0], tok.tokenizer.encode("retinal detachment").ids)
    assert list(tok._cache) == ["retinal detachment"]
    assert tok([])[0].shape == (0, config.text.max_len)


def test_vocabulary_too_small_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="config.text.vocab_size=10"):
        learn_wordpiece(["glaucoma drusen"], str(tmp_path / "t"), vocab_size=10, lowercase=False, max_len=8)


def test_train_pipeline_batches_are_deterministic_and_resumable(tmp_path):
    config = demo_config()
    tok = Tokenize(pipeline.prepare_tokenizer(config, str(tmp_path)), config.text.max_len)
    it = iter(pipeline.train_dataset(config, tok))
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    fourth = next(it)
    b = first[0]
    assert b["image"].shape == (8, 48, 48, 3) and b["image"].dtype == np.float32
    assert b["input_ids"].shape == (8, config.text.max_len) and b["attention_mask"].dtype == np.int32
    assert b["category_id"].shape == (8,)
    it2 = iter(pipeline.train_dataset(config, tok))
    for expected in first:
        got = next(it2)
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k])
    it3 = iter(pipeline.train_dataset(config, tok))
    it3.set_state(state)
    for k, v in next(it3).items():
        np.testing.assert_array_equal(v, fourth[k])


def test_heldout_split_uses_its_own_seed_and_single_conditions():
    config = demo_config(**{"heldout.conditions.size": 30})
    source = pipeline.heldout_source(config)
    assert source.spec.seed == config.heldout.conditions.seed != config.data.synthetic.seed
    batches = list(pipeline.heldout_batches(config, 16))
    assert len(batches) == 2
    images, labels, valid = batches[-1]
    assert valid.sum() == 14 and np.all(images[~valid] == 0)
    all_labels = np.concatenate([y[v] for _, y, v in batches])
    assert set(all_labels) <= set(range(len(config.heldout.conditions.classes)))


def test_zero_shot_prototypes_are_unnormalised_means():
    classes = ["glaucoma", "cataract"]
    prompts = zeroshot.class_prompts(classes, "A fundus photograph of {}")
    assert prompts[0][0] == "A fundus photograph of glaucoma"
    assert len(prompts[0]) == 1 + len(knowledge.CATEGORY_DESCRIPTIONS["glaucoma"])
    rng = np.random.default_rng(0)
    table = {}

    def encode(ids, mask):
        out = rng.normal(size=(len(ids), 4))
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        for row, e in zip(ids, out):
            table[tuple(row)] = e
        return out

    tokenize = lambda texts: (np.asarray([[hash(t) % 1000, i] for i, t in enumerate(texts)]), None)
    protos = zeroshot.class_prototypes(encode, tokenize, classes, "A fundus photograph of {}")
    assert protos.shape == (2, 4)
    assert np.linalg.norm(protos[0]) < 1.0  # mean of unit vectors, not re-normalised
    probs = zeroshot.zero_shot_probs(protos / np.linalg.norm(protos, axis=1, keepdims=True), protos, 10.0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    with pytest.raises(KeyError, match="unicorn"):
        zeroshot.class_prompts(["unicorn"], "{}")


def test_classification_metrics_against_hand_computed_values():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[.8, .1, .1], [.2, .7, .1], [.1, .8, .1], [.1, .7, .2], [.1, .1, .8], [.6, .2, .2]])
    m = eval_metrics.classification_metrics(labels, probs)
    # preds = [0, 1, 1, 1, 2, 0]: per-class recall 0.5, 1.0, 0.5
    assert m["aca"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    perfect = eval_metrics.classification_metrics(labels, np.eye(3)[labels])
    assert perfect["aca"] == perfect["kappa"] == perfect["f1"] == perfect["auc"] == 1.0


def test_worker_count_auto_is_one_per_core_less_the_step(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert pipeline.worker_count(-1) == 15
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert pipeline.worker_count(-1) == 1  # this 2-core machine: the demos' one worker
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert pipeline.worker_count(-1) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(128)))
    assert pipeline.worker_count(-1) == 32
    assert pipeline.worker_count(0) == 0 and pipeline.worker_count(3) == 3
    assert config_lib.load(os.path.join(REPO, "configs", "vilref.py")).data.worker_count == -1
    with pytest.raises(config_lib.ConfigError, match=r"data.worker_count: must be >= 0, or -1"):
        config_lib.validate(demo_config(**{"data.worker_count": -2}), 1)
