"""Real dataset formats (docs/data.md, "Real formats"): writers -> readers round trips, image decoding, FOV crop,
and the errors every kind of bad input raises (retina_jax/data/{images,sources,export}.py)."""
import base64
import io
import json
import os
import pickle
import re
import struct
import zlib
from pathlib import Path

import grain
import lmdb
import numpy as np
import pytest
from PIL import Image, ImageFile

from retina_jax.data import export, knowledge
from retina_jax.data.images import DataError, decode_image, fov_box, fov_crop
from retina_jax.data.sources import (
    FORMATS, OOD_BANNED_CATEGORIES, CaptionCsvSource, FlairCsvSource, JsonlSource, VilrefLmdbSource, is_ood_banned,
    open_source,
)
from retina_jax.data.synthetic import MODALITIES, CorpusSpec, SyntheticFundus

SAMPLES = Path(__file__).parent / 'data' / 'fundus_samples'
LABELS = knowledge.FINDINGS
# (y, x) of the optic disc centre of each real photograph (the brightest 31x31 spot inside the FOV).
DISCS = {'normal_sample.png': (270, 395), 'sample_macular_hole.png': (353, 682), 'severe_nonprol_dr.jpg': (374, 736)}
GREY, RGBA = 5, 6   # positions of the real photographs stored as grey and RGBA files


def _rgb(name: str) -> np.ndarray:
    return np.asarray(Image.open(SAMPLES / name).convert('RGB'))


def _png(image: Image.Image | np.ndarray) -> bytes:
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format='PNG')
    return buffer.getvalue()


def _labels(names) -> np.ndarray:
    return np.array([name in names for name in LABELS], np.uint8)


class ListSource:
    """An in-memory source of ready examples (the schema the writers take)."""

    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return dict(self.examples[index])

    def __repr__(self):
        return f'ListSource({len(self.examples)})'


def _real_example(name, image, categories, modality='CFP'):
    return {'image': image, 'categories': categories, 'atributes': ['noisy'] if 'dr' in name else [],
            'report_en': f'Report of {name}.', 'report_zh': f'右眼：{name} 的报告。',
            'caption': f'Expert caption of {name}.', 'labels': _labels(categories), 'modality': modality}


def photograph_examples() -> list[dict]:
    """The three real photographs as RGB examples of the writers' schema (test_files trains on them)."""
    return [_real_example('normal_sample.png', _rgb('normal_sample.png'), ['normal']),
            _real_example('sample_macular_hole.png', _rgb('sample_macular_hole.png'), ['macular hole']),
            _real_example('severe_nonprol_dr.jpg', _rgb('severe_nonprol_dr.jpg'), ['diabetic retinopathy'])]


@pytest.fixture(scope='module')
def corpus():
    """4 synthetic examples (48 px, all modalities, expert captions) + the 3 real photographs: RGB, grey, RGBA."""
    synth = SyntheticFundus(CorpusSpec(seed=5, size=4, image_size=48, expert_fraction=1.0, modalities=MODALITIES))
    examples = [synth[i] for i in range(len(synth))]
    grey = Image.open(SAMPLES / 'sample_macular_hole.png').convert('L')
    rgb = _rgb('severe_nonprol_dr.jpg')
    alpha = np.tile(np.linspace(0, 255, rgb.shape[1]).astype(np.uint8), (rgb.shape[0], 1))
    rgba = Image.fromarray(np.dstack([rgb, alpha]), 'RGBA')
    examples += [
        _real_example('normal_sample.png', _rgb('normal_sample.png'), ['normal']),
        _real_example('sample_macular_hole.png', np.repeat(np.asarray(grey)[:, :, None], 3, axis=2), ['macular hole']),
        _real_example('severe_nonprol_dr.jpg', rgb, ['diabetic retinopathy', 'severe diabetic retinopathy',
                                                      'haemorrhage', 'hard exudate', 'cotton-wool spot']),
    ]
    # The expected decode of the grey / RGBA files is exactly the RGB arrays the writers write.
    return ListSource(examples), {GREY: _png(grey), RGBA: _png(rgba)}


