"""grain random-access sources for the real dataset formats (docs/data.md, "Real formats";
the methods' streams: docs/methods.md, "FLAIR", "KeepFIT" and "ViLReF").

Every source returns the example schema of the synthetic corpus (`SyntheticFundus`), so the
pipeline's transforms consume any of them:

    index       int, position in this source
    image       uint8 [H, W, 3] (`images.decode_image`: grey -> 3 equal channels, alpha dropped)
    categories  list[str]   FLAIR-style categories          atributes  list[str] (FLAIR's spelling)
    report_en   str         report_zh  str                  caption    str (expert caption)
    labels      uint8 [C]   multi-hot over the source's `label_names` (default `knowledge.FINDINGS`)
    modality    'CFP' | 'FFA' | 'OCT'
    where       str         e.g. 'train.csv row 17', for error messages downstream

A field a format lacks is '' or [] (labels: all zeros); each source's docstring lists what it fills.
CSV and JSONL files are parsed and validated when the source is built (cheap: text only); images are
read and decoded lazily in `__getitem__`. Sources are picklable for grain's worker processes: they
hold parsed rows, never open files; the LMDB source opens its environments lazily in each process.
Bad input raises `images.DataError` naming the file and row (CSV: 0-based data row, i.e. the pandas
index FLAIR writes as the first column), LMDB key or JSONL line (1-based). A CSV/JSONL source built
with `on_error='skip'` drops a bad row instead (a malformed row, an empty path or report, an unknown
category or label) and keeps its message in `bad_rows`, so the trainer counts it with the bad
examples it skips later; a bad header or an unreadable file is an error in both modes.

`open_source(format, path, **kwargs)` builds one by its format name (`FORMATS`).
"""
from __future__ import annotations

import ast
import base64
import binascii
import csv
import json
import os
import pickle
import threading

import numpy as np
from absl import logging

from retina_jax.data import knowledge
from retina_jax.data.images import DataError, decode_image
from retina_jax.data.synthetic import MODALITIES

__all__ = ['CaptionCsvSource', 'FORMATS', 'FlairCsvSource', 'JsonlSource', 'ON_ERROR', 'OOD_BANNED_CATEGORIES',
           'VilrefLmdbSource', 'is_ood_banned', 'open_source']

# FLAIR's `--banned_categories` (main_pretrain.py; KeepFIT's main_pretrain.py has the same list): the
# categories held out of pretraining so that zero-shot on them is "unseen" (docs/methods.md, "FLAIR").
OOD_BANNED_CATEGORIES: tuple[str, ...] = (
    'myopia', 'cataract', 'macular hole', 'retinitis pigmentosa', 'myopic', 'myope', 'myop', 'retinitis',
)


def is_ood_banned(categories) -> bool:
    """FLAIR's rule (pretraining/data/dataloader.py): a row is banned when any banned word is a SUBSTRING
    of any of its categories, so 'no cataract' and 'pathologic myopia' are banned too. KeepFIT's copy
    of the loader tests exact membership instead (`iCat in banned_categories`); FLAIR's is the base."""
    return any(word in category for category in categories for word in OOD_BANNED_CATEGORIES)


def _multi_hot(names, label_names: tuple[str, ...], where: str) -> np.ndarray:
    index = {name: i for i, name in enumerate(label_names)}
    labels = np.zeros(len(label_names), np.uint8)
    for name in names:
        if name not in index:
            raise DataError(f'{where}: label {name!r} is outside the label set {list(label_names)}')
        labels[index[name]] = 1
    return labels


def _example(index: int, where: str, image: np.ndarray, labels: np.ndarray, *, categories=(), atributes=(),
             report_en: str = '', report_zh: str = '', caption: str = '', modality: str = 'CFP',
             eye: str = '') -> dict:
    return {'index': index, 'image': image, 'categories': list(categories), 'atributes': list(atributes),
            'report_en': report_en, 'report_zh': report_zh, 'caption': caption, 'labels': labels,
            'modality': modality, 'eye': eye, 'where': where}


class _Source:
    def _position(self, index) -> int:
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(f'index must be an int, got {type(index).__name__}')
        if not 0 <= index < len(self):
            raise IndexError(f'index {index} out of range [0, {len(self)}) of {self!r}')
        return int(index)


