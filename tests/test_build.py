"""TFDS ArrayRecord builds (retina_jax.data.build): round trip, random access, shards, splits, grain,
summary, bad input and the CLI."""
from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import subprocess
import sys

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from retina_jax.data import export, sources
from retina_jax.data.build import DATASET_NAME, ArrayRecordSource, build, main, open_input
from retina_jax.data.images import DataError, decode_image
from retina_jax.data.knowledge import FINDINGS
from retina_jax.data.synthetic import CorpusSpec, SyntheticFundus

SAMPLES = os.path.join(os.path.dirname(__file__), 'data', 'fundus_samples')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def corpus(size=12, seed=3) -> SyntheticFundus:
    # All three modalities, so FFA/OCT images and captions go through the round trip too.
    return SyntheticFundus(CorpusSpec(seed=seed, size=size, image_size=32, modalities=('CFP', 'FFA', 'OCT'),
                                      expert_fraction=0.5, attribute_prob=0.5))


def assert_same_example(original: dict, read: dict):
    """Every field of the source example comes back with its value and its Python type."""
    for k, v in original.items():
        w = read[k]
        if isinstance(v, np.ndarray):
            assert w.dtype == v.dtype and np.array_equal(w, v), k
        else:
            assert type(w) is type(v) and w == v, (k, v, w)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    """The synthetic corpus as split 'train' of a dataset in tfds's data_dir/name/version layout."""
    data_dir = tmp_path_factory.mktemp('tfds')
    out = data_dir / DATASET_NAME / '1.0.0'
    source = corpus()
    summary = build(source, out, num_shards=3, progress=False)
    return source, out, data_dir, summary


def test_round_trip_every_field_in_random_order(built):
    source, out, _, _ = built
    read = ArrayRecordSource(out, 'train')
    assert len(read) == len(source) and read.label_names == FINDINGS
    order = np.random.default_rng(0).permutation(len(source))
    for i in order:
        example = read[int(i)]
        assert_same_example(source[int(i)], example)
        assert example['where'] == f'{out} train[{i}]'      # the synthetic source has no file and row
    assert {source[i]['modality'] for i in range(len(source))} == {'CFP', 'FFA', 'OCT'}
    with pytest.raises(IndexError):
        read[len(source)]


def test_tfds_reads_the_dataset(built):
    source, out, data_dir, _ = built
    builder = tfds.builder_from_directory(out)
    assert builder.info.splits['train'].shard_lengths == [4, 4, 4]
    assert len([f for f in os.listdir(out) if f.startswith(f'{DATASET_NAME}-train.array_record-')]) == 3
    assert builder.info.metadata['label_names'] == list(FINDINGS)
    by_name = tfds.data_source(DATASET_NAME, data_dir=data_dir, split='train')
    for ds in (builder.as_data_source('train'), by_name):
        assert len(ds) == len(source)
        for i in (0, 7, 11):
            r, x = ds[i], source[i]
            assert np.array_equal(r['image'], x['image'])           # PNG: bit-identical pixels
            assert r['report_zh'].decode() == x['report_zh'] and r['index'] == i
            assert np.array_equal(r['labels'], x['labels'])
    # tfds split slicing passes through
    head = ArrayRecordSource(out, 'train[:5]')
    assert len(head) == 5 and head[4]['index'] == 4


def test_grain_map_dataset_and_pickle(built):
    source, out, _, _ = built
    read = ArrayRecordSource(out, 'train')
    read[0]
    assert len(pickle.dumps(read)) < 1000              # path and split travel; tfds's opened source (~6 kB) does not
    ds = grain.MapDataset.source(pickle.loads(pickle.dumps(read))).shuffle(seed=1)
    ds = pickle.loads(pickle.dumps(ds))
    seen = [ds[i]['index'] for i in range(len(ds))]
    assert sorted(seen) == list(range(len(source))) and seen != sorted(seen)
    assert np.array_equal(ds[0]['image'], source[seen[0]]['image'])
    batches = list(ds.batch(4, batch_fn=lambda xs: np.stack([x['labels'] for x in xs])))
    assert [b.shape for b in batches] == [(4, len(FINDINGS))] * 3


def test_summary_counts(built):
    source, out, _, summary = built
    records = [source.record(i) for i in range(len(source))]
    assert summary['examples'] == len(source) and summary['skipped'] == 0 and summary['shards'] == 3
    assert summary['categories'] == dict(collections.Counter(c for r in records for c in r['categories']))
    assert summary['modalities'] == dict(collections.Counter(r['modality'] for r in records))
    assert summary['labels'] == dict(zip(FINDINGS, np.sum([r['labels'] for r in records], 0).tolist()))
    shards = [f for f in os.listdir(out) if f.startswith(f'{DATASET_NAME}-train.')]
    assert summary['bytes'] == sum(os.path.getsize(out / f) for f in shards) > 0
    assert summary['dropped_fields'] == [] and summary['originals'] == 0
    with open(out / 'summary-train.json', encoding='utf-8') as f:
        assert json.load(f) == summary


