"""Tests of the synthetic fundus corpus, its domain knowledge and the gallery CLI."""
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from retina_jax.data import knowledge as K
from retina_jax.data.synthetic import CorpusSpec, SyntheticFundus, dr_grade_from_lesions

KEYS = {'image', 'index', 'eye', 'conditions', 'labels', 'dr_grade', 'categories', 'atributes', 'report_en',
        'report_zh', 'caption', 'is_expert', 'modality', 'cup_to_disc'}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def _mentions(text, finding, lang='en'):
    syns = (K.FINDING_SYNONYMS_EN if lang == 'en' else K.FINDING_SYNONYMS_ZH)[finding]
    t = text.lower()
    return any(s.lower() in t for s in syns)


# ---------------------------------------------------------------------------------------- knowledge

def test_knowledge_tables():
    assert K.FINDINGS[0] == 'normal' and len(set(K.FINDINGS)) == len(K.FINDINGS)
    assert K.ATTRIBUTES == ('noisy', 'blurred', 'underexposed', 'overexposed')
    for name in K.CONDITIONS + K.DR_GRADE_CATEGORIES + K.FINDINGS + ('diabetic retinopathy',):
        descs = K.CATEGORY_DESCRIPTIONS[name]
        assert 1 <= len(descs) <= 6 and all(isinstance(d, str) and d for d in descs)
    assert K.CATEGORY_DESCRIPTIONS['glaucoma'][:3] == ['optic nerve abnormalities', 'abnormal size of the optic cup',
                                                       'anomalous size in the optic disc']
    assert 'healthy' in K.CATEGORY_DESCRIPTIONS['normal']
    assert K.category_vocabulary() == sorted(K.CATEGORY_DESCRIPTIONS)
    for f in K.FINDINGS[1:]:
        assert K.FINDING_SYNONYMS_EN[f] and K.FINDING_SYNONYMS_ZH[f]
    for c, (core, opt) in K.CONDITION_FINDINGS.items():
        assert c in K.CONDITIONS and set(core + opt) <= set(K.FINDINGS[1:])


def test_dr_grade_rule():
    assert dr_grade_from_lesions(0, 0, 0, 0, 0, False, False) == 0
    assert dr_grade_from_lesions(5, 0, 0, 0, 0, False, False) == 1
    assert dr_grade_from_lesions(5, 3, 2, 0, 0, False, False) == 2
    assert dr_grade_from_lesions(5, 0, 0, 4, 0, False, False) == 2
    assert dr_grade_from_lesions(5, 22, 4, 0, 0, False, False) == 3
    assert dr_grade_from_lesions(5, 22, 3, 0, 0, False, False) == 2
    assert dr_grade_from_lesions(5, 3, 2, 0, 0, True, False) == 3
    assert dr_grade_from_lesions(5, 3, 2, 0, 0, False, True) == 4


# ---------------------------------------------------------------------------------------- determinism

def test_determinism_order_instances_and_pickle():
    spec = CorpusSpec(seed=7, size=50, image_size=64, attribute_prob=0.5)
    a = SyntheticFundus(spec)
    forward = [a[i] for i in (3, 11, 29)]
    b = SyntheticFundus(CorpusSpec(seed=7, size=50, image_size=64, attribute_prob=0.5))
    backward = [b[i] for i in (29, 11, 3)][::-1]
    for x, y in zip(forward, backward):
        _same(x, y)
    c = pickle.loads(pickle.dumps(a))
    _same(c[11], forward[1])
    _same(a[3], forward[0])   # repeated access


def test_different_seed_differs():
    a = SyntheticFundus(CorpusSpec(seed=0, size=10, image_size=64))
    b = SyntheticFundus(CorpusSpec(seed=1, size=10, image_size=64))
    assert not np.array_equal(a[0]['image'], b[0]['image'])
    assert [a.record(i)['report_en'] for i in range(10)] != [b.record(i)['report_en'] for i in range(10)]
    assert not np.array_equal(a[0]['image'], a[1]['image'])


def test_record_equals_item_minus_image():
    ds = SyntheticFundus(CorpusSpec(seed=3, size=40, image_size=48, attribute_prob=0.5))
    for i in range(0, 40, 3):
        item = ds[i]
        assert set(item) == KEYS
        rec = ds.record(i)
        assert 'image' not in rec
        item.pop('image')
        _same(rec, item)