# What a bad row or example does: stop with its message, or be dropped and counted (config data.on_error).
ON_ERROR = ('raise', 'skip')


class _RowSource(_Source):
    """Rows parsed at construction; `__getitem__` decodes the row's image."""
    _rows: list

    def _start(self, on_error: str):
        if on_error not in ON_ERROR:
            raise ValueError(f'on_error must be one of {ON_ERROR}, got {on_error!r}')
        self.on_error, self._rows, self.bad_rows = on_error, [], []

    def _add(self, parse, where: str, *args):
        """Appends `parse(where, *args)` (None: the row is dropped on purpose); a DataError raises,
        or with on_error='skip' drops the row and records its message in `bad_rows`."""
        try:
            row = parse(where, *args)
        except DataError as e:
            if self.on_error == 'raise':
                raise
            logging.warning("dropped a bad row (on_error='skip'): %s", e)
            self.bad_rows.append(str(e))
            return
        if row is not None:
            self._rows.append(row)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict:
        return self._build(index, decode=True)

    def record(self, index: int) -> dict:
        """The example without its image (`image` None): its texts and labels, nothing decoded."""
        return self._build(index, decode=False)


def _read_csv(csv_path: str, required: dict[str, tuple]) -> tuple[dict[str, str | None], list[tuple[int, dict]]]:
    """-> ({role: the column used, None when an optional role has none}, [(data row, cells)]) where
    `cells` is {column: cell}, or a DataError for a malformed row (more or fewer cells than the
    header), raised by `_cells` when the row is parsed so that on_error='skip' can drop it.

    `required` maps a role to the column names accepted for it, first match wins; a role whose
    aliases end with None is optional."""
    if not os.path.isfile(csv_path):
        raise DataError(f'{csv_path}: CSV file not found')
    try:
        return _parse_csv(csv_path, required)
    except UnicodeDecodeError as e:
        raise DataError(f'{csv_path}: not UTF-8 text ({e})') from e
    except csv.Error as e:
        raise DataError(f'{csv_path}: unreadable CSV ({e})') from e


def _parse_csv(csv_path: str, required: dict[str, tuple]) -> tuple[dict[str, str | None], list[tuple[int, dict]]]:
    # utf-8-sig: spreadsheet exports start with a byte-order mark that would otherwise rename the first column.
    with open(csv_path, newline='', encoding='utf-8-sig') as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f'{csv_path} header: empty file') from None
        columns = {}
        for role, aliases in required.items():
            found = next((a for a in aliases if a is not None and a in header), None)
            if found is None and aliases[-1] is not None:
                raise DataError(f'{csv_path} header: missing column {" or ".join(map(repr, aliases))} (header: {header})')
            columns[role] = found
        rows = []
        for cells in reader:
            if not cells:       # a blank line: pandas skips it and does not number it either
                continue
            row = len(rows)
            if len(cells) != len(header):
                rows.append((row, DataError(f'{csv_path} row {row}: {len(cells)} cells where the header has '
                                            f'{len(header)} ({header})')))
            else:
                rows.append((row, dict(zip(header, cells))))
    return columns, rows


def _cells(cells: dict | DataError) -> dict:
    if isinstance(cells, DataError):
        raise cells
    return cells


def _literal_strings(cell: str, column: str, where: str) -> list[str]:
    try:
        value = ast.literal_eval(cell)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise DataError(f'{where}: column {column!r}: {cell!r} is not a Python literal list ({type(e).__name__})') from e
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise DataError(f'{where}: column {column!r}: expected a list of strings, got {cell!r}')
    return list(value)


