"""Tests of the evaluation task files (FLAIR's experiment definitions; docs/methods.md, "FLAIR" and "ViLReF")."""
import csv
import json
import os
import pickle
import shutil

import grain
import numpy as np
import pytest
from PIL import Image

from configs import common
from retina_jax.data import knowledge
from retina_jax.data.images import DataError
from retina_jax.data.synthetic import CorpusSpec, SyntheticFundus
from retina_jax.evals import tasks as T
from retina_jax.evals import zeroshot

SAMPLES = os.path.join(os.path.dirname(__file__), 'data', 'fundus_samples')
TEMPLATE = 'A fundus photograph of {}'
DR = ('no diabetic retinopathy', 'mild diabetic retinopathy', 'moderate diabetic retinopathy',
      'severe diabetic retinopathy', 'proliferative diabetic retinopathy')


@pytest.mark.parametrize('name', T.list_tasks())
def test_every_task_loads_and_prompts_every_class(name):
    task = T.load_task(name)
    assert task.name == name and task.kind in T.KINDS and task.source
    assert len(set(task.classes)) == len(task.classes) > 0
    assert set(task.descriptions) == set(task.classes)
    assert set(task.descriptions_zh) <= set(task.classes)
    for texts in (*task.descriptions.values(), *task.descriptions_zh.values()):
        assert all(isinstance(t, str) and t.strip() for t in texts)
    assert all(task.targets[c] == i for i, c in enumerate(task.classes))
    prompts = zeroshot.class_prompts(task.classes, TEMPLATE, task.descriptions)
    for c, texts in zip(task.classes, prompts):
        assert texts[0] == TEMPLATE.format(c)           # the name is always a prompt of the ensemble
        assert texts[1:] == [TEMPLATE.format(d) for d in task.descriptions[c]]
        # The name is added by class_prompts: stored again it would weigh twice in the prototype mean.
        assert c not in task.descriptions[c]
        assert task.name_prompt or task.descriptions[c]  # a class whose name is no prompt has descriptions
    if task.descriptions_zh:
        zh = zeroshot.class_prompts(task.classes, TEMPLATE, task.descriptions_zh, language='zh')
        assert all(zh)
    if task.dataframe is not None:
        assert task.dataframe.endswith('.csv')
    for protocol in task.splits.values():
        assert protocol['folds'] >= 1


def test_the_papers_public_tasks_are_there_in_the_original_label_order():
    names = set(T.list_tasks())
    assert {'02_MESSIDOR', '37_DeepDRiD_train_eval', '37_DeepDRiD_test', '08_ODIR200x3', '13_FIVES', '25_REFUGE',
            '36_ACRIMA', '05_20x3', 'RFMiD_train', 'RFMiD_valid', 'RFMiD_test', 'AMD', 'TAOP'} <= names
    assert T.load_task('02_MESSIDOR').classes == DR == T.load_task('37_DeepDRiD_test').classes
    assert T.load_task('13_FIVES').classes == ('normal', 'age related macular degeneration', 'diabetic retinopathy',
                                               'glaucoma')
    assert T.load_task('08_ODIR200x3').classes == ('normal', 'pathologic myopia', 'cataract')
    assert T.load_task('25_REFUGE').classes == ('no glaucoma', 'glaucoma') == T.load_task('36_ACRIMA').classes
    assert T.load_task('AMD').classes == ('age related macular degeneration', 'normal')   # KeepFIT's order
    assert {T.load_task(n).source for n in ('02_MESSIDOR', 'AMD', 'RFMiD_train')} == {'FLAIR', 'KeepFIT', 'ViLReF'}
    rfmid = T.load_task('RFMiD_test')
    assert rfmid.kind == 'multilabel' and len(rfmid.classes) == 28
    assert rfmid.classes[:4] == ('DR', 'ARMD', 'MH', 'DN') and rfmid.classes[-1] == 'OTHER'
    # FLAIR's prompt set of a class is definitions[c] + [c] (the name once).
    messidor = T.load_task('02_MESSIDOR')
    assert zeroshot.class_prompts(['no diabetic retinopathy'], TEMPLATE, messidor.descriptions) == [
        [TEMPLATE.format('no diabetic retinopathy'), TEMPLATE.format('no microaneurysms')]]
    assert T.load_task('25_REFUGE').descriptions['glaucoma'] == (
        'optic nerve abnormalities', 'abnormal size of the optic cup', 'anomalous size in the optic disc')
    assert T.load_task('13_FIVES').descriptions['normal'] == (
        'healthy', 'no findings', 'no lesion signs', 'no glaucoma', 'no retinopathy')
    mmac = T.load_task('38_MMAC23A_train')
    assert not mmac.name_prompt and mmac.descriptions['myopic maculopathy grade one'] == ('tessellated fundus',)
    assert messidor.splits['zero_shot']['shots_test'] == '100%' and messidor.splits['linear_probe']['folds'] == 5
    for name in names:
        task = T.load_task(name)
        if task.source in ('FLAIR', 'KeepFIT', 'synthetic') and task.kind == 'classification':
            assert task.splits == T.FLAIR_PROTOCOLS, name