@pytest.mark.parametrize('size', [32, 96, 224, 333])
def test_image_sizes(size):
    ds = SyntheticFundus(CorpusSpec(size=4, image_size=size, attribute_prob=1.0))
    for i in range(4):
        im = ds[i]['image']
        assert im.shape == (size, size, 3) and im.dtype == np.uint8
        assert im[0, 0].sum() == 0 and im[-1, -1].sum() == 0          # black outside the field of view
        c = im[size // 2 - 2:size // 2 + 2, size // 2 - 2:size // 2 + 2]
        assert c.mean() > 10


def test_index_errors():
    ds = SyntheticFundus(CorpusSpec(size=5, image_size=32))
    assert len(ds) == 5
    for bad in (-1, 5, 100):
        with pytest.raises(IndexError):
            ds[bad]
        with pytest.raises(IndexError):
            ds.record(bad)
    ds[np.int64(4)]
    with pytest.raises(ValueError):
        CorpusSpec(image_size=16)
    with pytest.raises(ValueError):
        CorpusSpec(conditions=('flu',))


# ---------------------------------------------------------------------------------------- labels and texts

def test_labels_categories_texts_consistent():
    ds = SyntheticFundus(CorpusSpec(seed=0, size=400, image_size=32, comorbidity_prob=0.3, attribute_prob=0.3))
    vocab = set(K.category_vocabulary())
    n_neg_en = n_neg_zh = n_expert = 0
    seen_conditions = set()
    for i in range(len(ds)):
        r = ds.record(i)
        labels = r['labels']
        assert labels.dtype == np.uint8 and labels.shape == (len(K.FINDINGS),)
        present = [f for f, v in zip(K.FINDINGS, labels) if v]
        assert (labels[0] == 1) == (labels[1:].sum() == 0)
        assert r['eye'] in ('left', 'right') and r['modality'] == 'CFP'
        assert set(r['categories']) <= vocab and r['categories']
        assert set(r['atributes']) <= set(K.ATTRIBUTES)
        assert set(r['conditions']) <= set(K.CONDITIONS)
        seen_conditions.update(r['conditions'])
        if r['conditions'] == ['normal']:
            assert labels[0] == 1 and r['dr_grade'] == 0 and 'normal' in r['categories']
        else:
            assert labels[0] == 0 and 'normal' not in r['conditions']
            for c in r['conditions']:
                assert c in r['categories']
                core = K.CONDITION_FINDINGS[c][0]
                assert all(labels[K.FINDING_INDEX[f]] for f in core), (c, present)
        if 'diabetic retinopathy' in r['conditions']:
            assert 1 <= r['dr_grade'] <= 4
            assert K.DR_GRADE_CATEGORIES[r['dr_grade']] in r['categories']
            if labels[K.FINDING_INDEX['neovascularization']]:
                assert r['dr_grade'] == 4
        else:
            assert r['dr_grade'] == 0
        # every present finding is mentioned, in both languages
        for f in present[1:] if present[0] == 'normal' else present:
            if f == 'normal':
                continue
            assert _mentions(r['report_en'], f), (f, r['report_en'])
            assert _mentions(r['report_zh'], f, 'zh'), (f, r['report_zh'])
        assert ('right eye' in r['report_en'].lower()) == (r['eye'] == 'right')
        assert ('右眼' in r['report_zh']) == (r['eye'] == 'right')
        assert f"{r['cup_to_disc']:.1f}" in r['report_en'] and f"杯盘比{r['cup_to_disc']:.1f}" in r['report_zh']
        if re.search(r'\b(no|without|absence of)\b', r['report_en'].lower().replace('no abnormality', '')):
            n_neg_en += 1
        if any(c in r['report_zh'] for c in K.NEGATION_CUES_ZH):
            n_neg_zh += 1
        assert (r['caption'] != '') == r['is_expert']
        n_expert += r['is_expert']
    assert seen_conditions == set(K.CONDITIONS)
    assert n_neg_en > 100 and n_neg_zh > 100
    assert 60 < n_expert < 180      # expert_fraction 0.3 of 400


def test_negations_never_negate_present_findings():
    ds = SyntheticFundus(CorpusSpec(seed=5, size=300, image_size=32))
    for i in range(len(ds)):
        r = ds.record(i)
        sents = re.split(r'(?<=\.)\s', r['report_en'])
        for s in sents:
            if re.match(r'^(no|there is no|absence of|the fundus is without)\b', s.lower()):
                for f in K.FINDINGS[1:]:
                    if r['labels'][K.FINDING_INDEX[f]]:
                        assert not _mentions(s, f), (s, f)


def test_single_condition_and_glaucoma():
    ds = SyntheticFundus(CorpusSpec(size=30, image_size=32, conditions=('glaucoma',), single_condition=True))
    for i in range(len(ds)):
        r = ds.record(i)
        assert r['conditions'] == ['glaucoma'] and 'glaucoma' in r['categories']
        assert r['cup_to_disc'] >= 0.6
        assert r['labels'][K.FINDING_INDEX['enlarged cup']] == 1 and r['labels'][0] == 0
    hard = SyntheticFundus(CorpusSpec(size=30, image_size=32, conditions=('glaucoma',), single_condition=True, difficulty=1.0))
    assert all(0.6 <= hard.record(i)['cup_to_disc'] for i in range(30))
    normal = SyntheticFundus(CorpusSpec(size=30, image_size=32, conditions=('normal',)))
    for i in range(30):
        r = normal.record(i)
        assert r['cup_to_disc'] <= 0.4 and r['conditions'] == ['normal'] and r['labels'][0] == 1
    six = ('normal', 'diabetic retinopathy', 'glaucoma', 'age-related macular degeneration', 'cataract', 'pathologic myopia')
    ds = SyntheticFundus(CorpusSpec(size=100, image_size=32, conditions=six, single_condition=True, comorbidity_prob=1.0))
    assert all(len(ds.record(i)['conditions']) == 1 for i in range(100))


def test_condition_weights():
    ds = SyntheticFundus(CorpusSpec(size=200, image_size=32, conditions=('normal', 'cataract'), condition_weights=(0.0, 1.0),
                                    comorbidity_prob=0.0))
    assert all(ds.record(i)['conditions'] == ['cataract'] for i in range(200))


# ---------------------------------------------------------------------------------------- pixels carry the signal

def _images(cond, n=6, size=128, **kw):
    ds = SyntheticFundus(CorpusSpec(seed=11, size=n, image_size=size, conditions=(cond,), single_condition=True,
                                    attribute_prob=0.0, **kw))
    return [ds[i]['image'].astype(np.float32) for i in range(n)]


def _local_contrast(im):
    g = im.mean(-1)
    inner = g[16:-16, 16:-16]
    return float(np.abs(np.diff(inner, axis=0)).mean() + np.abs(np.diff(inner, axis=1)).mean())


def _pale_area(im):          # cup pixels: very bright, whitish
    return int(((im[..., 1] > 200) & (im[..., 2] > 150)).sum())


def test_pixels_carry_condition_signal():
    normal = _images('normal')
    cataract = _images('cataract')
    assert np.mean([_local_contrast(x) for x in cataract]) < 0.6 * np.mean([_local_contrast(x) for x in normal])
    glaucoma = _images('glaucoma')
    assert np.median([_pale_area(x) for x in glaucoma]) > 2.5 * np.median([_pale_area(x) for x in normal])
    amd = _images('age-related macular degeneration')

    def yellow(im):
        m = im[44:84, 44:84]          # macula (the disc lies outside this window)
        return int(((m[..., 1] > 150) & (m[..., 0] > 200) & (m[..., 2] < 150)).sum())
    assert min(yellow(x) for x in amd) > 3 * max(yellow(x) for x in normal) + 10
    dr = _images('diabetic retinopathy')

    def dark_red(im):
        return int(((im[..., 0] > 60) & (im[..., 1] < 0.2 * im[..., 0])).sum())   # blood: saturated red
    assert np.median([dark_red(x) for x in dr]) > 3 * np.median([dark_red(x) for x in normal]) + 20


def test_left_right_mirror_disc():
    ds = SyntheticFundus(CorpusSpec(seed=2, size=20, image_size=96, conditions=('glaucoma',), single_condition=True,
                                    attribute_prob=0.0))
    for i in range(20):
        r = ds[i]
        ys, xs = np.nonzero((r['image'][..., 1] > 200) & (r['image'][..., 2] > 150))
        assert len(xs) > 0
        # disc on the nasal side: right eye -> image right half, left eye -> left half
        assert (xs.mean() > 48) == (r['eye'] == 'right')


def test_quality_attributes_visible():
    ds = SyntheticFundus(CorpusSpec(seed=4, size=200, image_size=64, attribute_prob=1.0, conditions=('normal',)))
    ref = SyntheticFundus(CorpusSpec(seed=4, size=200, image_size=64, attribute_prob=0.0, conditions=('normal',)))
    means = {'underexposed': [], 'overexposed': []}
    for i in range(60):
        r = ds[i]
        if r['atributes'] in (['underexposed'], ['overexposed']):
            means[r['atributes'][0]].append(r['image'][16:48, 16:48].mean())
    base = np.mean([ref[i]['image'][16:48, 16:48].mean() for i in range(20)])
    assert means['underexposed'] and means['overexposed']
    assert max(means['underexposed']) < 0.8 * base < base * 1.25 / 0.8 * 0.8 < min(means['overexposed'])


# ---------------------------------------------------------------------------------------- gallery

def test_gallery_cli(tmp_path):
    out = tmp_path / 'g.png'
    proc = subprocess.run([sys.executable, '-m', 'retina_jax.data.gallery', '--out', str(out), '--n', '3',
                           '--image_size', '64', '--seed', '1'], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    im = Image.open(out)
    assert im.format == 'PNG' and im.size[0] > 64 * 3 and im.size[1] > 64


def test_grain_source():
    import grain
    ds = SyntheticFundus(CorpusSpec(seed=1, size=8, image_size=32))
    m = grain.MapDataset.source(ds).map(lambda x: x['image'].shape)
    assert len(m) == 8 and m[5] == (32, 32, 3)