class FlairCsvSource(_RowSource):
    """FLAIR / KeepFIT dataframe CSV (the public categorical datasets, one CSV per dataset).

    Columns, as FLAIR's `prepare_partitions.py` writes them with pandas: a leading unnamed index,
    `image` (path relative to `image_root`), `atributes` and `categories` (Python-literal lists of
    strings, e.g. "['mild diabetic retinopathy', 'no diabetic macular edema']"); other columns are
    ignored. Every category must be in `vocabulary` (None: `knowledge.category_vocabulary()`; the
    evaluation tasks pass their class names, with `ood_ban=False`), and a row needs at least one
    category (the FLAIR prompt and loss are built from it; FLAIR's 23_HRF noise rows have none).
    `ood_ban` drops the rows FLAIR excludes from pretraining (`is_ood_banned`); `self.banned` counts them.
    `on_error='skip'` drops a bad row into `self.bad_rows` instead of raising.

    Fills: categories, atributes, modality 'CFP' (the categorical datasets are colour photographs),
    labels = the row's categories that are in `label_names` (on the synthetic corpus exactly its
    finding labels); report_en, report_zh, caption ''.
    """

    def __init__(self, csv_path: str, image_root: str, *, ood_ban: bool = True, vocabulary=None,
                 label_names=knowledge.FINDINGS, on_error: str = 'raise'):
        self.csv_path, self.image_root, self.ood_ban = os.fspath(csv_path), os.fspath(image_root), ood_ban
        self.label_names = tuple(label_names)
        self._allowed = frozenset(knowledge.category_vocabulary() if vocabulary is None else vocabulary)
        _, rows = _read_csv(self.csv_path, {'image': ('image',), 'atributes': ('atributes',),
                                            'categories': ('categories',)})
        self._start(on_error)
        self.banned = 0
        for row, cells in rows:
            self._add(self._parse, f'{self.csv_path} row {row}', cells)

    def _parse(self, where: str, cells) -> tuple | None:
        cells = _cells(cells)
        image = cells['image'].strip()
        if not image:
            raise DataError(f'{where}: empty image path')
        categories = _literal_strings(cells['categories'], 'categories', where)
        atributes = _literal_strings(cells['atributes'], 'atributes', where)
        if self.ood_ban and is_ood_banned(categories):
            self.banned += 1
            return None
        if not categories:
            raise DataError(f'{where}: no category (FLAIR builds the prompt and the loss target from one)')
        unknown = [c for c in categories if c not in self._allowed]
        if unknown:
            raise DataError(f'{where}: unknown categor{"y" if len(unknown) == 1 else "ies"} {unknown} '
                            f'(allowed: {len(self._allowed)} names, e.g. {sorted(self._allowed)[:5]})')
        labels = np.array([name in categories for name in self.label_names], np.uint8)
        return where, image, categories, atributes, labels

    def __repr__(self):
        return (f'FlairCsvSource({self.csv_path!r}, {self.image_root!r}, ood_ban={self.ood_ban}, '
                f'rows={len(self._rows)}, banned={self.banned}, bad_rows={len(self.bad_rows)})')

    def _build(self, index: int, decode: bool) -> dict:
        index = self._position(index)
        where, image, categories, atributes, labels = self._rows[index]
        return _example(index, where, decode_image(os.path.join(self.image_root, image), where) if decode else None,
                        labels.copy(), categories=categories, atributes=atributes)


def _modality(value: str | None, image: str, where: str) -> str:
    """An explicit modality cell, else the MM-Retinal release's folder (`.../CFP/x.jpg`), else CFP."""
    if value:
        modality = value.strip().upper()
        if modality not in MODALITIES:
            raise DataError(f'{where}: modality {value!r} is not one of {MODALITIES}')
        return modality
    folders = os.path.normpath(os.path.dirname(image)).split(os.sep)
    return next((f for f in reversed(folders) if f in MODALITIES), 'CFP')


def _text_cell(cells: dict, column: str | None) -> str:
    text = cells[column].strip() if column else ''
    # MM-Retinal's collection scripts (step3_cut_caption.py) write a missing caption as the string 'nan'.
    return '' if text == 'nan' else text