def test_synthetic_tasks_match_the_trainer_and_the_knowledge_base():
    config = common.get_config()
    conditions = T.load_task(config.heldout.conditions.name)
    assert conditions.name == 'synthetic_conditions' and conditions.source == 'synthetic'
    assert conditions.classes == tuple(config.heldout.conditions.classes) and conditions.dataframe is None
    assert conditions.descriptions == {c: tuple(knowledge.CATEGORY_DESCRIPTIONS[c]) for c in conditions.classes}
    assert [conditions.descriptions_zh[c][0] for c in conditions.classes] == [
        knowledge.CONDITION_NAMES_ZH[c] for c in conditions.classes]
    grade = T.load_task('synthetic_dr_grade')
    assert grade.classes == knowledge.DR_GRADE_CATEGORIES and grade.kind == 'classification'
    assert [grade.descriptions_zh[c] for c in grade.classes] == [(n,) for n in knowledge.DR_GRADE_NAMES_ZH]
    findings = T.load_task('synthetic_findings')
    assert findings.classes == knowledge.FINDINGS and findings.kind == 'multilabel'
    assert findings.descriptions_zh['microaneurysm'][0] == knowledge.FINDING_SYNONYMS_ZH['microaneurysm'][0]


USER_TASK = {
    'name': 'my_glaucoma', 'source': 'user', 'kind': 'classification', 'dataframe': 'mine/glaucoma.csv',
    'classes': ['healthy eye', 'glaucoma'], 'targets': {'healthy eye': 0, 'normal': 0, 'glaucoma': 1},
    'other_categories': ['noisy'], 'descriptions': {'glaucoma': ['large optic cup']},
    'descriptions_zh': {'glaucoma': ['青光眼', '视杯扩大']},
    'splits': {'linear_probe': {'shots_train': 10, 'shots_test': '30%', 'folds': 3},
               'clip_adapter': {'shots_train': '16'}},   # a count as FLAIR's command line gives it
    'notes': 'my data',
}


def _write(path, data):
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(data, f, ensure_ascii=False)
    return str(path)


def test_user_task_file_round_trip(tmp_path):
    task = T.load_task(_write(tmp_path / 'mine.json', USER_TASK))
    assert task.classes == ('healthy eye', 'glaucoma') and task.targets['normal'] == 0
    assert task.descriptions == {'healthy eye': (), 'glaucoma': ('large optic cup',)}
    assert task.descriptions_zh == {'glaucoma': ('青光眼', '视杯扩大')} and task.other_categories == ('noisy',)
    assert task.splits['linear_probe']['shots_train'] == 10 and task.name_prompt and task.notes == 'my data'
    for original in (task, T.load_task('RFMiD_train'), T.load_task('synthetic_conditions')):
        path = str(tmp_path / f'{original.name}_copy.json')
        T.save_task(original, path)
        assert T.load_task(path) == original