def _kwargs(fmt, out, **extra):
    kwargs = {'label_names': LABELS, **extra}
    if fmt != 'vilref_lmdb':
        kwargs['image_root'] = out
    if fmt == 'flair_csv':
        kwargs.setdefault('ood_ban', False)
    return kwargs


def _store_image(fmt, out, position, data: bytes | None):
    """Replace (None: delete) the stored image of record `position` of a written dataset."""
    if fmt == 'vilref_lmdb':
        with lmdb.open(os.path.join(out, 'imgs')) as env, env.begin(write=True) as txn:
            if data is None:
                txn.delete(str(position).encode())
            else:
                txn.put(str(position).encode(), base64.urlsafe_b64encode(data))
        return f'imgs key {position}'
    path = _image_path(fmt, out, position)
    if data is None:
        os.remove(path)
    else:
        Path(path).write_bytes(data)
    return path


def _image_path(fmt, out, position):
    return os.path.join(out, 'images', f'{position:07d}.png')


def _write(fmt, source, out):
    return export.WRITERS[fmt](source, out)


def _expected(fmt, example):
    """The fields the format carries, as its reader returns them."""
    empty = {'categories': [], 'atributes': [], 'report_en': '', 'report_zh': '', 'caption': '',
             'labels': np.zeros(len(LABELS), np.uint8), 'modality': 'CFP'}
    if fmt == 'flair_csv':
        return {**empty, 'categories': example['categories'], 'atributes': example['atributes'],
                'labels': example['labels']}
    if fmt == 'mmretinal_csv':
        return {**empty, 'report_en': example['caption'], 'caption': example['caption'],
                'report_zh': example['report_zh'], 'modality': example['modality']}
    if fmt == 'vilref_lmdb':
        return {**empty, 'report_zh': example['report_zh'], 'labels': example['labels']}
    return {**empty, 'report_en': example['report_en'], 'caption': example['report_en'], 'labels': example['labels'],
            'categories': example['categories'], 'modality': example['modality']}


def _where(fmt, path, position):
    if fmt == 'vilref_lmdb':
        return f'{path}/pairs key {position}'
    if fmt == 'jsonl':
        return f'{path} line {position + 1}'
    return f'{path} row {position}'


@pytest.mark.parametrize('fmt', sorted(FORMATS))
def test_round_trip_synthetic_and_real_photographs(fmt, corpus, tmp_path):
    source, stored = corpus
    out = str(tmp_path / fmt)
    path = _write(fmt, source, out)
    for position, data in stored.items():
        _store_image(fmt, out, position, data)
    if fmt != 'vilref_lmdb':
        modes = [Image.open(_image_path(fmt, out, p)).mode for p in (4, GREY, RGBA)]
        assert modes == ['RGB', 'L', 'RGBA']
    read = open_source(fmt, path, **_kwargs(fmt, out))
    assert len(read) == len(source)
    for i in range(len(source)):
        example, original = read[i], source[i]
        assert example['index'] == i and example['where'] == _where(fmt, path, i)
        assert example['image'].dtype == np.uint8 and example['image'].shape == original['image'].shape
        np.testing.assert_array_equal(example['image'], original['image'])   # PNG: exact, alpha dropped, grey x3
        for key, value in _expected(fmt, original).items():
            if key == 'labels':
                assert example[key].dtype == np.uint8
                np.testing.assert_array_equal(example[key], value)
            else:
                assert example[key] == value, (fmt, i, key)
    assert {read[i]['modality'] for i in range(4)} <= set(MODALITIES)


@pytest.mark.parametrize('fmt', sorted(FORMATS))
def test_sources_pickle_and_work_in_grain(fmt, corpus, tmp_path):
    source, _ = corpus
    small = ListSource([source[i] for i in range(3)])
    out = str(tmp_path / fmt)
    read = open_source(fmt, _write(fmt, small, out), **_kwargs(fmt, out))
    first = read[1]   # opens the LMDB environments before pickling: they must not travel
    clone = pickle.loads(pickle.dumps(read))
    assert repr(clone) == repr(read)
    ds = grain.MapDataset.source(clone)
    assert len(ds) == 3
    np.testing.assert_array_equal(ds[1]['image'], first['image'])
    assert ds[1]['where'] == first['where']
    with pytest.raises(IndexError):
        read[3]


