"""The synthetic corpus rendered once, on disk (docs/data.md, "The render cache").

Drawing an image is most of what the synthetic input pipeline costs: about 5 ms for a 96-px image on
the 2-core CPU of the demos, more than its augmentation, tokenisation and label extraction together.
The demos read the same 4,096 images in every epoch and in both of ViLReF's stages, and on a small
machine the grain worker that draws them takes a core from the train step. `CachedCorpus` draws
every example of a `SyntheticFundus` once, in parallel processes, into
`<root>/<key>/images.npy` (uint8 [N, S, S, 3], memory-mapped by every reader) and `records.pkl`,
then serves `record(i)` and `[i]` from there: the same dicts, bit for bit, since an example is a
pure function of its spec and index. Augmentation is unchanged: it runs in the transform after the
source, with grain's per-step generator.

The key hashes the spec, the source of the modules that draw the corpus and write its texts (with the
description files they read) and the numpy and Pillow versions, so a changed renderer, vocabulary
or drawing library never serves stale images. A finished cache appears by renaming its
directory into place: two runs that start together may both draw it, but neither reads half of one.
Segmentation masks are not cached (`item_with_masks` draws them as before).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import multiprocessing
import os
import pickle
import shutil
import tempfile
import time

import numpy as np
import PIL
from absl import logging

from retina_jax.data import knowledge, synthetic
from retina_jax.data.synthetic import CorpusSpec, SyntheticFundus

IMAGES, RECORDS = "images.npy", "records.pkl"
# Examples per task handed to a drawing process: small enough for steady progress output, large
# enough that the pickled results, not the task overhead, dominate the traffic.
CHUNK = 64
# Below this many examples the corpus is drawn in this process: starting processes would cost more.
PARALLEL_MIN = 512


def cache_key(spec: CorpusSpec) -> str:
    """A directory name that changes with the spec, with the code and data that draw the corpus and
    write its texts, and with the versions of the libraries that draw its pixels."""
    h = hashlib.sha256(f"{spec!r} numpy {np.__version__} Pillow {PIL.__version__}".encode())
    for path in (synthetic.__file__, knowledge.__file__, knowledge._DESCRIPTIONS_PATH, knowledge._DESCRIPTIONS_ZH_PATH):
        with open(path, "rb") as f:
            h.update(f.read())
    return f"{spec.size}x{spec.image_size}px-seed{spec.seed}-{h.hexdigest()[:16]}"


def _draw(spec: CorpusSpec, start: int, stop: int):
    """Examples [start, stop) -> (start, uint8 images, records): one task of a drawing process."""
    source = SyntheticFundus(spec)
    records = [source[i] for i in range(start, stop)]
    images = np.stack([r.pop("image") for r in records])
    return start, images, records


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def build(spec: CorpusSpec, path: str, workers: int | None = None) -> None:
    """Draw every example of `spec` into the cache directory `path` (atomically)."""
    n, size = spec.size, spec.image_size
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".drawing-", dir=parent)
    workers = workers or (_cpus() if n >= PARALLEL_MIN else 1)
    logging.info("render cache: drawing %d synthetic images (%d px, %.0f MB) with %d process(es) into %s",
                 n, size, n * size * size * 3 / 2 ** 20, workers, path)
    began = time.perf_counter()
    try:
        images = np.lib.format.open_memmap(os.path.join(tmp, IMAGES), mode="w+", dtype=np.uint8,
                                           shape=(n, size, size, 3))
        records = [None] * n
        tasks = [(spec, a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]
        if workers > 1:
            # `spawn`: the caller may have started jax's threads, which a forked child must not inherit.
            pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            with pool:
                futures = concurrent.futures.as_completed([pool.submit(_draw, *t) for t in tasks])
                _collect((future.result() for future in futures), images, records, n)
        else:
            _collect((_draw(*t) for t in tasks), images, records, n)
        images.flush()
        del images
        with open(os.path.join(tmp, RECORDS), "wb") as f:
            pickle.dump(records, f, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            os.rename(tmp, path)
        except OSError:  # another run finished the same cache first: keep theirs
            if not os.path.isfile(os.path.join(path, RECORDS)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logging.info("render cache: %d images drawn in %.1f s", n, time.perf_counter() - began)


def _collect(results, images, records, n: int) -> None:
    """Write each drawn chunk `(start, images, records)` into place as it arrives, logging progress."""
    done, next_report = 0, n // 10
    for start, drawn, chunk in results:
        images[start:start + len(chunk)] = drawn
        records[start:start + len(chunk)] = chunk
        done += len(chunk)
        if done >= next_report and done < n:
            logging.info("render cache: %d/%d images", done, n)
            next_report = done + n // 10


class CachedCorpus:
    """A `SyntheticFundus` served from its render cache under `root` (drawn on construction if absent).

    Picklable for grain worker processes: each reopens the memory map, so the images are shared
    through the page cache rather than copied into every worker."""

    def __init__(self, source: SyntheticFundus, root: str, workers: int | None = None):
        self.source = source
        self.spec = source.spec
        self.path = os.path.join(os.path.expanduser(root), cache_key(source.spec))
        if not os.path.isfile(os.path.join(self.path, RECORDS)):
            build(source.spec, self.path, workers)
        self._images = self._records = None

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self):
        return f"CachedCorpus({self.source!r}, {self.path!r})"

    def __getstate__(self):
        return {**self.__dict__, "_images": None, "_records": None}

    def _open(self):
        if self._records is None:
            self._images = np.load(os.path.join(self.path, IMAGES), mmap_mode="r")
            with open(os.path.join(self.path, RECORDS), "rb") as f:
                self._records = pickle.load(f)

    def record(self, index: int) -> dict:
        index = self.source._check(index)
        self._open()
        # A copy: callers may add to or change the dict they get (and its lists and arrays), as they
        # may with a fresh one. Field by field: copy.deepcopy cost 3.5 ms a batch of 64.
        return {k: v.copy() if isinstance(v, (list, np.ndarray)) else v for k, v in self._records[index].items()}

    def __getitem__(self, index: int) -> dict:
        out = self.record(index)
        out["image"] = np.array(self._images[out["index"]])
        return out

    def item_with_masks(self, index: int) -> dict:
        return self.source.item_with_masks(index)

    def masks(self, index: int) -> np.ndarray:
        return self.source.masks(index)


def maybe_cached(source: SyntheticFundus, root: str):
    """`source` served from its render cache under `root`, or `source` itself when `root` is ''."""
    return CachedCorpus(source, root) if root else source