@pytest.mark.parametrize('change, field', [
    ({'kind': None}, "missing field(s) ['kind']"),
    ({'clases': ['a']}, "unknown field(s) ['clases']"),
    ({'kind': 'regression'}, "field 'kind'"),
    ({'classes': 'glaucoma'}, "field 'classes'"),
    ({'classes': ['glaucoma', 'glaucoma']}, "field 'classes': duplicate class(es) ['glaucoma']"),
    ({'classes': []}, "field 'classes'"),
    ({'name': 7}, "field 'name'"),
    ({'dataframe': ''}, "field 'dataframe'"),
    ({'descriptions': {'cataract': ['haze']}}, "field 'descriptions'"),
    ({'descriptions': {'glaucoma': ['']}}, "field 'descriptions.glaucoma'"),
    ({'descriptions': ['large optic cup']}, "field 'descriptions'"),
    ({'descriptions_zh': {'glaucoma': '青光眼'}}, "field 'descriptions_zh.glaucoma'"),
    ({'targets': {'healthy eye': 1, 'glaucoma': 0}}, "field 'targets'"),
    ({'targets': {'healthy eye': 0, 'glaucoma': 2}}, "field 'targets'"),
    ({'other_categories': ['normal']}, "field 'other_categories'"),
    ({'name_prompt': False}, "field 'descriptions'"),          # 'healthy eye' would have no prompt at all
    ({'name_prompt': 'no'}, "field 'name_prompt'"),
    ({'splits': {'linear_probe': {'folds': 0}}}, "field 'splits.linear_probe.folds'"),
    ({'splits': {'linear_probe': {'shots_test': '120%'}}}, "field 'splits.linear_probe.shots_test'"),
    ({'splits': {'zero_shot': {'shots_train': -1}}}, "field 'splits.zero_shot.shots_train'"),
    ({'splits': {'zero_shot': {'shots_val': 'few'}}}, "field 'splits.zero_shot.shots_val'"),
    ({'splits': {'zero_shot': 'all'}}, "field 'splits.zero_shot'"),
    ({'notes': ['x']}, "field 'notes'"),
])
def test_malformed_task_file_names_the_file_and_field(tmp_path, change, field):
    data = {**USER_TASK, **change}
    data = {k: v for k, v in data.items() if v is not None}
    path = _write(tmp_path / 'bad.json', data)
    with pytest.raises(ValueError) as e:
        T.load_task(path)
    assert str(e.value).startswith(path) and field in str(e.value)


def test_unreadable_or_missing_task_files(tmp_path):
    path = tmp_path / 'broken.json'
    path.write_text('{"name": "x",')
    with pytest.raises(ValueError, match=f'{path}: not valid JSON'):
        T.load_task(str(path))
    with pytest.raises(ValueError, match='expected a JSON object'):
        T.load_task(_write(tmp_path / 'list.json', [USER_TASK]))
    with pytest.raises(FileNotFoundError, match='missing.json'):
        T.load_task(str(tmp_path / 'missing.json'))


def test_unknown_task_name_lists_the_available_ones(tmp_path, monkeypatch):
    with pytest.raises(ValueError) as e:
        T.load_task('03_MESSIDOR')
    assert "'03_MESSIDOR'" in str(e.value) and '02_MESSIDOR' in str(e.value) and 'synthetic_findings' in str(e.value)
    # A shipped file must be named after its task (list_tasks reads the file names).
    monkeypatch.setattr(T, 'TASKS_DIR', str(tmp_path))
    _write(tmp_path / 'renamed.json', USER_TASK)
    assert 'renamed' in T.list_tasks()
    with pytest.raises(ValueError, match=r"renamed.json: field 'name' is 'my_glaucoma'"):
        T.load_task('renamed')


# ------------------------------------------------------------------------------- task_dataset
REAL = {'normal': 'normal_sample.png', 'hole': 'sample_macular_hole.png', 'dr': 'severe_nonprol_dr.jpg'}


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    """The three real photographs and three 32 px synthetic ones, under FLAIR-style dataset folders."""
    root = tmp_path_factory.mktemp('FUNDUS')
    os.makedirs(root / 'real')
    for key, name in REAL.items():
        shutil.copy(os.path.join(SAMPLES, name), root / 'real' / name)
    os.makedirs(root / 'synthetic')
    corpus = SyntheticFundus(CorpusSpec(seed=0, size=3, image_size=32))
    for i in range(3):
        Image.fromarray(corpus[i]['image']).save(root / 'synthetic' / f'{i}.png')
    return root


