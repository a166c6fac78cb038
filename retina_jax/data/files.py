"""Training streams from datasets on disk (docs/data.md, "Real formats"; docs/methods.md,
"FLAIR" and "ViLReF").

`data.source = 'files'` trains on the datasets named in `data.datasets` (each a ConfigDict with
`format` - flair_csv | mmretinal_csv | vilref_lmdb | jsonl | arrayrecord -, `path`, `image_root`,
`weight`) instead of the synthetic corpus. Three things happen here that the synthetic stream does
not need:

* Bad input. A source or transform raises `DataError` naming the file and row. With
  `data.on_error = 'raise'` (default) that stops the run with the message; with `'skip'` the
  example becomes a marker, `SkipCountingBatch` fills the batch with the next good examples and
  counts the markers, and the trainer logs and checkpoints the running count. A bad example is
  never replaced by a wrong one and never crashes a long run silently. What the CSV/JSONL sources
  check when a dataset is opened (a malformed row, an empty path or report, an unknown category
  or label) follows the same switch: the row is dropped into the source's `bad_rows`, and a fresh
  run starts its count with them (`bad_rows`). A missing or unreadable file or header is an error
  in both modes.
* Mixing. `data.mixing = 'balanced'` is FLAIR's dataset-balanced sampling (every dataset equally
  often, whatever its size); `'weights'` uses each dataset's `weight`; `'concat'` draws every
  example once per epoch (weights proportional to size).
* FLAIR's out-of-distribution ban list (`data.ood_ban`) and the field-of-view crop
  (`data.fov_crop`) apply to the real images.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import grain
import numpy as np
from absl import logging

from retina_jax.data import images, sources
from retina_jax.data.labels import label_names

ON_ERROR = sources.ON_ERROR  # data.on_error
MIXING = ("balanced", "weights", "concat")
SKIPPED = "skipped"  # the marker key of a skipped example, and the batch key of the skip count


FORMATS = (*sources.FORMATS, "arrayrecord")


def open_dataset(config, entry):
    """One `data.datasets` entry -> its random-access source. CSV and JSONL images live under
    `image_root`; an LMDB holds its images; `arrayrecord` is a `python -m retina_jax.data.build`
    output directory with `split` (default 'train')."""
    from retina_jax.data import build  # imports tfds: only when a dataset is opened

    fmt, labels = entry.format, label_names()
    if fmt == "arrayrecord":
        source = build.ArrayRecordSource(entry.path, entry.get("split", "train"))
        if tuple(source.label_names) != labels:
            raise images.DataError(f"its label names {tuple(source.label_names)} differ from the configured {labels}")
        return source
    if fmt not in sources.FORMATS:
        raise ValueError(f"unknown format {fmt!r}; allowed: {FORMATS}")
    kwargs = {"label_names": labels}
    if fmt != "vilref_lmdb":  # the LMDB's pairs are read lazily, so they are guarded per example
        kwargs["image_root"] = entry.get("image_root", "") or os.path.dirname(os.path.abspath(entry.path))
        kwargs["on_error"] = config.data.on_error
    if fmt == "flair_csv":
        kwargs["ood_ban"] = config.data.ood_ban
    return sources.open_source(fmt, entry.path, **kwargs)


def open_datasets(config, datasets=None, field: str = "data.datasets") -> dict[str, Any]:
    """name -> random-access source for every entry of `datasets` (default `data.datasets`); a
    missing or unreadable dataset is an error naming the config field."""
    opened = {}
    for name, entry in (config.data.datasets if datasets is None else datasets).items():
        where = f"{field}.{name} ({entry.format} at {entry.path!r})"
        try:
            opened[name] = open_dataset(config, entry)
        except (OSError, images.DataError) as e:
            raise images.DataError(f"{where}: {e}") from e
        if not len(opened[name]):
            raise images.DataError(f"{where} has no examples")
    return opened


def bad_rows(*opened: dict[str, Any]) -> list[str]:
    """The messages of the rows every opened source dropped at parse time (`on_error='skip'`)."""
    return [m for datasets in opened for source in datasets.values() for m in getattr(source, "bad_rows", ())]


@dataclasses.dataclass
class Guarded:
    """A source whose DataError becomes a skip marker (`on_error='skip'`), with the optional
    field-of-view crop applied to every image it returns; picklable for grain workers."""
    source: Any
    on_error: str
    fov_crop: bool = False

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        try:
            example = self.source[index]
            if self.fov_crop:
                example = {**example, "image": images.fov_crop(example["image"])}
            return example
        except images.DataError as e:
            if self.on_error == "raise":
                raise
            return {SKIPPED: str(e)}


@dataclasses.dataclass
class GuardedTransform:
    """Applies `transform` to good examples; passes markers on; a DataError raised by the
    transform itself (empty report, unknown category) is skipped or raised like the source's."""
    transform: Callable
    on_error: str

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        if SKIPPED in example:
            return example
        try:
            return self.transform(example, rng)
        except images.DataError as e:
            if self.on_error == "raise":
                raise
            return {SKIPPED: f"{example.get('where', example.get('index'))}: {e}"}


