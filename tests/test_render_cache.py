"""The render cache (retina_jax/data/render_cache.py): the corpus drawn once serves exactly what the
renderer draws, training batches are unchanged, and a cache is never read half-drawn or stale."""
import os

import numpy as np
import pytest

from retina_jax import config as config_lib
from retina_jax.data import pipeline, render_cache
from retina_jax.data.synthetic import CorpusSpec, SyntheticFundus
from retina_jax.data.tokenizer import Tokenize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = CorpusSpec(seed=11, size=24, image_size=32)


def assert_same_example(got: dict, expected: dict):
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, np.ndarray):
            assert got[key].dtype == value.dtype
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        else:
            assert got[key] == value, key


@pytest.mark.parametrize("workers", [1, 2])
def test_cached_examples_are_the_renderers_bit_for_bit(tmp_path, workers):
    source = SyntheticFundus(SPEC)
    cached = render_cache.CachedCorpus(source, str(tmp_path), workers=workers)
    assert len(cached) == len(source)
    for i in range(len(source)):
        expected = source[i]
        assert_same_example(cached[i], expected)
        assert_same_example(cached.record(i), {k: v for k, v in expected.items() if k != "image"})
    with pytest.raises(IndexError):
        cached[len(source)]


def test_a_returned_example_is_the_callers_to_change(tmp_path):
    cached = render_cache.CachedCorpus(SyntheticFundus(SPEC), str(tmp_path))
    first = cached[3]
    first["image"][:] = 0
    first["labels"][:] = 7
    first["categories"].append("x")
    assert_same_example(cached[3], SyntheticFundus(SPEC)[3])


def test_a_cache_is_drawn_once_and_keyed_by_spec(tmp_path, monkeypatch):
    render_cache.CachedCorpus(SyntheticFundus(SPEC), str(tmp_path))
    drawn = []
    monkeypatch.setattr(render_cache, "build", lambda spec, path, workers=None: drawn.append(spec))
    render_cache.CachedCorpus(SyntheticFundus(SPEC), str(tmp_path))
    assert drawn == []  # found on disk
    other = CorpusSpec(seed=12, size=24, image_size=32)
    assert render_cache.cache_key(other) != render_cache.cache_key(SPEC)
    with pytest.raises(FileNotFoundError):  # the patched build drew nothing: the key is new
        render_cache.CachedCorpus(SyntheticFundus(other), str(tmp_path))[0]
    assert drawn == [other]


def test_an_interrupted_drawing_leaves_no_cache_behind(tmp_path, monkeypatch):
    def fail(spec, start, stop):
        if start:
            raise RuntimeError("killed while drawing")
        return real(spec, start, stop)

    real = render_cache._draw
    monkeypatch.setattr(render_cache, "_draw", fail)
    monkeypatch.setattr(render_cache, "CHUNK", 8)
    with pytest.raises(RuntimeError, match="killed"):
        render_cache.CachedCorpus(SyntheticFundus(SPEC), str(tmp_path), workers=1)
    assert os.listdir(tmp_path) == []  # neither the cache nor its half-drawn temporary directory
    monkeypatch.setattr(render_cache, "_draw", real)
    assert_same_example(render_cache.CachedCorpus(SyntheticFundus(SPEC), str(tmp_path))[20], SyntheticFundus(SPEC)[20])


def test_training_batches_are_the_same_with_and_without_the_cache(tmp_path):
    """Augmentation still draws per step: the cache changes where the source image comes from, not
    the batch (ViLReF's report stream: image, report tokens and extracted labels)."""
    base = config_lib.load(os.path.join(REPO, "configs", "vilref.py") + ":stage=clip,demo")
    small = {"data.synthetic.size": 48, "data.synthetic.image_size": 48, "data.image_size": 40,
             "data.batch_size": 8, "data.worker_count": 0, "text.vocab_corpus_size": 40}
    batches = {}
    for name, cache_dir in (("drawn", ""), ("cached", str(tmp_path / "cache"))):
        config = config_lib.override(base, {**small, "data.synthetic.cache_dir": cache_dir})
        tok = Tokenize(pipeline.prepare_tokenizer(config, str(tmp_path / name)), config.text.max_len)
        it = iter(pipeline.train_dataset(config, tok))
        batches[name] = [next(it) for _ in range(8)]  # 8 batches of 8 = one epoch and a third
    assert os.listdir(tmp_path / "cache") == [render_cache.cache_key(pipeline.synthetic_source(config).spec)]
    for got, expected in zip(batches["cached"], batches["drawn"]):
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
