"""Tests of the expert-knowledge label extractor (docs/methods.md, "ViLReF")."""
import json
import os
import pickle
import sys

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
        assert set(cues) <= set(ex.triggers['negation_pre'])


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
    per_eye = np.stack([ex.extract(r[f'report_{lang}'], eye=r['eye']) for r in records[:600]])
    np.testing.assert_array_equal(per_eye, want[:600])   # each report is its image's eye's section
    stats = ex.coverage(texts)
    assert stats['unlabelled'] == 0 and stats['negated'] > 0
    assert stats['per_class'] == {c: int(n) for c, n in zip(K.FINDINGS, want.sum(0))}


@pytest.mark.parametrize('lang, text, expected', [
    ('en', 'No haemorrhages. Drusen at the macula.', ['drusen']),
    ('en', 'There is no evidence of microaneurysms or haemorrhages, but hard exudates are seen', ['hard exudate']),
    ('en', 'Fundus without NVD or NVE; laser scars from PRP.', ['laser scar']),
    # one plain mention suffices
    ('en', 'No haemorrhages at the macula; haemorrhages in the periphery.', ['haemorrhage']),
    # cues are word-bounded: neither 'Noted' nor 'non-proliferative' negates; the stage implies its lesion
    ('en', 'Noted dot-blot hemorrhages in mild non-proliferative diabetic retinopathy.', ['microaneurysm', 'haemorrhage']),
    ('en', 'No abnormality detected.', ['normal']),   # a normal cue despite its negation word
    ('en', 'Absence of drusen. Healthy retina.', ['normal']),
    ('zh', '未见出血、渗出，可见玻璃膜疣。', ['drusen']),   # 、 keeps the scope, ， ends it
    ('zh', '无出血但见激光光凝斑。', ['laser scar']),
    ('zh', '不伴有视网膜出血。', ['normal']),   # a denied finding and nothing affirmed: normal
    ('zh', '诊断：轻度非增殖期糖尿病视网膜病变合并黄斑裂孔。', ['microaneurysm', 'macular hole']),  # '非' is no cue
    ('zh', '眼底未见明显异常。', ['normal']),
    ('zh', '无微血管瘤', ['normal']),
])
def test_negation(lang, text, expected):
    assert _labels(EXTRACTORS[lang], text) == expected


@pytest.mark.parametrize('lang, text, expected', [
    # post-negation reaches back to its clause, not past a comma
    ('en', 'Microaneurysms absent.', ['normal']), ('en', 'Microaneurysms present.', ['microaneurysm']),
    ('en', 'Haemorrhages: none. Exudates: none.', ['normal']),
    ('en', 'Drusen, haemorrhages not seen.', ['drusen']),
    ('en', 'Haemorrhages have resolved; laser scars remain.', ['laser scar']),
    ('zh', '出血（-），微血管瘤（-）。', ['normal']), ('zh', '微血管瘤（+），出血（-）。', ['microaneurysm']),
    ('zh', '糖尿病视网膜病变：无。', ['normal']), ('zh', '糖尿病视网膜病变。', ['microaneurysm']),
    # pseudo-negations negate nothing; the plain trigger still does
    ('en', 'Not only drusen but also geographic atrophy.', ['drusen', 'geographic atrophy']),
    ('en', 'No change in the macular hole.', ['macular hole']), ('en', 'No macular hole.', ['normal']),
    ('zh', '黄斑裂孔无明显变化。', ['macular hole']), ('zh', '无明显黄斑裂孔。', ['normal']),
    # terminations end a pre-trigger's scope
    ('en', 'No drusen but geographic atrophy.', ['geographic atrophy']),
    ('en', 'No drusen or geographic atrophy.', ['normal']),
    ('zh', '未见出血，但可见微血管瘤。', ['microaneurysm']), ('zh', '未见出血及微血管瘤。', ['normal']),
])
def test_context_post_negation_pseudo_and_termination(lang, text, expected):
    assert _labels(EXTRACTORS[lang], text) == expected


@pytest.mark.parametrize('lang, uncertain_text, certain_text, finding', [
    ('en', 'Possible drusen at the macula.', 'Drusen at the macula.', 'drusen'),
    ('en', 'A macular hole cannot be excluded.', 'A macular hole.', 'macular hole'),
    ('en', 'Suspicious for neovascularization at the disc.', 'Neovascularization at the disc.', 'neovascularization'),
    ('zh', '疑似视盘新生血管。', '视盘新生血管。', 'neovascularization'),
    ('zh', '黄斑裂孔不除外。', '黄斑裂孔。', 'macular hole'),
    ('zh', '考虑早期玻璃膜疣。', '早期玻璃膜疣。', 'drusen'),
])
def test_uncertain_mentions_follow_the_switch(lang, uncertain_text, certain_text, finding):
    want = {'positive': [finding], 'negative': ['normal'], 'drop': []}   # U-Ones, U-Zeros (denied), ignored
    for setting, expected in want.items():
        ex = LabelExtractor.load(lang, uncertain=setting)
        assert _labels(ex, uncertain_text) == expected, setting
        assert _labels(ex, certain_text) == [finding], setting
    assert EXTRACTORS[lang].uncertain == 'positive'   # the default
    with pytest.raises(ValueError, match="uncertain='maybe'"):
        LabelExtractor.load(lang, uncertain='maybe')


