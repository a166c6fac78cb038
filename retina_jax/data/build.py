"""TFDS ArrayRecord datasets from any retina_jax source, read back by grain (docs/data.md, "Real formats",
`arrayrecord`).

`build(source, out_dir, split=...)` converts a random-access source of the example schema
(`SyntheticFundus`, or any format of `retina_jax.data.sources.open_source`) into a TFDS dataset
directory: ArrayRecord shards plus ``dataset_info.json``, ``features.json`` and ``metadata.json``,
written by a `tfds.core.GeneratorBasedBuilder` with ``file_format='array_record'``.
`ArrayRecordSource(path, split)` reads a split back as a grain random-access data source with the
source's example schema, so the pipeline trains from the shards as from the original.

No TensorFlow. tfds 4.9's writing path (FeaturesDict encoding, its own copy of the ``tf.train.Example``
protos, the shuffler and the ArrayRecord writer) runs without TensorFlow; only its image encoder
(``tf.image.encode_png`` for an array) needs it, so images reach the builder already encoded (PIL)
and tfds stores those bytes as they are. The result is a plain tfds dataset:
``tfds.builder_from_directory(out_dir).as_data_source(split)`` reads it, and so does
``tfds.data_source('retina_fundus', data_dir=D, split=...)`` when ``out_dir`` is
``D/retina_fundus/1.0.0`` (tfds's layout; `build` writes to any directory).

Layout. ``out_dir`` is the dataset directory itself. Each `build` call writes one split; calls with
other splits add theirs to the same directory (the features, i.e. label count and image format, and
the label names must agree; rebuilding an existing split needs ``overwrite=True``). Shuffling is
off (``disable_shuffling``): record ``i`` of a split is the ``i``-th example the source did not skip,
in source order, and ``index`` keeps the source's own index. ``num_shards`` sets the shard count;
by default tfds picks it from the split's size (one shard below 128 MiB, shards of 64 MiB - 1 GiB
above). Per split, ``summary-<split>.json`` holds the build summary (`build`'s return value).

Stored fields (`features`; a field the source lacks gets the default in brackets, documented as
"unknown"):
- ``image``: the encoded image, ``uint8 [H, W, 3]`` once decoded, any size. Pixels from the source
  are encoded as PNG (lossless; the default) or JPEG (``image_format='jpeg'``; `export.encode_image`).
  A source that can give an image's original file bytes (a method ``encoded_image(index) -> bytes``)
  has them stored as they are when they are an RGB JPEG, or an RGB PNG in a PNG build, and decode to
  exactly the pixels the source returned; otherwise the pixels are encoded, as PNG if the original
  was a JPEG, so no image goes through lossy compression twice. ``features.json``'s
  ``encoding_format`` is the format this build encodes pixels in; a decoder reads either.
- texts ``report_en``, ``report_zh``, ``caption``, ``eye``, ``where`` [''] and ``modality`` ['CFP'].
- lists of texts ``categories``, ``atributes`` (FLAIR's spelling), ``conditions`` [[]].
- ``labels``: ``uint8 [C]`` multi-hot over the dataset's ``label_names`` (``metadata.json``; by default
  the source's ``label_names``, else the corpus findings) [zeros].
- ``index`` (int, the source's index) [the position in the source], ``dr_grade`` (int) [-1],
  ``cup_to_disc`` (float64, stored as raw bytes so it round-trips exactly) [nan], ``is_expert`` [False].
A source field outside this list is not stored (the summary lists it under ``dropped_fields``).

Bad input. A `DataError` (the message names file and row) while reading or encoding an example either
stops the build with that message (``on_error='raise'``) or skips the example and counts it
(``'skip'``: the summary's ``skipped`` count and its first ``MAX_MESSAGES`` messages; the CLI's CSV and
JSONL sources then also drop the rows that fail their parse-time checks, counted the same way). The builder's
own checks (image ``uint8 [H, W, 3]``, labels of the dataset's length and 0/1, texts and lists of texts,
a known modality) raise `DataError` naming the example the same way.

CLI: ``python -m retina_jax.data.build --format F [--input PATH] --out DIR [--split S] ...`` with a
tqdm progress bar and a one-line summary; ``--format synthetic`` builds the embedded corpus
(``--size N --seed S --image_size P``), the other formats are read with ``open_source``.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import json
import math
import operator
import os
import re
import shutil
import tempfile
import time
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tqdm import tqdm

from retina_jax import commands
from retina_jax.data import sources
from retina_jax.data.export import IMAGE_FORMATS, encode_image
from retina_jax.data.images import DataError, decode_image
from retina_jax.data.knowledge import FINDINGS
from retina_jax.data.synthetic import MODALITIES, CorpusSpec, SyntheticFundus

__all__ = ['ArrayRecordSource', 'DATASET_NAME', 'FORMATS', 'build', 'features', 'main', 'open_input']

DATASET_NAME = 'retina_fundus'
VERSION = '1.0.0'
FORMATS = ('synthetic', *sources.FORMATS)
ON_ERROR = sources.ON_ERROR
MAX_MESSAGES = 5
# open_source formats whose image paths are relative to an image root (an LMDB holds its images).
_IMAGE_ROOT_FORMATS = ('flair_csv', 'mmretinal_csv', 'jsonl')
TEXT_FIELDS = ('report_en', 'report_zh', 'caption', 'modality', 'eye', 'where')
LIST_FIELDS = ('categories', 'atributes', 'conditions')
_DEFAULTS = {'report_en': '', 'report_zh': '', 'caption': '', 'modality': 'CFP', 'eye': '', 'where': '',
             'categories': [], 'atributes': [], 'conditions': [], 'dr_grade': -1, 'cup_to_disc': math.nan,
             'is_expert': False}
_FIELDS = frozenset(('index', 'image', 'labels', *_DEFAULTS))


def features(num_labels: int, image_format: str = 'png') -> tfds.features.FeaturesDict:
    """The stored fields (see the module docstring) for ``num_labels`` classes."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f'image_format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}')
    text = tfds.features.Text
    raw = tfds.features.Encoding.BYTES
    return tfds.features.FeaturesDict({
        'index': np.int64,
        'image': tfds.features.Image(shape=(None, None, 3), dtype=np.uint8, encoding_format=image_format),
        **{k: text() for k in TEXT_FIELDS},
        **{k: tfds.features.Sequence(text()) for k in LIST_FIELDS},
        'labels': tfds.features.Tensor(shape=(num_labels,), dtype=np.uint8, encoding=raw),
        'dr_grade': np.int64,
        'cup_to_disc': tfds.features.Tensor(shape=(), dtype=np.float64, encoding=raw),
        'is_expert': np.bool_,
    })