@pytest.mark.parametrize('fmt', sorted(FORMATS))
@pytest.mark.parametrize('damage', ['missing', 'truncated', 'undecodable'])
def test_bad_image_names_file_and_row(fmt, damage, corpus, tmp_path):
    source, _ = corpus
    small = ListSource([source[i] for i in (0, 1, 4)])
    out = str(tmp_path / fmt)
    path = _write(fmt, small, out)
    good = _png(source[4]['image'])
    data = {'missing': None, 'truncated': good[:len(good) // 2],
            'undecodable': np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()}[damage]
    image = _store_image(fmt, out, 2, data)
    read = open_source(fmt, path, **_kwargs(fmt, out))
    read[1]   # the other records still read
    with pytest.raises(DataError) as err:
        read[2]
    message = str(err.value)
    assert message.startswith(_where(fmt, path, 2) if fmt != 'vilref_lmdb' else f'{out}/imgs key 2 (pairs key 2)')
    assert image in message
    assert {'missing': 'not found' if fmt != 'vilref_lmdb' else 'image missing',
            'truncated': 'truncated', 'undecodable': 'cannot decode'}[damage] in message


def test_flair_csv_reads_flair_layout(tmp_path):
    # Lines in the form of FLAIR's local_data/dataframes (pandas index, quoted multi-element literals).
    Image.fromarray(_rgb('normal_sample.png')[:64, 200:264]).save(tmp_path / 'a.png')
    (tmp_path / '02_MESSIDOR.csv').write_text(
        ',image,atributes,categories\n'
        "0,a.png,['clean'],\"['no diabetic retinopathy', 'no diabetic macular edema']\"\n"
        "1,a.png,[],['diabetic macular edema']\n", encoding='utf-8')
    names = ['no diabetic retinopathy', 'no diabetic macular edema', 'diabetic macular edema']
    read = FlairCsvSource(tmp_path / '02_MESSIDOR.csv', tmp_path, ood_ban=False, vocabulary=names, label_names=names)
    assert [read[i]['categories'] for i in range(2)] == [names[:2], names[2:]]
    assert read[0]['atributes'] == ['clean'] and read[1]['atributes'] == []
    np.testing.assert_array_equal(read[0]['labels'], [1, 1, 0])
    assert read[0]['image'].shape == (64, 64, 3)
    with pytest.raises(DataError, match=r"02_MESSIDOR.csv row 0: unknown category \['no diabetic macular edema'\]"):
        FlairCsvSource(tmp_path / '02_MESSIDOR.csv', tmp_path, ood_ban=False)   # not in the default vocabulary


def test_flair_ood_ban_drops_flairs_banned_categories(tmp_path):
    synth = SyntheticFundus(CorpusSpec(seed=2, size=24, image_size=32))
    path = export.write_flair_csv(synth, str(tmp_path))
    banned = [i for i in range(len(synth)) if is_ood_banned(synth.record(i)['categories'])]
    assert 0 < len(banned) < len(synth)
    read = FlairCsvSource(path, tmp_path)
    assert read.banned == len(banned) and len(read) == len(synth) - len(banned)
    kept = [i for i in range(len(synth)) if i not in banned]
    assert [read[k]['categories'] for k in range(len(read))] == [synth.record(i)['categories'] for i in kept]
    assert len(FlairCsvSource(path, tmp_path, ood_ban=False)) == len(synth)
    # FLAIR's rule is a substring test: every banned word hides any category containing it.
    assert 'myop' in OOD_BANNED_CATEGORIES
    assert is_ood_banned(['no cataract']) and is_ood_banned(['pathologic myopia']) and not is_ood_banned(['glaucoma'])


@pytest.mark.parametrize('lines, message', [
    ([',image,atributes,categories', "0,a.png,[],\"['normal', 'unicorn disease']\""], r"row 0: unknown category \['unicorn"),
    ([',image,atributes,categories', "0,a.png,[],['normal', 'unicorn disease']"], r'row 0: 5 cells where the header has 4'),
    ([',image,atributes,categories', "0,a.png,[],['normal']", "1,a.png,[],\"['normal'\""], r'row 1: column .categories.: '
                                                                                          r".*not a Python literal"),
    ([',image,atributes,categories', "0,a.png,[],'normal'"], r"row 0: column 'categories': expected a list of strings"),
    ([',image,atributes,categories', "0,a.png,[],[1]"], r"row 0: column 'categories': expected a list of strings"),
    ([',image,atributes', "0,a.png,[]"], r"header: missing column 'categories'"),
    ([',image,atributes,categories', "0,a.png,[]"], r'row 0: 3 cells where the header has 4'),
    ([',image,atributes,categories', "0,,[],['normal']"], r'row 0: empty image path'),
    ([',image,atributes,categories', "0,a.png,[],[]"], r'row 0: no category'),
    ([',image,atributes,categories', "0,a.png,[],['normal']", '', "1,a.png,[],[]"], r'row 1: no category'),  # blank line
])
def test_flair_csv_bad_rows_name_csv_and_row(lines, message, tmp_path):
    path = tmp_path / 'bad.csv'
    path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    with pytest.raises(DataError, match=message) as err:
        FlairCsvSource(path, tmp_path, ood_ban=False)
    assert str(err.value).startswith(str(path))
    if 'header:' in message:  # a bad header is an error in both modes
        with pytest.raises(DataError, match=message):
            FlairCsvSource(path, tmp_path, ood_ban=False, on_error='skip')
        return
    # on_error='skip': the bad row is dropped with its message, the good rows stay.
    read = FlairCsvSource(path, tmp_path, ood_ban=False, on_error='skip')
    assert len(read.bad_rows) == 1 and re.search(message, read.bad_rows[0])
    assert read.bad_rows[0].startswith(str(path))
    assert len(read) == sum(1 for line in lines[1:] if line) - 1


def test_row_sources_refuse_an_unknown_on_error(tmp_path):
    (tmp_path / 'a.csv').write_text(',image,atributes,categories\n0,a.png,[],[\'normal\']\n')
    with pytest.raises(ValueError, match=r"on_error must be one of \('raise', 'skip'\), got 'ignore'"):
        FlairCsvSource(tmp_path / 'a.csv', tmp_path, on_error='ignore')


def test_mmretinal_csv_accepts_collection_columns_and_folder_modality(tmp_path):
    for folder in ('CFP', 'FFA'):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.full((8, 10, 3), 90, np.uint8)).save(tmp_path / folder / 'figure01-01A.jpg')
    # MM-Retinal's collection CSVs: Image_ID, cn_caption, en_caption, is_multipic; 'nan' marks a missing caption.
    (tmp_path / 'pairs.csv').write_text(
        'Image_ID,cn_caption,en_caption,is_multipic\n'
        'CFP/figure01-01A.jpg,正常人右眼眼底彩色像,Color image of the fundus of the right eye in a normal person,\n'
        'FFA/figure01-01A.jpg,nan,Late FFA image of the left eye,Y\n', encoding='utf-8-sig')   # with a byte-order mark
    read = CaptionCsvSource(tmp_path / 'pairs.csv', tmp_path)
    assert [read[i]['modality'] for i in range(2)] == ['CFP', 'FFA']
    assert read[0]['report_zh'] == '正常人右眼眼底彩色像' and read[1]['report_zh'] == ''
    assert read[1]['caption'] == read[1]['report_en'] == 'Late FFA image of the left eye'
    assert read[0]['image'].shape == (8, 10, 3) and read[0]['labels'].sum() == 0
    for caption in ('', 'nan'):
        (tmp_path / 'empty.csv').write_text(f',image,caption\n0,CFP/figure01-01A.jpg,ok\n1,CFP/figure01-01A.jpg,{caption}\n')
        with pytest.raises(DataError, match=r"empty.csv row 1: empty caption \(column 'caption'\)"):
            CaptionCsvSource(tmp_path / 'empty.csv', tmp_path)
        skipping = CaptionCsvSource(tmp_path / 'empty.csv', tmp_path, on_error='skip')
        assert len(skipping) == 1 and skipping[0]['caption'] == 'ok'
        assert len(skipping.bad_rows) == 1 and re.search(r"empty.csv row 1: empty caption", skipping.bad_rows[0])
    (tmp_path / 'modality.csv').write_text(',image,caption,modality\n0,CFP/figure01-01A.jpg,ok,MRI\n')
    with pytest.raises(DataError, match=r"modality.csv row 0: modality 'MRI'"):
        CaptionCsvSource(tmp_path / 'modality.csv', tmp_path)
    (tmp_path / 'gbk.csv').write_bytes(',image,caption,cn_caption\n0,CFP/figure01-01A.jpg,ok,正常\n'.encode('gbk'))
    with pytest.raises(DataError, match=r'gbk.csv: not UTF-8 text'):
        CaptionCsvSource(tmp_path / 'gbk.csv', tmp_path)