class CaptionCsvSource(_RowSource):
    """MM-Retinal expert image-caption pairs (KeepFIT's expert stream, docs/methods.md, "KeepFIT").

    Accepted columns (first alias present wins): image `image` (KeepFIT's dataframe
    `39_MM_Retinal_dataset.csv`) or `Image_ID` (MM-Retinal's collection CSVs), path relative to
    `image_root`; English caption `caption` or `en_caption`, required and non-empty; optional Chinese
    caption `cn_caption` or `zh_caption`; optional `modality` (CFP/FFA/OCT). Without a modality the
    image's folder decides when it is named CFP, FFA or OCT (the MM-Retinal release's layout), else CFP.

    Fills: caption and report_en = the English caption, report_zh = the Chinese caption (or ''),
    modality; categories, atributes [], labels all zeros over `label_names`. `on_error='skip'` drops
    a bad row into `self.bad_rows` instead of raising.
    """

    IMAGE_COLUMNS = ('image', 'Image_ID')
    CAPTION_COLUMNS = ('caption', 'en_caption')
    CAPTION_ZH_COLUMNS = ('cn_caption', 'zh_caption', None)

    def __init__(self, csv_path: str, image_root: str, *, label_names=knowledge.FINDINGS, on_error: str = 'raise'):
        self.csv_path, self.image_root = os.fspath(csv_path), os.fspath(image_root)
        self.label_names = tuple(label_names)
        columns, rows = _read_csv(self.csv_path, {'image': self.IMAGE_COLUMNS, 'caption': self.CAPTION_COLUMNS,
                                                  'caption_zh': self.CAPTION_ZH_COLUMNS, 'modality': ('modality', None)})
        self._start(on_error)
        for row, cells in rows:
            self._add(self._parse, f'{self.csv_path} row {row}', columns, cells)

    @staticmethod
    def _parse(where: str, columns: dict, cells) -> tuple:
        cells = _cells(cells)
        image = cells[columns['image']].strip()
        if not image:
            raise DataError(f'{where}: empty image path')
        caption = _text_cell(cells, columns['caption'])
        if not caption:
            raise DataError(f'{where}: empty caption (column {columns["caption"]!r})')
        modality = _modality(cells[columns['modality']] if columns['modality'] else None, image, where)
        return where, image, caption, _text_cell(cells, columns['caption_zh']), modality

    def __repr__(self):
        return (f'CaptionCsvSource({self.csv_path!r}, {self.image_root!r}, rows={len(self._rows)}, '
                f'bad_rows={len(self.bad_rows)})')

    def _build(self, index: int, decode: bool) -> dict:
        index = self._position(index)
        where, image, caption, caption_zh, modality = self._rows[index]
        return _example(index, where, decode_image(os.path.join(self.image_root, image), where) if decode else None,
                        np.zeros(len(self.label_names), np.uint8), report_en=caption, report_zh=caption_zh,
                        caption=caption, modality=modality)


def _label_vector(label, label_names: tuple[str, ...], where: str) -> np.ndarray:
    """ViLReF's stored label -> multi-hot over `label_names`.

    ViLReF's `LMDBDataset` feeds the stored label to `torch.tensor(label).float()` as the target of
    its multi-label loss, i.e. a multi-hot sequence of length C; also accepted: a list of label
    names, one name, or one class index. Anything else is a label outside the label set."""
    c = len(label_names)
    if isinstance(label, str):
        return _multi_hot([label], label_names, where)
    if isinstance(label, (int, np.integer)) and not isinstance(label, (bool, np.bool_)):
        if not 0 <= label < c:
            raise DataError(f'{where}: label index {label} is outside the label set of {c} names')
        return _multi_hot([label_names[label]], label_names, where)
    if isinstance(label, (list, tuple, np.ndarray)):
        values = list(np.asarray(label).ravel()) if isinstance(label, np.ndarray) else list(label)
        if values and all(isinstance(v, str) for v in values):
            return _multi_hot(values, label_names, where)
        if all(isinstance(v, (int, float, np.integer, np.floating)) for v in values):
            if len(values) == c and all(v in (0, 1) for v in values):
                return np.asarray(values, np.uint8)
            raise DataError(f'{where}: multi-hot label {label!r} is outside the label set: expected {c} values in '
                            f'{{0, 1}} for {list(label_names)}')
    raise DataError(f'{where}: label {label!r} ({type(label).__name__}) is outside the label set {list(label_names)}')