class FlakySource:
    """A synthetic corpus whose examples at ``bad`` raise DataError, as a real source does for a bad row."""

    def __init__(self, size: int, bad: set[int], corrupt=None):
        self.corpus, self.bad, self.corrupt = corpus(size), bad, corrupt

    def __len__(self):
        return len(self.corpus)

    def __getitem__(self, i):
        if i in self.bad and self.corrupt is None:
            raise DataError(f'flaky.csv row {i + 2}: image file not found')
        example = self.corpus[i]
        if i in self.bad:
            example.update(self.corrupt)
        return example


def test_on_error_skip_counts_and_skips(tmp_path):
    source = FlakySource(8, {1, 4, 5})
    summary = build(source, tmp_path, on_error='skip', progress=False)
    assert summary['examples'] == 5 and summary['skipped'] == 3
    assert summary['skipped_messages'] == [f'flaky.csv row {i + 2}: image file not found' for i in (1, 4, 5)]
    read = ArrayRecordSource(tmp_path, 'train')
    assert [read[i]['index'] for i in range(len(read))] == [0, 2, 3, 6, 7]
    assert_same_example(source[6], read[3])


def test_fields_outside_the_schema_are_reported_not_stored(tmp_path):
    source = FlakySource(3, {1}, {'grader': 'A', 'mask': np.zeros((32, 32), bool)})
    summary = build(source, tmp_path, progress=False)
    assert summary['dropped_fields'] == ['grader', 'mask'] and summary['examples'] == 3
    assert 'grader' not in ArrayRecordSource(tmp_path, 'train')[1]


def test_on_error_raise_names_the_example_and_leaves_no_dataset(tmp_path):
    with pytest.raises(DataError, match=r'^flaky\.csv row 6: image file not found$'):
        build(FlakySource(8, {4}), tmp_path, progress=False)
    assert os.listdir(tmp_path) == []               # neither a dataset nor the builder's scratch directory


def test_on_error_skip_of_everything_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"split 'train': 0 examples left after skipping 3"):
        build(FlakySource(3, {0, 1, 2}), tmp_path, on_error='skip', progress=False)


@pytest.mark.parametrize('corrupt, message', [
    ({'labels': np.ones(3, np.uint8)}, r'field labels must be 17 values in \{0, 1\}'),
    ({'labels': np.full(len(FINDINGS), 2, np.uint8)}, r'field labels must be 17 values in \{0, 1\}'),
    ({'image': np.zeros((8, 8), np.uint8)}, r'field image must be uint8 \[H, W, 3\]'),
    ({'image': np.zeros((8, 8, 3), np.float32)}, r'field image must be uint8 \[H, W, 3\]'),
    ({'modality': 'MRI'}, r'field modality must be one of'),
    ({'categories': 'glaucoma'}, r"field 'categories' must be a list of strings"),
    ({'report_en': None}, r"field 'report_en' must be a string"),
    ({'dr_grade': 1.5}, r"field 'dr_grade' must be int"),
])
def test_bad_fields_are_data_errors_naming_the_example(tmp_path, corrupt, message):
    source = FlakySource(4, {2}, corrupt)
    with pytest.raises(DataError, match=r'^FlakySource\[2\]: ' + message):
        build(source, tmp_path / 'raise', progress=False)
    named = FlakySource(4, {2}, {**corrupt, 'where': 'reports.jsonl line 3'})
    summary = build(named, tmp_path / 'skip', on_error='skip', progress=False)
    assert summary['skipped'] == 1 and summary['skipped_messages'][0].startswith('reports.jsonl line 3: ')


def test_splits_share_a_dataset_dir(tmp_path):
    train, test = corpus(6, seed=1), corpus(4, seed=2)
    build(train, tmp_path, split='train', num_shards=2, progress=False)
    build(test, tmp_path, split='test', progress=False)
    assert tfds.builder_from_directory(tmp_path).info.splits['test'].num_examples == 4
    for split, source in (('train', train), ('test', test)):
        read = ArrayRecordSource(tmp_path, split)
        assert len(read) == len(source)
        assert_same_example(source[len(source) - 1], read[len(source) - 1])
    with pytest.raises(ValueError, match="split 'test' exists"):
        build(test, tmp_path, split='test', progress=False)
    with pytest.raises(ValueError, match='other features'):
        build(test, tmp_path, split='val', image_format='jpeg', progress=False)
    with pytest.raises(ValueError, match='label_names'):
        build(test, tmp_path, split='val', label_names=[f'c{i}' for i in range(len(FINDINGS))], progress=False)
    for bad in ('all', 'train[:2]', ''):
        with pytest.raises(ValueError, match='split must be letters, digits and underscores'):
            build(test, tmp_path, split=bad, progress=False)
    rebuilt = corpus(3, seed=5)
    build(rebuilt, tmp_path, split='test', overwrite=True, progress=False)
    read = ArrayRecordSource(tmp_path, 'test')
    assert len(read) == 3 and np.array_equal(read[2]['image'], rebuilt[2]['image'])
    assert len(ArrayRecordSource(tmp_path, 'train')) == 6
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith(DATASET_NAME)) == [
        f'{DATASET_NAME}-test.array_record-00000-of-00001', f'{DATASET_NAME}-train.array_record-00000-of-00002',
        f'{DATASET_NAME}-train.array_record-00001-of-00002']


