"""Write any source of the example schema (`sources.py`; in particular `SyntheticFundus`) in the real
dataset formats (docs/data.md, "Real formats"), so the corpus can be materialised once for loader benchmarks and
the readers are tested against files in the originals' exact layout.

Each writer is the inverse of its reader on the fields the format carries, writes the images as PNG
(lossless, the default) or JPEG (quality 95) under `out_dir/images/<index>.<ext>` (LMDB: inside
`imgs`), and returns the path `sources.open_source` takes, with `image_root=out_dir`:

- `write_flair_csv` -> `out_dir/dataframe.csv`: pandas' layout as FLAIR's `prepare_partitions.py`
  writes it: a leading unnamed index column, `image`, `atributes` (FLAIR's spelling), `categories`,
  the lists as Python literals (`str(list)`, e.g. "['normal']").
- `write_mmretinal_csv` -> `out_dir/captions.csv`: KeepFIT's `39_MM_Retinal_dataset.csv` layout
  (index, `image`, `caption`) plus `cn_caption` (the example's report_zh, which the reader maps back
  to report_zh) and `modality`; every example needs a caption.
- `write_vilref_lmdb` -> `out_dir`: `pairs` (key `str(i)` -> `pickle.dumps((image_id, text_id,
  raw_text, label))` with raw_text = report_zh and label the multi-hot list ViLReF feeds to
  `torch.tensor(label)`, key `num_samples`) and `imgs` (key `str(image_id)` -> URL-safe base64 of the
  image file, key `num_images`), the counts as UTF-8 digits as Chinese-CLIP's `build_lmdb_dataset.py` writes them.
- `write_jsonl` -> `out_dir/data.jsonl`: {image, text (report_<language>), labels (names), categories,
  modality, language} per line, UTF-8.

CLI (the synthetic corpus; MM-Retinal's role is the expert set, so `mmretinal_csv` draws every
example with an expert caption):

    python -m retina_jax.data.export --format jsonl --out /tmp/synthetic_jsonl --size 1000 [--seed 0]
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import csv
import io
import json
import os
import pickle
import time

import numpy as np
from PIL import Image

from configs import common
from retina_jax import commands
from retina_jax.data import knowledge
from retina_jax.data.images import DataError
from retina_jax.data.sources import FORMATS
from retina_jax.data.synthetic import MODALITIES, CorpusSpec, SyntheticFundus

__all__ = ['IMAGE_FORMATS', 'WRITERS', 'encode_image', 'main', 'write_flair_csv', 'write_jsonl', 'write_mmretinal_csv',
           'write_vilref_lmdb']

IMAGE_FORMATS = {'png': 'PNG', 'jpeg': 'JPEG'}
TASK_CLASSES = common.SYNTHETIC_TASK_CLASSES  # `--task`: the held-out zero-shot task's conditions
_EXTENSIONS = {'png': 'png', 'jpeg': 'jpg'}
# Chinese-CLIP's map size: LMDB reserves address space, the file grows only with what is written.
_LMDB_MAP_SIZE = 1024 ** 4


def _check_image_format(image_format: str) -> None:
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f'unknown image format {image_format!r}; allowed: {sorted(IMAGE_FORMATS)}')


def encode_image(image: np.ndarray, image_format: str = 'png') -> bytes:
    """uint8 [H, W, 3] -> PNG (lossless) or JPEG (quality 95) file bytes."""
    _check_image_format(image_format)
    buffer = io.BytesIO()
    options = {'quality': 95} if image_format == 'jpeg' else {}
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format=IMAGE_FORMATS[image_format], **options)
    return buffer.getvalue()


def _indices(source, indices):
    return range(len(source)) if indices is None else indices


def _save_image(out_dir: str, index: int, image: np.ndarray, image_format: str) -> str:
    """Write the image file; -> its path relative to `out_dir`."""
    relative = f'images/{index:07d}.{_EXTENSIONS[image_format]}'
    with open(os.path.join(out_dir, relative), 'wb') as f:
        f.write(encode_image(image, image_format))
    return relative


def _prepare(out_dir: str, image_format: str) -> None:
    _check_image_format(image_format)   # before anything is written
    os.makedirs(os.path.join(out_dir, 'images'), exist_ok=True)


def _text(example: dict, key: str, source, index: int, what: str) -> str:
    text = example[key].strip()
    if not text:
        raise DataError(f'{source!r} index {index}: empty {key} ({what} needs one)')
    return text


def write_flair_csv(source, out_dir: str, indices=None, *, image_format: str = 'png') -> str:
    """FLAIR / KeepFIT dataframe CSV of `source[i]` for i in `indices` (None: all) -> the CSV path."""
    _prepare(out_dir, image_format)
    path = os.path.join(out_dir, 'dataframe.csv')
    with open(path, 'w', newline='', encoding='utf-8') as f:
        writer = csv.writer(f)
        writer.writerow(['', 'image', 'atributes', 'categories'])
        for row, i in enumerate(_indices(source, indices)):
            example = source[int(i)]
            if not example['categories']:
                raise DataError(f'{source!r} index {i}: no category (a FLAIR dataframe row needs one)')
            image = _save_image(out_dir, int(i), example['image'], image_format)
            writer.writerow([row, image, str(list(example['atributes'])), str(list(example['categories']))])
    return path


def write_mmretinal_csv(source, out_dir: str, indices=None, *, image_format: str = 'png') -> str:
    """MM-Retinal expert pairs CSV (KeepFIT's dataframe layout + cn_caption, modality) -> the CSV path."""
    _prepare(out_dir, image_format)
    path = os.path.join(out_dir, 'captions.csv')
    with open(path, 'w', newline='', encoding='utf-8') as f:
        writer = csv.writer(f)
        writer.writerow(['', 'image', 'caption', 'cn_caption', 'modality'])
        for row, i in enumerate(_indices(source, indices)):
            example = source[int(i)]
            caption = _text(example, 'caption', source, i, 'an MM-Retinal pair')
            image = _save_image(out_dir, int(i), example['image'], image_format)
            writer.writerow([row, image, caption, example['report_zh'].strip(), example['modality']])
    return path


def write_vilref_lmdb(source, out_dir: str, indices=None, *, image_format: str = 'png') -> str:
    """ViLReF / Chinese-CLIP LMDB split (`out_dir/pairs`, `out_dir/imgs`) -> `out_dir`."""
    import lmdb   # imported lazily: only LMDB users need the package

    _check_image_format(image_format)
    os.makedirs(out_dir, exist_ok=True)
    envs = [lmdb.open(os.path.join(out_dir, name), map_size=_LMDB_MAP_SIZE) for name in ('pairs', 'imgs')]
    try:
        with envs[0].begin(write=True) as pairs, envs[1].begin(write=True) as imgs:
            for env, txn in zip(envs, (pairs, imgs)):
                txn.drop(env.open_db(txn=txn), delete=False)   # overwrite an existing split, as Chinese-CLIP does
            count = 0
            for i in _indices(source, indices):
                example = source[int(i)]
                raw_text = _text(example, 'report_zh', source, i, 'a ViLReF pair')
                label = [int(v) for v in np.asarray(example['labels']).ravel()]
                pairs.put(str(count).encode('utf-8'), pickle.dumps((count, count, raw_text, label)))
                imgs.put(str(count).encode('utf-8'),
                         base64.urlsafe_b64encode(encode_image(example['image'], image_format)))
                count += 1
            pairs.put(b'num_samples', str(count).encode('utf-8'))
            imgs.put(b'num_images', str(count).encode('utf-8'))
    finally:
        for env in envs:
            env.close()
    return out_dir


def write_jsonl(source, out_dir: str, indices=None, *, image_format: str = 'png', language: str = 'en',
                label_names=knowledge.FINDINGS) -> str:
    """JSONL image-text pairs (text = report_<language>, labels as names of `label_names`) -> the file path."""
    if language not in ('en', 'zh'):
        raise ValueError(f"language must be 'en' or 'zh', got {language!r}")
    _prepare(out_dir, image_format)
    label_names = tuple(label_names)
    path = os.path.join(out_dir, 'data.jsonl')
    with open(path, 'w', encoding='utf-8') as f:
        for i in _indices(source, indices):
            example = source[int(i)]
            text = _text(example, f'report_{language}', source, i, 'a JSONL pair')
            labels = np.asarray(example['labels']).ravel()
            if len(labels) != len(label_names):
                raise ValueError(f'{source!r} index {i}: {len(labels)} labels for {len(label_names)} label names')
            obj = {'image': _save_image(out_dir, int(i), example['image'], image_format), 'text': text,
                   'labels': [name for name, on in zip(label_names, labels) if on],
                   'categories': list(example['categories']), 'modality': example['modality'], 'language': language}
            f.write(json.dumps(obj, ensure_ascii=False) + '\n')
    return path


WRITERS = {
    'flair_csv': write_flair_csv,
    'mmretinal_csv': write_mmretinal_csv,
    'vilref_lmdb': write_vilref_lmdb,
    'jsonl': write_jsonl,
}
assert set(WRITERS) == set(FORMATS)


def write_task(out_dir: str) -> str:
    """`out_dir/task.json`: the synthetic zero-shot conditions as a task over `out_dir/dataframe.csv`
    (a row's label is its first category, its primary condition), named after the folder; the start
    of a user's own task file (format: retina_jax/evals/tasks.py)."""
    from retina_jax.evals import tasks
    name = os.path.basename(os.path.abspath(out_dir))
    task = tasks.load_task('synthetic_conditions')
    task = dataclasses.replace(task, name=name, source='export',
                               # findings and comorbidities a row lists after its condition decide nothing
                               other_categories=tuple(c for c in knowledge.category_vocabulary() if c not in task.classes),
                               dataframe='dataframe.csv', reference='python -m retina_jax.data.export --task',
                               notes='Exported synthetic examples; images and dataframe.csv relative to the data root '
                                     f'(--data_root {out_dir}).')
    path = os.path.join(out_dir, 'task.json')
    tasks.save_task(task, path)
    return path


def main(argv=None) -> str:
    from tqdm import tqdm

    ap = commands.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--format', required=True, choices=sorted(WRITERS))
    ap.add_argument('--out', required=True, help='output directory')
    ap.add_argument('--size', type=int, required=True, help='number of examples')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--image_size', type=int, default=512)
    ap.add_argument('--image_format', choices=sorted(IMAGE_FORMATS), default='png')
    ap.add_argument('--modalities', default='CFP', help=f'comma-separated subset of {",".join(MODALITIES)}')
    ap.add_argument('--task', action='store_true',
                    help='flair_csv: also write task.json, a classification task over the exported rows (their '
                         'primary condition), for the --task flag of train and evaluate (with --data_root OUT)')
    args = ap.parse_args(argv)
    if args.size < 1:
        ap.error('--size must be >= 1')
    if args.task and args.format != 'flair_csv':
        ap.error('--task writes a task over a flair_csv dataframe: use --format flair_csv')
    spec = CorpusSpec(seed=args.seed, size=args.size, image_size=args.image_size,
                      modalities=tuple(m.strip() for m in args.modalities.split(',')),
                      **({'expert_fraction': 1.0} if args.format == 'mmretinal_csv' else {}),
                      # The task's rows are labelled by their primary condition: draw only its classes.
                      **({'conditions': TASK_CLASSES} if args.task else {}))
    source = SyntheticFundus(spec)
    start = time.perf_counter()
    path = WRITERS[args.format](source, args.out, tqdm(range(len(source)), desc=f'export {args.format}'),
                                image_format=args.image_format)
    seconds = time.perf_counter() - start
    if args.task:
        print(f'export: wrote the task file {write_task(args.out)}')
    print(f'export: wrote {len(source)} synthetic examples ({args.image_size}px, {args.image_format}) as {args.format} '
          f'to {path} in {seconds:.1f} s ({len(source) / seconds:.1f} examples/s)')
    return path


if __name__ == '__main__':
    main()