# --------------------------------------------------------------------------------------------------
# writing

def _stored_image(image: np.ndarray, original: bytes | None, where: str, image_format: str) -> tuple[bytes, bool]:
    """(encoded image, whether it is the source's original bytes); see the module docstring."""
    if original is None:
        return encode_image(image, image_format), False
    try:
        with Image.open(io.BytesIO(original)) as im:
            kind, mode = im.format, im.mode
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ... on bad bytes
        raise DataError(f'{where}: cannot decode image ({type(e).__name__}: {e})') from e
    # tfds's own decoder reads the bytes without converting the mode, so only RGB originals are stored.
    keep = mode == 'RGB' and (kind == 'JPEG' or (kind == 'PNG' and image_format == 'png'))
    if keep and np.array_equal(decode_image(original, where), image):
        return original, True
    return encode_image(image, 'png' if kind == 'JPEG' else image_format), False


def _text(value: Any, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f'{where}: field {field!r} must be a string, got {type(value).__name__}')
    return value


def _record(example: dict, index: int, where: str, num_labels: int, original: bytes | None,
            image_format: str) -> tuple[dict, bool]:
    """The stored record of one source example (defaults filled in, every field checked)."""
    ex = {**_DEFAULTS, 'index': index, **example}
    image = np.asarray(ex['image']) if 'image' in ex else None
    if image is None or image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
        got = 'no image' if image is None else f'{image.dtype} {image.shape}'
        raise DataError(f'{where}: field image must be uint8 [H, W, 3] with H, W > 0, got {got}')
    labels = np.asarray(ex.get('labels', np.zeros(num_labels, np.uint8)))
    if labels.shape != (num_labels,) or not np.isin(labels, (0, 1)).all():
        raise DataError(f'{where}: field labels must be {num_labels} values in {{0, 1}} (the dataset\'s label_names), '
                        f'got shape {labels.shape} values {np.unique(labels).tolist()}')
    record = {k: _text(ex[k], k, where) for k in TEXT_FIELDS}
    if record['modality'] not in MODALITIES:
        raise DataError(f'{where}: field modality must be one of {MODALITIES}, got {record["modality"]!r}')
    for k in LIST_FIELDS:
        if not isinstance(ex[k], (list, tuple)):
            raise DataError(f'{where}: field {k!r} must be a list of strings, got {type(ex[k]).__name__}')
        record[k] = [_text(v, k, where) for v in ex[k]]
    for k, kind in (('index', int), ('dr_grade', int), ('cup_to_disc', float), ('is_expert', bool)):
        value = ex[k].item() if isinstance(ex[k], np.generic) else ex[k]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DataError(f'{where}: field {k!r} must be {kind.__name__}, got {type(value).__name__} {value!r}')
        record[k] = value
    record['image'], kept = _stored_image(image, original, where, image_format)
    record['labels'] = labels.astype(np.uint8)
    return record, kept


