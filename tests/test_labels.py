"""Tests of the expert-knowledge label extractor (docs/methods.md, "ViLReF")."""
import json
import os
import pickle

import numpy as np
import pytest

from retina_jax.data import knowledge as K
from retina_jax.data.labels import LabelExtractor, log_coverage
from retina_jax.data.synthetic import CorpusSpec, SyntheticFundus

EN, ZH = LabelExtractor.load('en'), LabelExtractor.load('zh')
EXTRACTORS = {'en': EN, 'zh': ZH}


def _labels(ex, text):
    """The positive class names of one report."""
    return [ex.classes[i] for i in np.flatnonzero(ex.extract(text))]


def test_dictionary_extends_the_corpus_synonyms():
    for ex, syns, cues in ((EN, K.FINDING_SYNONYMS_EN, K.NEGATION_CUES_EN),
                           (ZH, K.FINDING_SYNONYMS_ZH, K.NEGATION_CUES_ZH)):
        assert ex.classes == K.FINDINGS and list(ex.terms) == list(K.FINDINGS[1:])
        for f, terms in syns.items():
            assert {t.lower() for t in terms} < set(ex.terms[f]), f   # strictly more: real synonyms added
        assert set(cues) <= set(ex.negation_cues)


@pytest.fixture(scope='module')
def records():
    specs = [CorpusSpec(seed=0, size=1200), CorpusSpec(seed=1, size=1200), CorpusSpec(seed=2, size=600, difficulty=1.0)]
    return [r for s in specs for r in map(SyntheticFundus(s).record, range(s.size))]


@pytest.mark.parametrize('lang', ['en', 'zh'])
def test_recovers_synthetic_labels_exactly(lang, records):
    ex = EXTRACTORS[lang]
    texts = [r[f'report_{lang}'] for r in records]
    want = np.stack([r['labels'] for r in records])
    got = ex.extract_many(texts)
    assert got.dtype == np.uint8 and got.shape == (3000, len(K.FINDINGS))
    wrong = np.flatnonzero((got != want).any(1))
    assert not len(wrong), [(texts[i], ex.matches(texts[i])) for i in wrong[:3]]
    stats = ex.coverage(texts)
    assert stats['unlabelled'] == 0 and stats['negated'] > 0
    assert stats['per_class'] == {c: int(n) for c, n in zip(K.FINDINGS, want.sum(0))}


@pytest.mark.parametrize('lang, text, expected', [
    ('en', 'No haemorrhages. Drusen at the macula.', ['drusen']),
    ('en', 'There is no evidence of microaneurysms or haemorrhages, but hard exudates are seen', ['hard exudate']),
    ('en', 'Fundus without NVD or NVE; laser scars from PRP.', ['laser scar']),
    # one plain mention suffices
    ('en', 'No haemorrhages at the macula; haemorrhages in the periphery.', ['haemorrhage']),
    # cues are word-bounded: neither 'Noted' nor 'non-proliferative' negates
    ('en', 'Noted dot-blot hemorrhages in mild non-proliferative diabetic retinopathy.', ['haemorrhage']),
    ('en', 'No abnormality detected.', ['normal']),   # a normal cue despite its negation word
    ('en', 'Absence of drusen. Healthy retina.', ['normal']),
    ('zh', '未见出血、渗出，可见玻璃膜疣。', ['drusen']),   # 、 keeps the scope, ， ends it
    ('zh', '无出血但见激光光凝斑。', ['laser scar']),
    ('zh', '不伴有视网膜出血。', []),
    ('zh', '诊断：轻度非增殖期糖尿病视网膜病变合并黄斑裂孔。', ['macular hole']),  # '非' is no cue
    ('zh', '眼底未见明显异常。', ['normal']),
    ('zh', '无微血管瘤', []),
])
def test_negation(lang, text, expected):
    assert _labels(EXTRACTORS[lang], text) == expected


def test_longest_match_wins():
    assert _labels(ZH, '血管弓附近可见软性渗出斑。') == ['cotton-wool spot']
    assert _labels(ZH, '黄斑区见渗出。') == ['hard exudate']          # the generic term as a fallback
    assert _labels(EN, 'Scattered soft exudates.') == ['cotton-wool spot']
    assert EN.matches('Few retinal haemorrhages.') == [('haemorrhage', 'retinal haemorrhages', False)]
    assert ZH.matches('未见黄斑区玻璃膜疣') == [('drusen', '黄斑区玻璃膜疣', True)]


def test_coverage_counts():
    texts = ['Normal fundus.', 'No haemorrhages. Drusen at the macula.', 'Image of poor quality.', 'No microaneurysms.',
             'Drusen and geographic atrophy without new vessels.']
    stats = EN.coverage(texts)
    assert {k: stats[k] for k in ('reports', 'unlabelled', 'normal', 'negated')} == \
        {'reports': 5, 'unlabelled': 2, 'normal': 1, 'negated': 3}
    assert stats['unlabelled_fraction'] == pytest.approx(0.4)
    assert {c: n for c, n in stats['per_class'].items() if n} == {'normal': 1, 'drusen': 2, 'geographic atrophy': 1}
    line = log_coverage(stats, 'en')
    assert line.startswith('labels (en) of 5 reports: 2 unlabelled (40.0%), normal 20.0%, 3 negated mentions')
    assert EN.extract_many([]).shape == (0, len(K.FINDINGS))


def _write(tmp_path, **changes):
    with open(os.path.join(os.path.dirname(K.__file__), 'knowledge', 'labels_en.json'), encoding='utf-8') as f:
        data = json.load(f)
    data.update(changes)
    path = tmp_path / 'labels.json'
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}), encoding='utf-8')
    return str(path)


def test_errors_name_the_file_and_field(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere.json'):
        LabelExtractor.load('en', str(tmp_path / 'nowhere.json'))
    with pytest.raises(ValueError, match="'en'.*'zh'"):
        LabelExtractor.load('fr')
    swapped = list(K.FINDINGS)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    cases = [({'classes': swapped}, 'classes'), ({'scope_breaks': None}, 'scope_breaks'),
             ({'language': 'zh'}, 'language'), ({'terms': {'drusen': ['drusen']}}, 'terms'),
             ({'negation_cues': []}, 'negation_cues')]
    for change, field in cases:
        path = _write(tmp_path, **change)
        with pytest.raises(ValueError, match=field) as err:
            LabelExtractor.load('en', path)
        assert path in str(err.value)
    bad = tmp_path / 'bad.json'
    bad.write_text('{', encoding='utf-8')
    with pytest.raises(ValueError, match='bad.json'):
        LabelExtractor.load('en', str(bad))


def test_pickle_round_trip():
    text = 'No haemorrhages. Drusen at the macula.'
    for ex in (EN, ZH):
        clone = pickle.loads(pickle.dumps(ex))
        assert clone == ex and clone.matches(text) == ex.matches(text)
    assert np.array_equal(pickle.loads(pickle.dumps(EN)).extract(text), EN.extract(text))