def _lmdb_pairs(tmp_path, pairs):
    """A ViLReF LMDB split with the given pickled pairs and one image (id 7)."""
    out = tmp_path / 'lmdb'
    for name in ('pairs', 'imgs'):
        (out / name).mkdir(parents=True)
    with lmdb.open(str(out / 'pairs')) as env, env.begin(write=True) as txn:
        for i, pair in enumerate(pairs):
            txn.put(str(i).encode(), pickle.dumps(pair))
        txn.put(b'num_samples', str(len(pairs)).encode())
    with lmdb.open(str(out / 'imgs')) as env, env.begin(write=True) as txn:
        txn.put(b'7', base64.urlsafe_b64encode(_png(np.full((6, 6, 3), 40, np.uint8))))
        txn.put(b'num_images', b'1')
    return str(out)


def test_vilref_lmdb_labels_and_bad_records_name_the_key(tmp_path):
    names = ('normal', 'haemorrhage', 'drusen')
    out = _lmdb_pairs(tmp_path, [
        (7, 0, '右眼：正常', [1, 0, 0]),              # ViLReF: multi-hot list
        (7, 1, '右眼：出血', ['haemorrhage', 'drusen']),
        (7, 2, '右眼：玻璃膜疣', 2),                   # a class index
        (7, 3, '右眼：x', ['unicorn']),
        (7, 4, '右眼：x', [1, 0]),                    # multi-hot of the wrong length
        (7, 5, '右眼：x', 3),
        (7, 6, '   ', [1, 0, 0]),                    # empty report
        (8, 7, '右眼：x', [1, 0, 0]),                 # image id not in imgs
        (7, 8, '右眼：x'),                            # Chinese-CLIP's 3-tuple: no label
    ])
    read = VilrefLmdbSource(out, names)
    assert len(read) == 9 and read.num_images == 1
    np.testing.assert_array_equal(read[0]['labels'], [1, 0, 0])
    np.testing.assert_array_equal(read[1]['labels'], [0, 1, 1])
    np.testing.assert_array_equal(read[2]['labels'], [0, 0, 1])
    assert read[0]['report_zh'] == '右眼：正常' and read[0]['image'].shape == (6, 6, 3)
    for key, message in [(3, r"label 'unicorn' is outside the label set"), (4, r'multi-hot label .* outside the label set'),
                         (5, r'label index 3 is outside the label set'), (6, r'empty report'),
                         (7, r'imgs key 8 \(pairs key 7\): image missing'), (8, r"expected ViLReF's \(image_id")]:
        with pytest.raises(DataError, match=message) as err:
            read[key]
        assert str(err.value).startswith(f'{out}/pairs key {key}' if key != 7 else f'{out}/imgs key 8')