@pytest.mark.parametrize('lang, text, expected', [
    ('en', 'History of retinal haemorrhage.', []), ('en', 'Retinal haemorrhage.', ['haemorrhage']),
    ('en', 'Rule out diabetic retinopathy.', []), ('en', 'Diabetic retinopathy.', ['microaneurysm']),
    ('en', 'Family history of macular degeneration; drusen.', ['drusen']),
    ('en', 'Family history of drusen.', []),
    ('en', 'History of PRP with laser scars.', ['laser scar']),   # a scar is what the history leaves
    ('en', 'Rule out diabetic retinopathy; no microaneurysms.', ['normal']),
    ('zh', '既往视网膜出血。', []), ('zh', '视网膜出血。', ['haemorrhage']),
    ('zh', '建议排除糖尿病视网膜病变。', []), ('zh', '排除糖尿病视网膜病变。', ['normal']),
    ('zh', '家族史：母亲患玻璃膜疣。', []), ('zh', '既往行全视网膜光凝术，可见激光斑。', ['laser scar']),
])
def test_historical_hypothetical_and_other_people_are_not_the_patients_findings(lang, text, expected):
    assert _labels(EXTRACTORS[lang], text) == expected


@pytest.mark.parametrize('lang, text, value', [
    ('en', 'C/D 0.7', 0.7), ('en', 'CDR 0.65.', 0.65), ('en', 'Cup-to-disc ratio of 0.8 OU.', 0.8),
    ('en', 'cup to disc ratio is 0.9', 0.9), ('en', 'vertical cup/disc ratio = 0.75', 0.75), ('en', 'C:D ratio .7', 0.7),
    ('en', 'cup-disc ratio approximately 0.6', 0.6),
    ('zh', '杯盘比0.7', 0.7), ('zh', 'C/D约0.8', 0.8), ('zh', '视杯/视盘=0.65', 0.65), ('zh', '杯盘比约为0.9。', 0.9),
])
def test_cup_to_disc_ratios_in_every_spelling_against_the_threshold(lang, text, value):
    ex = EXTRACTORS[lang]
    assert ex.cup_disc_threshold == 0.6   # the default
    assert _labels(ex, text) == ['enlarged cup']
    low = text.replace(str(value).lstrip('0') if 'ratio .' in text else str(value), '0.3')
    assert _labels(ex, low) == ['normal']   # a measured cup below the threshold denies an enlarged one
    higher = LabelExtractor.load(lang, cup_disc_threshold=round(value + 0.05, 2))
    assert _labels(higher, text) == ['normal']
    assert _labels(LabelExtractor.load(lang, cup_disc_threshold=value), text) == ['enlarged cup']   # at it: enlarged


def test_a_number_without_a_marker_or_after_a_clause_break_is_no_ratio():
    assert _labels(EN, 'Lesion 0.8 disc diameters from the fovea.') == []
    assert _labels(ZH, '杯盘比，视力0.8。') == []
    assert _labels(EN, 'CDR 0.3, haemorrhage 0.9 disc diameters away.') == ['haemorrhage']


@pytest.mark.parametrize('lang, text, expected', [
    ('zh', '视杯明显扩大。', ['enlarged cup']), ('zh', '视杯，扩大。', []),          # no punctuation in the gap
    ('zh', '视杯与视盘之比值明显扩大。', []),                                        # a gap longer than 6 characters
    ('zh', '黄斑区可见全层裂孔。', ['macular hole']), ('zh', '黄斑区未见裂孔。', ['normal']),  # the negation in the gap
    ('zh', '视网膜动脉明显变细。', ['arterial narrowing']), ('zh', '晶体皮质混浊。', ['cataract haze']),
    ('en', 'The disc is cupped.', ['enlarged cup']), ('en', 'The disc margins are sharp and the rim is not cupped.', []),
    ('en', 'Retinal arterioles are attenuated.', ['arterial narrowing']),
])
def test_a_term_matches_with_modifiers_between_its_place_and_form(lang, text, expected):
    assert _labels(EXTRACTORS[lang], text) == expected


@pytest.mark.parametrize('text, expected', [
    ('Neovascularisation elsewhere.', ['neovascularization']), ('Neovascularization elsewhere.', ['neovascularization']),
    ('Scattered haemorrhages.', ['haemorrhage']), ('Scattered hemorrhages.', ['haemorrhage']),
    ('Tesselated fundus.', ['tessellation']), ('Nerve fiber layer infarct.', ['cotton-wool spot']),
    ('Haemangioma of the disc.', []),
])
def test_british_and_american_spellings(text, expected):
    assert _labels(EN, text) == expected