class VilrefLmdbSource(_Source):
    """ViLReF / Chinese-CLIP LMDB split (`build_lmdb_dataset.py`; ViLReF `training/data.py`).

    `lmdb_dir/pairs`: key `str(i)` -> `pickle.dumps((image_id, text_id, raw_text, label))`, key
    `num_samples` -> the count as UTF-8 digits; `lmdb_dir/imgs`: key `str(image_id)` -> the image
    file's bytes, URL-safe base64 (ASCII), key `num_images`. Chinese-CLIP's own pairs are 3-tuples
    without a label and are refused (their labels would silently read as "no finding"). The pickles
    are unpickled, so only read LMDB files you trust.

    Fills: report_zh = raw_text (required non-empty; ViLReF later drops its first 3 characters, the
    pipeline's `drop_chars`), labels (`_label_vector`), modality 'CFP'; categories, atributes [],
    report_en, caption ''. The environments are opened read-only on first use in each process and
    are never pickled.
    """

    def __init__(self, lmdb_dir: str, label_names):
        self.lmdb_dir, self.label_names = os.fspath(lmdb_dir), tuple(label_names)
        self.pairs_path, self.imgs_path = os.path.join(self.lmdb_dir, 'pairs'), os.path.join(self.lmdb_dir, 'imgs')
        self._num_samples = self._count(self.pairs_path, b'num_samples')
        self.num_images = self._count(self.imgs_path, b'num_images')
        self._envs, self._pid, self._lock = None, None, threading.Lock()

    @staticmethod
    def _open(path: str):
        import lmdb   # imported lazily: only LMDB users need the package

        if not os.path.isdir(path):
            raise DataError(f'{path}: LMDB directory not found')
        return lmdb.open(path, readonly=True, create=False, lock=False, readahead=False, meminit=False)

    @classmethod
    def _count(cls, path: str, key: bytes) -> int:
        env = cls._open(path)
        try:
            with env.begin() as txn:
                value = txn.get(key)
        finally:
            env.close()
        if value is None:
            raise DataError(f'{path} key {key.decode()!r}: missing')
        try:
            return int(bytes(value).decode('utf-8'))
        except (UnicodeDecodeError, ValueError) as e:
            raise DataError(f'{path} key {key.decode()!r}: {bytes(value)[:32]!r} is not a count') from e

    def __len__(self) -> int:
        return self._num_samples

    def __repr__(self):
        return f'VilrefLmdbSource({self.lmdb_dir!r}, samples={self._num_samples}, labels={len(self.label_names)})'

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_envs=None, _pid=None, _lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _environments(self):
        # An LMDB environment must not cross a fork: reopen in every process (grain's workers).
        if self._envs is None or self._pid != os.getpid():
            with self._lock:
                if self._envs is None or self._pid != os.getpid():
                    self._envs = (self._open(self.pairs_path), self._open(self.imgs_path))
                    self._pid = os.getpid()
        return self._envs

    def __getitem__(self, index: int) -> dict:
        return self._build(index, decode=True)

    def record(self, index: int) -> dict:
        """The pair without its image (`image` None): the report and labels, the image never read."""
        return self._build(index, decode=False)

    def _build(self, index: int, decode: bool) -> dict:
        index = self._position(index)
        pairs, imgs = self._environments()
        where = f'{self.pairs_path} key {index}'
        with pairs.begin() as txn:
            value = txn.get(str(index).encode('utf-8'))
        if value is None:
            raise DataError(f'{where}: missing (num_samples is {self._num_samples})')
        try:
            pair = pickle.loads(value)
        except Exception as e:  # noqa: BLE001 - unpickling corrupt bytes raises many types
            raise DataError(f'{where}: cannot unpickle the pair ({type(e).__name__}: {e})') from e
        if not isinstance(pair, (tuple, list)) or len(pair) != 4:
            raise DataError(f'{where}: expected ViLReF\'s (image_id, text_id, raw_text, label), got '
                            f'{type(pair).__name__} of {len(pair) if isinstance(pair, (tuple, list)) else "?"} fields')
        image_id, _, raw_text, label = pair
        if not isinstance(raw_text, str) or not raw_text.strip():
            raise DataError(f'{where}: empty report (raw_text {raw_text!r})')
        labels = _label_vector(label, self.label_names, where)
        if not decode:
            return _example(index, where, None, labels, report_zh=raw_text)
        image_where = f'{self.imgs_path} key {image_id} (pairs key {index})'
        with imgs.begin() as txn:
            encoded = txn.get(str(image_id).encode('utf-8'))
        if encoded is None:
            raise DataError(f'{image_where}: image missing')
        try:
            data = base64.urlsafe_b64decode(encoded)
        except (binascii.Error, ValueError) as e:
            raise DataError(f'{image_where}: not URL-safe base64 ({e})') from e
        return _example(index, where, decode_image(data, image_where), labels, report_zh=raw_text)