def _grey_jpeg(path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert('L').save(buf, format='JPEG', quality=90)
    return buf.getvalue()


class FileSource:
    """Real photographs given as file bytes; `encoded_image` hands the builder the originals."""

    def __init__(self, blobs: list[bytes]):
        self.blobs = blobs

    def __len__(self):
        return len(self.blobs)

    def encoded_image(self, i: int) -> bytes:
        return self.blobs[i]

    def __getitem__(self, i: int) -> dict:
        where = f'photos.csv row {i + 2}'
        return {'index': i, 'image': decode_image(self.blobs[i], where), 'where': where,
                'report_en': 'fundus photograph', 'categories': ['normal']}


def _raw_images(path, split: str) -> list[bytes]:
    ds = tfds.builder_from_directory(path).as_data_source(split, decoders={'image': tfds.decode.SkipDecoding()})
    return [ds[i]['image'] for i in range(len(ds))]


def test_original_image_bytes_are_kept_not_reencoded(tmp_path):
    with open(os.path.join(SAMPLES, 'severe_nonprol_dr.jpg'), 'rb') as f:
        jpeg = f.read()
    with open(os.path.join(SAMPLES, 'normal_sample.png'), 'rb') as f:
        png = f.read()
    grey = _grey_jpeg(os.path.join(SAMPLES, 'severe_nonprol_dr.jpg'))
    source = FileSource([jpeg, png, grey])
    summary = build(source, tmp_path / 'png', progress=False)
    stored = _raw_images(tmp_path / 'png', 'train')
    # RGB originals are stored byte for byte; the grey JPEG would decode to one channel in tfds, so its
    # three-channel pixels are stored as lossless PNG (not a second JPEG).
    assert stored[0] == jpeg and stored[1] == png and summary['originals'] == 2
    assert Image.open(io.BytesIO(stored[2])).format == 'PNG'
    read = ArrayRecordSource(tmp_path / 'png', 'train')
    for i in range(3):
        assert_same_example(source[i], read[i])
    assert read[1]['where'] == 'photos.csv row 3'

    # A JPEG build keeps the JPEG original and encodes the PNG one as JPEG (its first lossy step).
    summary = build(source, tmp_path / 'jpeg', image_format='jpeg', progress=False)
    stored = _raw_images(tmp_path / 'jpeg', 'train')
    assert stored[0] == jpeg and summary['originals'] == 1
    assert Image.open(io.BytesIO(stored[1])).format == 'JPEG'
    read = ArrayRecordSource(tmp_path / 'jpeg', 'train')
    assert read[1]['image'].shape == source[1]['image'].shape
    assert np.abs(read[1]['image'].astype(int) - source[1]['image']).mean() < 3


def test_jpeg_build_of_pixels(tmp_path):
    source = corpus(4)
    build(source, tmp_path, image_format='jpeg', progress=False)
    assert all(Image.open(io.BytesIO(b)).format == 'JPEG' for b in _raw_images(tmp_path, 'train'))
    read = ArrayRecordSource(tmp_path, 'train')
    for i in range(len(source)):
        a, b = read[i]['image'].astype(int), source[i]['image']
        assert a.shape == b.shape and 0 < np.abs(a - b).mean() < 8
        assert read[i]['report_en'] == source[i]['report_en']


def test_cli_builds_synthetic_corpus(tmp_path):
    out = tmp_path / 'ds'
    cmd = [sys.executable, '-m', 'retina_jax.data.build', '--format', 'synthetic', '--size', '6', '--seed', '4',
           '--image_size', '32', '--out', str(out), '--split', 'val', '--num_shards', '2']
    env = {**os.environ, 'PYTHONPATH': ROOT + os.pathsep + os.environ.get('PYTHONPATH', '')}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert 'val: 6 examples, 0 skipped' in done.stdout and str(out) in done.stdout
    assert 'build val' in done.stderr                       # the progress bar
    with open(out / 'summary-val.json', encoding='utf-8') as f:
        summary = json.load(f)
    assert summary['format'] == 'synthetic' and summary['shards'] == 2 and summary['examples'] == 6
    source = SyntheticFundus(CorpusSpec(seed=4, size=6, image_size=32))
    read = ArrayRecordSource(out, 'val')
    assert_same_example(source[5], read[5])


@pytest.mark.parametrize('fmt', sorted(sources.FORMATS))
def test_every_dataset_format_round_trips_through_the_cli(tmp_path, capsys, fmt):
    corpus_ = SyntheticFundus(CorpusSpec(seed=7, size=8, image_size=32, modalities=('CFP', 'FFA', 'OCT'),
                                         expert_fraction=1.0))      # MM-Retinal pairs all have a caption
    path = export.WRITERS[fmt](corpus_, str(tmp_path / 'data'))
    args = ['--format', fmt, '--input', path, '--out', str(tmp_path / 'ds'), '--num_shards', '2']
    if fmt == 'jsonl':        # paths are relative to --image_root, wherever the JSONL file is
        moved = tmp_path / 'elsewhere' / 'data.jsonl'
        os.makedirs(moved.parent)
        os.replace(path, moved)
        path = str(moved)
        args[3:4] = [path, '--image_root', str(tmp_path / 'data')]
    summary = main(args)
    source = open_input(fmt, path, image_root=str(tmp_path / 'data') if fmt == 'jsonl' else None)
    read = ArrayRecordSource(tmp_path / 'ds', 'train')
    assert len(read) == len(source) == summary['examples'] >= 2 and summary['format'] == fmt
    present = sum(1 for n in summary['labels'].values() if n)
    assert capsys.readouterr().out.splitlines() == [
        f"train: {len(source)} examples, 0 skipped, {len(summary['categories'])} categories, "
        f"{present}/{len(FINDINGS)} label classes present, {summary['bytes']} bytes in 2 shards -> {tmp_path / 'ds'}"]
    for i in range(len(source)):
        example = source[i]
        assert_same_example(example, read[i])                 # includes where: the original file and row
    assert example['where'].startswith(path if fmt != 'vilref_lmdb' else os.path.join(path, 'pairs'))
    defaults = {k: read[0][k] for k in ('eye', 'conditions', 'dr_grade', 'is_expert')}   # fields no format has
    assert defaults == {'eye': '', 'conditions': [], 'dr_grade': -1, 'is_expert': False}
    assert math.isnan(read[0]['cup_to_disc'])
    if fmt == 'flair_csv':    # FLAIR's ban list drops rows at conversion unless told not to
        everything = main(args[:-2] + ['--split', 'unbanned', '--no_ood_ban'])
        assert summary['ood_banned'] > 0 and everything['examples'] == summary['examples'] + summary['ood_banned']
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:        # the CLI reports a clash without a traceback
        main(args)
    assert exit_.value.code == 2 and "split 'train' exists" in capsys.readouterr().err
    if fmt == 'vilref_lmdb':
        with pytest.raises(ValueError, match='an image root does not apply'):
            open_input(fmt, path, image_root=str(tmp_path))


def test_cli_on_error_with_a_missing_image_file(tmp_path, capsys):
    path = export.write_jsonl(corpus(5), str(tmp_path / 'data'))
    os.remove(tmp_path / 'data' / 'images' / '0000002.png')
    args = ['--format', 'jsonl', '--input', path, '--out', str(tmp_path / 'ds')]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f'{path} line 3: ' in err and 'image file not found' in err
    summary = main(args + ['--on_error', 'skip'])
    assert summary['examples'] == 4 and summary['skipped'] == 1
    assert summary['skipped_messages'][0].startswith(f'{path} line 3: ')
    assert [r['index'] for r in map(ArrayRecordSource(tmp_path / 'ds', 'train').__getitem__, range(4))] == [0, 1, 3, 4]


def test_cli_on_error_with_a_bad_row(tmp_path, capsys):
    # A JSONL line that fails the source's parse-time checks (an empty report) stops the build by
    # default and, with --on_error skip, is dropped and counted in the summary like a bad image.
    path = export.write_jsonl(corpus(5), str(tmp_path / 'data'))
    lines = open(path, encoding='utf-8').read().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), 'text': ''})
    open(path, 'w', encoding='utf-8').write('\n'.join(lines) + '\n')
    args = ['--format', 'jsonl', '--input', path, '--out', str(tmp_path / 'ds')]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and f'{path} line 2: empty report' in capsys.readouterr().err
    summary = main(args + ['--on_error', 'skip'])
    assert summary['examples'] == 4 and summary['skipped'] == 1
    assert summary['skipped_messages'] == [f'{path} line 2: empty report ("text" is \'\')']