@pytest.mark.parametrize('text, expected', [
    ('Scattered MAs and DBH.', ['microaneurysm', 'haemorrhage']), ('CWS x2.', ['cotton-wool spot']),
    ('NVD present.', ['neovascularization']), ('PRP scars.', ['laser scar']), ('FTMH OD.', ['macular hole']),
    ('Mild NPDR.', ['microaneurysm']), ('PDR.', ['microaneurysm', 'neovascularization']), ('No DR.', ['normal']),
    # case-sensitive: a doctor, a mother and 'he' are not findings
    ('Seen by Dr. Smith.', []), ('Grandma has glaucoma.', []), ('He was referred.', []),
    # a diagnosis implies only what defines it
    ('Glaucoma.', []), ('Hypertensive retinopathy.', []), ('Retinitis pigmentosa.', []),
])
def test_abbreviations_and_what_a_stage_implies(text, expected):
    assert _labels(EN, text) == expected


@pytest.mark.parametrize('lang, text, right, left', [
    ('en', 'OD: drusen. OS: normal fundus.', ['drusen'], ['normal']),
    ('en', 'Right eye: C/D 0.8. Left eye: C/D 0.3.', ['enlarged cup'], ['normal']),
    ('en', 'Poor dilation. OU: tessellated fundi.', ['tessellation'], ['tessellation']),
    ('en', 'Laser scars in both eyes.', ['laser scar'], ['laser scar']),   # no sections: the whole report
    ('zh', '右眼：视网膜散在微血管瘤。左眼：眼底未见明显异常。', ['microaneurysm'], ['normal']),
    ('zh', '右眼杯盘比0.75，左眼杯盘比0.45。', ['enlarged cup'], ['normal']),
    ('zh', '双眼：豹纹状眼底。左眼：黄斑裂孔。', ['tessellation'], ['tessellation', 'macular hole']),
])
def test_per_eye_sections(lang, text, right, left):
    ex = EXTRACTORS[lang]
    assert _names(ex.extract(text, eye='right')) == right
    assert _names(ex.extract(text, eye='left')) == left
    whole = _labels(ex, text)
    assert set(whole) >= (set(right) | set(left)) - {'normal'}
    with pytest.raises(ValueError, match="eye='od'"):
        ex.extract(text, eye='od')


def _names(vector):
    return [K.FINDINGS[i] for i in np.flatnonzero(vector)]


def test_the_hand_written_sets_reach_the_target():
    """Issue 20's acceptance: exact-set accuracy >= 0.95 in each language on the hand-written sets
    (benchmarks/RESULTS.md has the figures before and after)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'benchmarks'))
    from label_eval import SETS, read_set, score
    for lang in ('en', 'zh'):
        for split in ('dev', 'heldout'):
            s = score(EXTRACTORS[lang], read_set(os.path.join(SETS, f'{split}_{lang}.jsonl')))
            assert s['reports'] >= (60 if split == 'dev' else 30)
            assert s['exact'] >= 0.95, (lang, split, s['misses'])
            assert s['per_eye'] == 1.0, (lang, split)


def test_longest_match_wins():
    assert _labels(ZH, '血管弓附近可见软性渗出斑。') == ['cotton-wool spot']
    assert _labels(ZH, '黄斑区见渗出。') == ['hard exudate']          # the generic term as a fallback
    assert _labels(EN, 'Scattered soft exudates.') == ['cotton-wool spot']
    assert EN.matches('Few retinal haemorrhages.') == [('haemorrhage', 'retinal haemorrhages', 'affirmed')]
    assert ZH.matches('未见黄斑区玻璃膜疣') == [('drusen', '黄斑区玻璃膜疣', 'negated')]
    assert EN.matches('Not seen: drusen.') == [('drusen', 'drusen', 'affirmed')]   # 'not seen' is a post-trigger
    assert EN.matches('Possible NPDR.') == [('diabetic retinopathy', 'NPDR', 'uncertain')]


def test_coverage_counts():
    texts = ['Normal fundus.', 'No haemorrhages. Drusen at the macula.', 'Image of poor quality.', 'No microaneurysms.',
             'Drusen and geographic atrophy without new vessels.']
    stats = EN.coverage(texts)
    assert {k: stats[k] for k in ('reports', 'unlabelled', 'normal', 'negated')} == \
        {'reports': 5, 'unlabelled': 1, 'normal': 2, 'negated': 3}   # 'No microaneurysms.' is normal
    assert stats['unlabelled_fraction'] == pytest.approx(0.2)
    assert {c: n for c, n in stats['per_class'].items() if n} == {'normal': 2, 'drusen': 2, 'geographic atrophy': 1}
    line = log_coverage(stats, 'en')
    assert line.startswith('labels (en) of 5 reports: 1 unlabelled (20.0%), normal 40.0%, 3 negated mentions')
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
    cases = [({'classes': swapped}, 'classes'), ({'terminations': None}, 'terminations'),
             ({'language': 'zh'}, 'language'), ({'terms': {'drusen': ['drusen']}}, 'terms'),
             ({'negation_pre': []}, 'negation_pre'), ({'implications': {'x': {'implies': ['fever'], 'terms': ['x']}}},
                                                      'implications.x'),
             ({'abbreviations': {'unknown': ['U']}}, 'abbreviations.unknown'),
             ({'eye_markers': {'right': ['od']}}, 'eye_markers')]
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