class JsonlSource(_RowSource):
    """JSONL image-text pairs: one JSON object per line (blank lines skipped; other keys ignored).

    Keys: `image` (path relative to `image_root`), `text` (non-empty), optional `labels` (a list of
    names from `label_names`), `categories` (list of strings), `modality` (CFP/FFA/OCT, default CFP),
    `language` ('en' default, or 'zh'), which puts `text` into report_en or report_zh, and `eye`
    ('right'/'left', or 'OD'/'OS'; the image's eye, for reports with a section per eye).

    Fills: caption and report_<language> = text (the other report ''), labels, categories, modality,
    eye ('' when not given); atributes []. `on_error='skip'` drops a bad line into `self.bad_rows` instead of raising.
    """

    LANGUAGES = ('en', 'zh')
    EYES = {'': '', 'right': 'right', 'left': 'left', 'od': 'right', 'os': 'left'}

    def __init__(self, path: str, image_root: str, label_names, on_error: str = 'raise'):
        self.path, self.image_root, self.label_names = os.fspath(path), os.fspath(image_root), tuple(label_names)
        if not os.path.isfile(self.path):
            raise DataError(f'{self.path}: JSONL file not found')
        self._start(on_error)
        with open(self.path, 'rb') as f:
            for number, raw in enumerate(f, start=1):
                self._add(self._parse, f'{self.path} line {number}', raw, number == 1)

    def _parse(self, where: str, raw: bytes, first: bool) -> tuple | None:
        try:
            line = raw.decode('utf-8-sig' if first else 'utf-8')
        except UnicodeDecodeError as e:
            raise DataError(f'{where}: not UTF-8 text ({e})') from e
        if not line.strip():
            return None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f'{where}: bad JSON ({e})') from e
        if not isinstance(obj, dict):
            raise DataError(f'{where}: expected a JSON object, got {type(obj).__name__}')
        image, text = obj.get('image'), obj.get('text')
        if not isinstance(image, str) or not image.strip():
            raise DataError(f'{where}: "image" must be a non-empty path, got {image!r}')
        if not isinstance(text, str) or not text.strip():
            raise DataError(f'{where}: empty report ("text" is {text!r})')
        lists = {}
        for key in ('labels', 'categories'):
            value = obj.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise DataError(f'{where}: "{key}" must be a list of strings, got {value!r}')
            lists[key] = value
        modality = obj.get('modality', 'CFP')
        if modality not in MODALITIES:
            raise DataError(f'{where}: "modality" {modality!r} is not one of {MODALITIES}')
        language = obj.get('language', 'en')
        if language not in self.LANGUAGES:
            raise DataError(f'{where}: "language" {language!r} is not one of {self.LANGUAGES}')
        eye = self.EYES.get(str(obj.get('eye', '')).strip().lower())
        if eye is None:
            raise DataError(f'{where}: "eye" {obj.get("eye")!r} is not one of right, left, OD, OS')
        labels = _multi_hot(lists['labels'], self.label_names, where)
        return where, image.strip(), text.strip(), language, labels, lists['categories'], modality, eye

    def __repr__(self):
        return (f'JsonlSource({self.path!r}, {self.image_root!r}, rows={len(self._rows)}, '
                f'labels={len(self.label_names)}, bad_rows={len(self.bad_rows)})')

    def _build(self, index: int, decode: bool) -> dict:
        index = self._position(index)
        where, image, text, language, labels, categories, modality, eye = self._rows[index]
        return _example(index, where, decode_image(os.path.join(self.image_root, image), where) if decode else None,
                        labels.copy(),
                        categories=categories, caption=text, modality=modality, eye=eye,
                        **{f'report_{language}': text})


FORMATS: dict[str, type] = {
    'flair_csv': FlairCsvSource,
    'mmretinal_csv': CaptionCsvSource,
    'vilref_lmdb': VilrefLmdbSource,
    'jsonl': JsonlSource,
}


def open_source(format: str, path: str, **kwargs):
    """The source of `format` (a `FORMATS` name) at `path` (CSV / JSONL file or LMDB split directory);
    `kwargs` go to its constructor (`image_root`, `label_names`, `ood_ban`, `vocabulary`, and
    `on_error` for the CSV and JSONL formats)."""
    if format not in FORMATS:
        raise ValueError(f'unknown dataset format {format!r}; allowed: {sorted(FORMATS)}')
    return FORMATS[format](path, **kwargs)