def test_vilref_lmdb_needs_its_count_keys(tmp_path):
    out = _lmdb_pairs(tmp_path, [])
    with lmdb.open(os.path.join(out, 'pairs')) as env, env.begin(write=True) as txn:
        txn.delete(b'num_samples')
    with pytest.raises(DataError, match=r"pairs key 'num_samples': missing"):
        VilrefLmdbSource(out, LABELS)
    with pytest.raises(DataError, match=r'nowhere/pairs: LMDB directory not found'):
        VilrefLmdbSource(str(tmp_path / 'nowhere'), LABELS)


def test_jsonl_language_labels_and_bad_lines(tmp_path):
    Image.fromarray(np.full((5, 7, 3), 200, np.uint8)).save(tmp_path / 'x.png')
    good = [{'image': 'x.png', 'text': '左眼：出血', 'language': 'zh', 'labels': ['haemorrhage'], 'modality': 'FFA',
             'eye': 'OS'},
            {'image': 'x.png', 'text': 'Drusen at the macula.', 'categories': ['age-related macular degeneration']}]
    path = tmp_path / 'data.jsonl'
    path.write_text(json.dumps(good[0], ensure_ascii=False) + '\n\n' + json.dumps(good[1]) + '\n', encoding='utf-8')
    read = JsonlSource(path, tmp_path, LABELS)
    assert len(read) == 2   # the blank line is skipped, line numbers stay the file's
    assert read[0]['report_zh'] == read[0]['caption'] == '左眼：出血' and read[0]['report_en'] == ''
    assert read[0]['modality'] == 'FFA' and read[0]['labels'][LABELS.index('haemorrhage')] == 1
    assert read[1]['report_en'] == 'Drusen at the macula.' and read[1]['where'] == f'{path} line 3'
    assert read[1]['categories'] == ['age-related macular degeneration'] and read[1]['labels'].sum() == 0
    assert read[0]['eye'] == 'left' and read[1]['eye'] == ''   # OD/OS read as right/left; none given: ''
    for line, message in [('{"image": "x.png", "text": "ok"', r'line 2: bad JSON'),
                          ('{"image": "x.png", "text": "ok", "labels": ["unicorn"]}', r"line 2: label 'unicorn' is outside"),
                          ('{"image": "x.png", "text": " "}', r'line 2: empty report'),
                          ('{"image": "x.png", "text": "ok", "language": "fr"}', r'line 2: "language"'),
                          ('{"image": "x.png", "text": "ok", "eye": "both"}', r'line 2: "eye" .both. is not one of'),
                          ('["x.png", "ok"]', r'line 2: expected a JSON object')]:
        path.write_text(json.dumps(good[1]) + '\n' + line + '\n', encoding='utf-8')
        with pytest.raises(DataError, match=message) as err:
            JsonlSource(path, tmp_path, LABELS)
        assert str(err.value).startswith(f'{path} line 2')
        skipping = JsonlSource(path, tmp_path, LABELS, on_error='skip')
        assert len(skipping) == 1 and skipping[0]['where'] == f'{path} line 1'
        assert len(skipping.bad_rows) == 1 and re.search(message, skipping.bad_rows[0])
    path.write_bytes(json.dumps(good[1]).encode() + b'\n' + '{"image": "x.png", "text": "左眼"}'.encode('gbk') + b'\n')
    with pytest.raises(DataError, match=r'line 2: not UTF-8 text'):
        JsonlSource(path, tmp_path, LABELS)
    assert len(JsonlSource(path, tmp_path, LABELS, on_error='skip').bad_rows) == 1