class SkipCountingBatch(grain.IterDataset):
    """Batches of `batch_size` good examples; `batch['skipped']` counts the markers passed over while
    filling this batch. With `extra` (KeepFIT's expert stream, a MapDataset of batches indexed by
    batch position) batch n gets `extra[n]` under `expert_*` keys. The iterator state is the
    parent's position and the batch count, so resuming is exact."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, collate: Callable,
                 extra: grain.MapDataset | None = None):
        super().__init__(parent)
        self._batch_size = batch_size
        self._collate = collate
        self._extra = extra

    def __iter__(self):
        return _SkipCountingIterator(self._parent.__iter__(), self._batch_size, self._collate, self._extra)


class _SkipCountingIterator(grain.DatasetIterator):
    def __init__(self, parent, batch_size: int, collate: Callable, extra):
        super().__init__(parent)
        self._batch_size = batch_size
        self._collate = collate
        self._extra = extra
        self._batches = 0

    def __next__(self) -> dict:
        examples, skipped = [], 0
        while len(examples) < self._batch_size:
            example = next(self._parent)
            if SKIPPED in example:
                skipped += 1
                logging.warning("skipped a bad example (data.on_error='skip'): %s", example[SKIPPED])
                continue
            examples.append(example)
        batch = self._collate(examples)
        if self._extra is not None:
            expert = self._extra[self._batches]
            skipped += int(expert.pop(SKIPPED, 0))
            batch.update({f"expert_{k}": v for k, v in expert.items()})
        self._batches += 1
        batch[SKIPPED] = np.int64(skipped)
        return batch

    def get_state(self):
        return {"parent": self._parent.get_state(), "batches": self._batches}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._batches = state["batches"]


def mixing_weights(config, lengths: dict[str, int]) -> list[float]:
    """Per-dataset sampling weights for `data.mixing` (order of `lengths`)."""
    mode = config.data.mixing
    if mode == "balanced":
        return [1.0] * len(lengths)
    if mode == "concat":
        return [float(n) for n in lengths.values()]
    return [float(config.data.datasets[name].get("weight", 1.0)) for name in lengths]


def mixed_stream(config, opened: dict[str, Any], transform: Callable) -> grain.MapDataset:
    """Every dataset shuffled, transformed under the guard, repeated, then mixed by `mixing_weights`
    (grain interleaves deterministically in those proportions): the global order, of which each
    process reads its rows (`pipeline.ProcessRows`)."""
    d = config.data
    streams = []
    for i, (name, source) in enumerate(opened.items()):
        ds = grain.MapDataset.source(Guarded(source, d.on_error, d.fov_crop))
        if d.shuffle:
            ds = ds.shuffle(seed=config.seed + 7919 * i)  # each dataset its own order
        ds = ds.random_map(GuardedTransform(transform, d.on_error), seed=config.seed + i)
        streams.append(ds.repeat(None))
    if len(streams) == 1:
        return streams[0]
    return grain.MapDataset.mix(streams, mixing_weights(config, {n: len(s) for n, s in opened.items()}))