def _dataframe(path, rows):
    """A FLAIR-format dataframe as pandas writes it (leading unnamed index; literal lists)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w', newline='', encoding='utf-8') as f:
        w = csv.writer(f)
        w.writerow(['', 'image', 'atributes', 'categories'])
        for i, (image, categories) in enumerate(rows):
            w.writerow([i, image, '[]', repr(list(categories))])
    return str(path)


def test_task_dataset_labels_rows_by_their_first_category_as_flair(data_root):
    task = T.load_task('13_FIVES')
    rows = [(f'real/{REAL["normal"]}', ['normal']), (f'real/{REAL["dr"]}', ['diabetic retinopathy']),
            (f'real/{REAL["hole"]}', ['age related macular degeneration']), ('synthetic/0.png', ['glaucoma']),
            ('synthetic/1.png', ['glaucoma', 'normal']), ('synthetic/2.png', ['normal', 'glaucoma'])]
    csv_path = _dataframe(data_root / task.dataframe, rows)
    source = T.task_dataset(task, str(data_root))
    assert len(source) == 6
    examples = [source[i] for i in range(6)]
    assert [e['label'] for e in examples] == [0, 2, 1, 3, 3, 0]
    assert examples[1]['image'].shape == (683, 1024, 3) and examples[3]['image'].shape == (32, 32, 3)
    np.testing.assert_array_equal(examples[0]['image'], np.asarray(Image.open(os.path.join(SAMPLES, REAL['normal']))))
    assert examples[4]['where'] == f'{csv_path} row 4' and examples[4]['index'] == 4
    # grain reads it (pickled into workers) unchanged.
    restored = pickle.loads(pickle.dumps(source))
    assert grain.MapDataset.source(restored)[2]['label'] == 1


def test_task_dataset_messidor_rows_and_bad_rows(data_root, tmp_path):
    task = T.load_task('02_MESSIDOR')
    frames = str(tmp_path / 'local_data')   # FLAIR's dataframes left where they are: dataframe_root
    rows = [(f'real/{REAL["normal"]}', ['no diabetic retinopathy', 'no diabetic macular edema']),
            (f'real/{REAL["dr"]}', ['severe diabetic retinopathy', 'diabetic macular edema']),
            ('synthetic/0.png', ['diabetic macular edema', 'mild diabetic retinopathy'])]
    csv_path = _dataframe(os.path.join(frames, task.dataframe), rows)
    source = T.task_dataset(task, str(data_root), dataframe_root=frames)
    assert [source[i]['label'] for i in range(2)] == [0, 3]
    with pytest.raises(DataError, match=rf"{csv_path} row 2: .*FIRST category.*'diabetic macular edema'"):
        source[2]
    # A category the task does not know is refused when the dataframe is read.
    _dataframe(os.path.join(frames, task.dataframe), rows[:1] + [('synthetic/1.png', ['glaucoma'])])
    with pytest.raises(DataError, match=rf"{csv_path} row 1: unknown category \['glaucoma'\]"):
        T.task_dataset(task, str(data_root), dataframe_root=frames)


def test_task_dataset_multilabel_rfmid(data_root):
    task = T.load_task('RFMiD_train')
    rows = [(f'real/{REAL["dr"]}', ['a disease', 'DR', 'MH']),
            # FLAIR's names for RFMiD's columns, its 'edudates' typo and a rare disease merged into OTHER
            (f'real/{REAL["hole"]}', ['a disease', 'macular hole', 'edudates', 'cotton wool spots']),
            (f'real/{REAL["normal"]}', ['no disease', 'healthy'])]
    _dataframe(data_root / task.dataframe, rows)
    source = T.task_dataset(task, str(data_root))
    labels = np.stack([source[i]['label'] for i in range(3)])
    assert labels.dtype == np.uint8 and labels.shape == (3, 28)
    positives = [[task.classes[j] for j in np.flatnonzero(y)] for y in labels]
    assert positives == [['DR', 'MH'], ['EDN', 'MHL', 'OTHER'], []]


def test_task_label_errors_name_the_row():
    with pytest.raises(DataError, match='x.csv row 3: .*none'):
        T.task_label(T.load_task('25_REFUGE'), [], 'x.csv row 3')
    with pytest.raises(DataError, match="x.csv row 4: category 'glaucoma' is neither"):
        T.task_label(T.load_task('RFMiD_test'), ['DR', 'glaucoma'], 'x.csv row 4')
    with pytest.raises(DataError, match='x.csv row 5: no category'):
        T.task_label(T.load_task('RFMiD_test'), [], 'x.csv row 5')


def test_task_dataset_of_a_user_task_and_of_a_synthetic_one(data_root, tmp_path):
    csv_path = _dataframe(tmp_path / 'glaucoma.csv', [('synthetic/0.png', ['normal', 'noisy']),
                                                        ('synthetic/1.png', ['glaucoma'])])
    user = T.load_task(_write(tmp_path / 'mine.json', {**USER_TASK, 'dataframe': csv_path}))  # absolute path
    source = T.task_dataset(user, str(data_root))
    assert [source[i]['label'] for i in range(2)] == [0, 1]
    with pytest.raises(ValueError, match="'synthetic_conditions' .*no dataframe"):
        T.task_dataset(T.load_task('synthetic_conditions'), str(data_root))