def test_open_source_unknown_format_lists_the_allowed_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset format 'tfrecord'; allowed: \['flair_csv', 'jsonl', "
                                         r"'mmretinal_csv', 'vilref_lmdb'\]"):
        open_source('tfrecord', str(tmp_path))


def test_writers_refuse_examples_the_format_cannot_hold(corpus, tmp_path):
    source, _ = corpus
    no_caption = ListSource([{**source[0], 'caption': ''}])
    with pytest.raises(DataError, match=r'ListSource\(1\) index 0: empty caption'):
        export.write_mmretinal_csv(no_caption, str(tmp_path / 'mm'))
    with pytest.raises(DataError, match=r'index 0: empty report_zh'):
        export.write_vilref_lmdb(ListSource([{**source[0], 'report_zh': ' '}]), str(tmp_path / 'lmdb'))


def test_vilref_lmdb_writer_overwrites_an_existing_split(corpus, tmp_path):
    source, _ = corpus
    out = str(tmp_path / 'lmdb')
    export.write_vilref_lmdb(source, out, [0, 1, 2])
    export.write_vilref_lmdb(source, out, [3])
    read = VilrefLmdbSource(out, LABELS)
    assert len(read) == read.num_images == 1
    np.testing.assert_array_equal(read[0]['image'], source[3]['image'])
    with lmdb.open(os.path.join(out, 'pairs'), readonly=True, lock=False) as env, env.begin() as txn:
        assert txn.get(b'2') is None and pickle.loads(txn.get(b'0'))[2] == source[3]['report_zh']