@dataclasses.dataclass
class _Conversion:
    """The example generator handed to the tfds builder, counting what it yields and skips."""
    source: Any
    split: str
    label_names: tuple[str, ...]
    image_format: str
    on_error: str
    min_examples: int
    progress: bool
    examples: int = 0
    skipped: int = 0
    messages: list = dataclasses.field(default_factory=list)
    originals: int = 0
    categories: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    modalities: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    positives: np.ndarray | None = None
    dropped_fields: set = dataclasses.field(default_factory=set)

    def __call__(self) -> Iterator[tuple[int, dict]]:
        self.positives = np.zeros(len(self.label_names), np.int64)
        # Rows a CSV/JSONL source built with on_error='skip' dropped when it parsed them count as skipped.
        bad_rows = list(getattr(self.source, 'bad_rows', ()))
        self.skipped, self.messages = len(bad_rows), bad_rows[:MAX_MESSAGES]
        encoded_image = getattr(self.source, 'encoded_image', None)
        name = type(self.source).__name__
        with tqdm(total=len(self.source), desc=f'build {self.split}', unit=' examples', disable=not self.progress,
                  dynamic_ncols=True) as bar:
            for i in range(len(self.source)):
                try:
                    example = self.source[i]
                    where = example.get('where') or f'{name}[{i}]'
                    original = encoded_image(i) if encoded_image is not None else None
                    record, kept = _record(example, i, where, len(self.label_names), original, self.image_format)
                except DataError as e:
                    if self.on_error == 'raise':
                        raise
                    self.skipped += 1
                    if len(self.messages) < MAX_MESSAGES:
                        self.messages.append(str(e))
                    bar.set_postfix(skipped=self.skipped)
                else:
                    self._count(example, record, kept)
                    yield i, record
                bar.update()
        if self.examples < self.min_examples:
            raise DataError(f'split {self.split!r}: {self.examples} examples left after skipping {self.skipped} '
                            f'(need at least {self.min_examples}, one per shard); first errors: {self.messages}')

    def _count(self, example: dict, record: dict, kept: bool):
        self.examples += 1
        self.originals += kept
        self.categories.update(record['categories'])
        self.modalities[record['modality']] += 1
        self.positives += record['labels']
        self.dropped_fields.update(set(example) - _FIELDS)


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One split of a retina_jax dataset; `build` moves its output into the dataset directory.
    Not registered: a dataset on disk is read with `tfds.builder_from_directory` or
    `tfds.data_source(DATASET_NAME, data_dir=...)`, neither of which needs this class."""
    name = DATASET_NAME
    VERSION = tfds.core.Version(VERSION)
    # tfds looks for a download checksums file next to a builder's code, and for a class in a package
    # that lookup imports `importlib_resources` (a backport tfds 4.9.10 declares only for Python < 3.9).
    # Nothing is downloaded here, so there is no code path to look in.
    code_path = None

    def __init__(self, *, conversion: _Conversion, features: tfds.features.FeaturesDict, **kwargs):
        self._conversion, self._features = conversion, features
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, features=self._features, disable_shuffling=True,
            description='Retinal images with reports, captions and labels in the retina_jax example schema.',
            metadata=tfds.core.MetadataDict(label_names=list(self._conversion.label_names)))

    def _split_generators(self, dl_manager):
        return {self._conversion.split: self._generate_examples()}

    def _generate_examples(self):
        return self._conversion()

    # build prints its own summary line instead of tfds's "Downloading and preparing dataset ...".
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass


def _existing(out_dir: str, split: str, features_: tfds.features.FeaturesDict, label_names: tuple[str, ...],
              overwrite: bool) -> tfds.core.DatasetInfo | None:
    """The dataset already in ``out_dir`` (None if there is none), checked to accept this split."""
    if not os.path.exists(os.path.join(out_dir, 'dataset_info.json')):
        return None
    info = tfds.builder_from_directory(out_dir).info
    if info.features.to_json() != features_.to_json():
        def described(f):
            return f"{f['labels'].shape[0]} labels, {f['image'].encoding_format} images"
        raise ValueError(f'{out_dir}: the dataset there has other features than this build ({described(info.features)} '
                         f'vs {described(features_)}; or another version of the schema)')
    if tuple(info.metadata['label_names']) != label_names:
        raise ValueError(f'{out_dir}: the dataset there has label_names {info.metadata["label_names"]}, '
                         f'this build {list(label_names)}')
    if split in info.splits and not overwrite:
        raise ValueError(f'{out_dir}: split {split!r} exists (splits {list(info.splits)}); pass overwrite=True '
                         '(--overwrite) to rebuild it')
    return info


def _shard_files(directory: str, split: str) -> list[str]:
    prefix = f'{DATASET_NAME}-{split}.array_record-'
    return sorted(f for f in os.listdir(directory) if f.startswith(prefix))


def build(source, out_dir: str | os.PathLike, *, split: str = 'train', label_names: Sequence[str] | None = None,
          image_format: str = 'png', num_shards: int | None = None, on_error: str = 'raise', overwrite: bool = False,
          progress: bool = True, description: dict | None = None) -> dict:
    """Write ``source`` (random access, examples of the schema above) as split ``split`` of the TFDS
    dataset in ``out_dir``; returns the summary (also written to ``out_dir/summary-<split>.json``):
    examples, skipped and the first skip messages, shards, bytes, originals (images stored as the source's
    own bytes), per-category / per-modality counts, positives per label, dropped_fields, seconds, and
    ``description`` (e.g. the input format and path)."""
    out_dir = os.fspath(out_dir)
    label_names = tuple(getattr(source, 'label_names', FINDINGS) if label_names is None else label_names)
    if not re.fullmatch(r'[A-Za-z0-9_]+', split) or split.lower() == 'all':
        raise ValueError(f"split must be letters, digits and underscores and not 'all' (tfds's name for every split), "
                         f'got {split!r}')
    if on_error not in ON_ERROR:
        raise ValueError(f'on_error must be one of {ON_ERROR}, got {on_error!r}')
    if not len(source):
        raise ValueError(f'{source!r} has no examples')
    if num_shards is not None and not 1 <= num_shards <= len(source):
        raise ValueError(f'num_shards must be in [1, {len(source)}] (the number of examples), got {num_shards}')
    if not label_names or len(set(label_names)) != len(label_names):
        raise ValueError(f'label_names must be distinct and non-empty, got {list(label_names)}')
    features_ = features(len(label_names), image_format)
    os.makedirs(out_dir, exist_ok=True)
    existing = _existing(out_dir, split, features_, label_names, overwrite)
    conversion = _Conversion(source, split, label_names, image_format, on_error,
                             min_examples=num_shards or 1, progress=progress)
    start = time.time()
    # tfds writes a dataset to data_dir/name/version; a private directory next to the output keeps a
    # half-written split out of the dataset and lets the finished shards be moved in with a rename.
    tmp = tempfile.mkdtemp(prefix=f'.build-{split}-', dir=out_dir)
    try:
        builder = _Builder(conversion=conversion, features=features_, data_dir=tmp, file_format='array_record')
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=num_shards))
        written = os.fspath(builder.data_dir)
        if existing is not None and split in existing.splits:
            for f in _shard_files(out_dir, split):
                os.remove(os.path.join(out_dir, f))
        for f in _shard_files(written, split):
            os.replace(os.path.join(written, f), os.path.join(out_dir, f))
        info = builder.info
        if existing is not None:
            kept = [s for name, s in existing.splits.items() if name != split]
            info.set_splits(tfds.core.SplitDict([*kept, builder.info.splits[split]]))
        info.write_to_directory(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shards = _shard_files(out_dir, split)
    summary = {
        'split': split, 'dataset_dir': os.path.abspath(out_dir), **(description or {}),
        'examples': conversion.examples, 'skipped': conversion.skipped, 'skipped_messages': conversion.messages,
        'shards': len(shards), 'bytes': sum(os.path.getsize(os.path.join(out_dir, f)) for f in shards),
        'image_format': image_format, 'originals': conversion.originals,
        'categories': dict(conversion.categories.most_common()), 'modalities': dict(conversion.modalities),
        'labels': dict(zip(label_names, conversion.positives.tolist())),
        'dropped_fields': sorted(conversion.dropped_fields), 'seconds': round(time.time() - start, 3),
    }
    with open(os.path.join(out_dir, f'summary-{split}.json'), 'w', encoding='utf-8') as f:
        json.dump(summary, f, indent=1, ensure_ascii=False)
    return summary


def summary_line(summary: dict) -> str:
    positive = sum(1 for n in summary['labels'].values() if n)
    return (f"{summary['split']}: {summary['examples']} examples, {summary['skipped']} skipped, "
            f"{len(summary['categories'])} categories, {positive}/{len(summary['labels'])} label classes present, "
            f"{summary['bytes']} bytes in {summary['shards']} shards -> {summary['dataset_dir']}")


# --------------------------------------------------------------------------------------------------
# reading

class ArrayRecordSource:
    """grain random-access data source over split ``split`` of a dataset written by `build` (``path`` is
    the directory holding ``dataset_info.json``); tfds split slicing such as ``'train[:80%]'`` works.

    Examples have the source schema: ``index``, ``image`` (``uint8 [H, W, 3]``, decoded with PIL by
    `decode_image`), texts as ``str``, lists of ``str``, ``labels`` (``uint8 [C]`` over
    ``self.label_names``), ``dr_grade`` (int), ``cup_to_disc`` (float), ``is_expert`` (bool) and
    ``where``: the source's own (file and row) or, when it had none, ``'<path> <split>[<i>]'``.
    Picklable: a grain worker reopens the shards (lazily) in its own process.
    """

    def __init__(self, path: str | os.PathLike, split: str = 'train'):
        self.path, self.split = os.fspath(path), split
        self._data = None
        self._length = len(self._records())

    def _records(self):
        if self._data is None:
            builder = tfds.builder_from_directory(self.path)
            self.label_names = tuple(builder.info.metadata['label_names'])
            # Images are decoded here with decode_image, not by tfds (which prefers OpenCV when installed).
            self._data = builder.as_data_source(self.split, decoders={'image': tfds.decode.SkipDecoding()})
        return self._data

    def __getstate__(self):
        return {**self.__dict__, '_data': None}

    def __len__(self) -> int:
        return self._length

    def __repr__(self):
        return f'ArrayRecordSource({self.path!r}, {self.split!r})'

    def __getitem__(self, index: int) -> dict:
        return self._build(index, decode=True)

    def record(self, index: int) -> dict:
        """The example without its image (`image` None): texts and labels, nothing decoded."""
        return self._build(index, decode=False)

    def _build(self, index: int, decode: bool) -> dict:
        index = operator.index(index)
        if not 0 <= index < self._length:
            raise IndexError(f'index {index} out of range for {self!r} of length {self._length}')
        r = self._records()[index]
        where = r['where'].decode('utf-8') or f'{self.path} {self.split}[{index}]'
        example = {k: r[k].decode('utf-8') for k in TEXT_FIELDS}
        example.update({k: [v.decode('utf-8') for v in r[k]] for k in LIST_FIELDS})
        example.update(index=int(r['index']), image=decode_image(r['image'], where) if decode else None, where=where,
                       labels=np.asarray(r['labels'], np.uint8), dr_grade=int(r['dr_grade']),
                       cup_to_disc=float(r['cup_to_disc']), is_expert=bool(r['is_expert']))
        return example


# --------------------------------------------------------------------------------------------------
# CLI

def open_input(fmt: str, path: str | None = None, *, image_root: str | None = None,
               label_names: Sequence[str] = FINDINGS, ood_ban: bool = True, size: int = 100, seed: int = 0,
               image_size: int = 512, on_error: str = 'raise'):
    """The source for ``--format fmt``: the embedded synthetic corpus (``size``, ``seed``, ``image_size``), or
    ``sources.open_source(fmt, path, ...)`` with ``label_names``, ``image_root`` for the CSV / JSONL
    formats (default: the directory of ``path``, where `export` puts the images), ``on_error`` for them
    (``'skip'`` drops a bad row into the source's ``bad_rows``, which the build counts as skipped) and
    ``ood_ban`` for ``flair_csv`` (FLAIR's out-of-distribution ban list; off to convert an evaluation set)."""
    if fmt == 'synthetic':
        return SyntheticFundus(CorpusSpec(seed=seed, size=size, image_size=image_size))
    if fmt not in FORMATS:
        raise ValueError(f'unknown format {fmt!r}; known: {FORMATS}')
    if not path:
        raise ValueError(f'format {fmt} needs an input path')
    kwargs: dict[str, Any] = {'label_names': tuple(label_names)}
    if fmt in _IMAGE_ROOT_FORMATS:
        kwargs['image_root'] = os.path.dirname(os.path.abspath(path)) if image_root is None else image_root
        kwargs['on_error'] = on_error
    elif image_root is not None:
        raise ValueError(f'format {fmt} holds its images; an image root does not apply')
    if fmt == 'flair_csv':
        kwargs['ood_ban'] = ood_ban
    return sources.open_source(fmt, path, **kwargs)


def main(argv: Sequence[str] | None = None) -> dict:
    """The CLI (see the module docstring); bad input or a clash with the dataset in --out exits with status 2
    and the message (which names the file and row) instead of a traceback."""
    ap = commands.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--format', required=True, choices=FORMATS)
    ap.add_argument('--input', default=None, help='CSV / JSONL file or LMDB split directory (not for synthetic)')
    ap.add_argument('--image_root', default=None,
                    help='directory the CSV / JSONL image paths are relative to (default: the --input directory)')
    ap.add_argument('--label_names', default=None,
                    help='comma-separated label list the labels are read against (default: the corpus findings)')
    ap.add_argument('--no_ood_ban', action='store_true',
                    help="flair_csv: keep the rows FLAIR's out-of-distribution ban list drops (e.g. an evaluation set)")
    ap.add_argument('--out', required=True, help='dataset directory (gets dataset_info.json and the shards)')
    ap.add_argument('--split', default='train')
    ap.add_argument('--size', type=int, default=100, help='synthetic: number of examples')
    ap.add_argument('--seed', type=int, default=0, help='synthetic: corpus seed')
    ap.add_argument('--image_size', type=int, default=512, help='synthetic: image side in pixels')
    ap.add_argument('--image_format', default='png', choices=sorted(IMAGE_FORMATS))
    ap.add_argument('--num_shards', type=int, default=None, help='default: chosen by tfds from the split size')
    ap.add_argument('--on_error', default='raise', choices=ON_ERROR)
    ap.add_argument('--overwrite', action='store_true', help='rebuild a split that already exists in --out')
    args = ap.parse_args(argv)
    if (args.format == 'synthetic') == (args.input is not None):
        ap.error('--input is required for the dataset formats and not used by --format synthetic')
    label_names = tuple(n.strip() for n in args.label_names.split(',')) if args.label_names else FINDINGS
    tfds.display_progress_bar(False)    # the build's own bar shows progress and the skip count
    try:
        source = open_input(args.format, args.input, image_root=args.image_root, label_names=label_names,
                            ood_ban=not args.no_ood_ban, size=args.size, seed=args.seed, image_size=args.image_size,
                            on_error=args.on_error)
        if args.format == 'synthetic':
            description = {'format': 'synthetic', 'input': repr(source.spec)}
        else:
            description = {'format': args.format, 'input': os.path.abspath(args.input)}
            if hasattr(source, 'banned'):
                description['ood_banned'] = source.banned
        summary = build(source, args.out, split=args.split, label_names=label_names, image_format=args.image_format,
                        num_shards=args.num_shards, on_error=args.on_error, overwrite=args.overwrite,
                        description=description)
    except ValueError as e:     # DataError included
        ap.exit(2, f'{ap.prog}: error: {e}\n')
    print(summary_line(summary))
    return summary


if __name__ == '__main__':
    main()