def test_jpeg_option_writes_jpeg_files(corpus, tmp_path):
    source, _ = corpus
    small = ListSource([source[4]])
    path = export.write_flair_csv(small, str(tmp_path), image_format='jpeg')
    image = tmp_path / 'images' / '0000000.jpg'
    assert image.read_bytes()[:2] == b'\xff\xd8'
    decoded = FlairCsvSource(path, tmp_path, ood_ban=False)[0]['image']
    assert decoded.shape == source[4]['image'].shape
    assert np.abs(decoded.astype(int) - source[4]['image']).mean() < 3   # quality 95


@pytest.mark.parametrize('fmt', sorted(FORMATS))
def test_export_cli_writes_the_synthetic_corpus(fmt, tmp_path, capsys):
    out = str(tmp_path / fmt)
    path = export.main(['--format', fmt, '--out', out, '--size', '3', '--seed', '4', '--image_size', '32'])
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith(f'export: wrote 3 synthetic examples (32px, png) as {fmt} to {path}')
    read = open_source(fmt, path, **_kwargs(fmt, out))
    synth = SyntheticFundus(CorpusSpec(seed=4, size=3, image_size=32, **({'expert_fraction': 1.0} if fmt == 'mmretinal_csv'
                                                                             else {})))
    assert len(read) == 3
    np.testing.assert_array_equal(read[2]['image'], synth[2]['image'])
    for key, value in _expected(fmt, synth.record(2)).items():
        np.testing.assert_array_equal(read[2][key], value)


# ------------------------------------------------------------------------------------------------
# decoding

def test_decode_image_modes():
    rgb = _rgb('normal_sample.png')[100:164, 100:180]
    grey = Image.fromarray(rgb).convert('L')
    expected_grey = np.repeat(np.asarray(grey)[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(decode_image(_png(grey), 'w'), expected_grey)
    np.testing.assert_array_equal(decode_image(_png(Image.fromarray(rgb).convert('RGBA')), 'w'), rgb)
    la = Image.merge('LA', [grey, Image.new('L', grey.size, 7)])
    np.testing.assert_array_equal(decode_image(_png(la), 'w'), expected_grey)
    palette = Image.fromarray(rgb).quantize(16)
    np.testing.assert_array_equal(decode_image(_png(palette), 'w'), np.asarray(palette.convert('RGB')))
    sixteen = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)
    assert sixteen.mode == 'I;16'
    np.testing.assert_array_equal(decode_image(_png(sixteen), 'w'), expected_grey)   # scaled, not clipped to white
    jpeg = decode_image(SAMPLES / 'severe_nonprol_dr.jpg', 'w')
    assert jpeg.shape == (683, 1024, 3) and jpeg.dtype == np.uint8


def _jpeg(image, **options) -> bytes:
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format='JPEG', **options)
    return buffer.getvalue()


def _pil_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert('RGB'))


def test_jpegs_decode_to_pils_pixels_through_libjpeg_turbo(monkeypatch):
    import simplejpeg
    calls = []
    decode = simplejpeg.decode_jpeg
    monkeypatch.setattr(simplejpeg, 'decode_jpeg', lambda data, **kw: calls.append(kw) or decode(data, **kw))
    rgb = _rgb('normal_sample.png')[80:230, 60:270]
    cases = {'4:2:0': _jpeg(rgb, quality=90), '4:4:4': _jpeg(rgb, quality=95, subsampling=0),
             'progressive': _jpeg(rgb, quality=85, progressive=True), 'grey': _jpeg(Image.fromarray(rgb).convert('L')),
             'a real photograph': (SAMPLES / 'severe_nonprol_dr.jpg').read_bytes()}
    for name, data in cases.items():
        np.testing.assert_array_equal(decode_image(data, name), _pil_decode(data), err_msg=name)
    assert len(calls) == len(cases) and all(c == {'colorspace': 'RGB', 'strict': False} for c in calls)
    cmyk = _jpeg(Image.fromarray(rgb).convert('CMYK'))
    np.testing.assert_array_equal(decode_image(cmyk, 'cmyk'), _pil_decode(cmyk))  # PIL's Adobe inversion
    assert len(calls) == len(cases)
    # Recoverable damage in a complete file (bytes before the end marker): libjpeg warns, PIL decodes,
    # and so does the strict-only-when-cut-off turbo path, to the same pixels.
    damaged = cases['4:2:0'][:-2] + b'\x00\x01\x02' + b'\xff\xd9'
    np.testing.assert_array_equal(decode_image(damaged, 'damaged'), _pil_decode(damaged))
    with pytest.raises(ValueError):
        decode(damaged, colorspace='RGB', strict=True)  # the warning the non-strict decode passed over


def test_decode_image_bad_inputs_name_where(tmp_path):
    jpeg = (SAMPLES / 'severe_nonprol_dr.jpg').read_bytes()
    (tmp_path / 'half.jpg').write_bytes(jpeg[:len(jpeg) // 2])
    with pytest.raises(DataError, match=r'^train.csv row 3: .*half.jpg: cannot decode image .*truncated'):
        decode_image(tmp_path / 'half.jpg', 'train.csv row 3')
    with pytest.raises(DataError, match=r'^k 9: cannot decode image'):
        decode_image(b'\x89PNG\r\n\x1a\n' + bytes(100), 'k 9')
    with pytest.raises(DataError, match=r'^r 1: .*gone.png: image file not found'):
        decode_image(tmp_path / 'gone.png', 'r 1')
    one = bytearray(_png(np.zeros((1, 1, 3), np.uint8)))
    one[16:20] = struct.pack('>I', 0)   # IHDR width 0, with a valid CRC
    one[29:33] = struct.pack('>I', zlib.crc32(bytes(one[12:29])))
    with pytest.raises(DataError, match=r'^line 4: cannot decode image'):
        decode_image(bytes(one), 'line 4')
    with pytest.raises(DataError, match=r"unsupported image mode 'F'"):
        decode_image(_tiff_float(), 'w')


def _tiff_float() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ones((4, 4), np.float32)).save(buffer, format='TIFF')
    return buffer.getvalue()


def test_decode_image_refuses_to_run_with_truncated_loading_enabled(monkeypatch):
    monkeypatch.setattr(ImageFile, 'LOAD_TRUNCATED_IMAGES', True)
    with pytest.raises(RuntimeError, match='LOAD_TRUNCATED_IMAGES'):
        decode_image(_png(np.zeros((2, 2, 3), np.uint8)), 'w')


# ------------------------------------------------------------------------------------------------
# field-of-view crop

@pytest.mark.parametrize('name', sorted(DISCS))
def test_fov_crop_on_real_photographs(name):
    image = decode_image(SAMPLES / name, name)
    top, bottom, left, right = fov_box(image)
    crop = fov_crop(image)
    np.testing.assert_array_equal(crop, image[top:bottom, left:right])
    y, x = DISCS[name]
    assert top + 40 <= y < bottom - 40 and left + 40 <= x < right - 40   # the whole disc stays in
    if name == 'normal_sample.png':
        # The FOV circle touches all four sides: nothing to remove; framed in black, the frame goes exactly.
        assert crop.shape == image.shape
        np.testing.assert_array_equal(fov_crop(np.pad(image, ((30, 50), (70, 10), (0, 0)))), image)
    else:
        assert crop.shape[0] * crop.shape[1] < 0.9 * image.shape[0] * image.shape[1]
    edges = [crop[:, :3], crop[:, -3:]] if name == 'severe_nonprol_dr.jpg' else [crop[:3], crop[-3:], crop[:, :3],
                                                                                  crop[:, -3:]]
    surround = 'white' if name == 'sample_macular_hole.png' else 'black'
    # Each cropped side touches the FOV: some of its pixels are retina, not surround.
    for edge in edges:
        retina = edge.min(-1) < 235 if surround == 'white' else edge[..., 0] > 20
        assert retina.any()


def test_fov_crop_keeps_images_without_a_field_of_view():
    black = np.zeros((40, 50, 3), np.uint8)
    assert fov_crop(black) is black
    speck = black.copy()
    speck[10, 10] = 255     # one bright pixel is not a FOV (under min_area)
    assert fov_crop(speck) is speck
    texture = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    assert fov_crop(texture) is texture     # no uniform surround
    disc = np.zeros((60, 80, 3), np.uint8)
    disc[10:50, 20:60] = (180, 90, 40)
    assert fov_box(disc) == (10, 50, 20, 60) and fov_box(disc, margin=15) == (0, 60, 5, 75)
