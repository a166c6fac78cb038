"""FLAIR's few-shot split protocol (docs/methods.md, "FLAIR", Transfer protocols).

As jusiro/FLAIR `flair/transferability/data/dataloader.py` (`get_dataloader_splits`, `get_shots`): the
examples are shuffled with Python's `random.seed(fold); random.shuffle(...)`, then, per class in the
shuffled order, the first `shots_test` examples go to test, the next `shots_train` to train and the next
`shots_val` to validation. A shot count is an integer ("16") or a percentage of the class's examples
("80%", floored: `int(p / 100 * n)`); every fold is the same protocol with seed = fold index, and a
protocol's figure is the mean (and population std) of its metrics over folds. `balance` (FLAIR's
`balance_data`, off by default as in its command line) oversamples the train classes to the largest.

Python's own generator is used on purpose: on a dataframe in the same row order the folds are the
original's, example for example. One difference: asking the original for more examples of a class
than it has silently gives fewer there (list slicing); here it is an error naming the class.
"""
from __future__ import annotations

import dataclasses
import random
import re
from typing import Sequence

import numpy as np

_COUNT = re.compile(r"^\d+$")
_PERCENT = re.compile(r"^\d+(\.\d+)?%$")


@dataclasses.dataclass(frozen=True)
class Split:
    """Example indices (into the task's examples) of one fold."""
    seed: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def check_shots(shots: str | int, name: str = "shots") -> str:
    """`shots` as the canonical string ("16" or "80%"); anything else is an error naming `name`."""
    text = str(shots).strip()
    if _COUNT.match(text):
        return str(int(text))
    if _PERCENT.match(text) and float(text[:-1]) <= 100:
        return text
    raise ValueError(f"{name}={shots!r}: expected a count of examples per class (e.g. 16) or a percentage "
                     "of each class's examples between 0% and 100% (e.g. 80%)")


def shots_count(shots: str | int, num_examples: int) -> int:
    """FLAIR's `get_shots`: a count as is, a percentage floored (`int(p / 100 * n)`)."""
    text = check_shots(shots)
    if text.endswith("%"):
        return int(float(text[:-1]) / 100 * num_examples)
    return int(text)


def class_split(labels: Sequence[int], seed: int, shots_train: str | int, shots_test: str | int,
                shots_val: str | int = "0", classes: Sequence[str] | None = None, balance: bool = False) -> Split:
    """One fold of FLAIR's per-class split of single-label `labels` [N] (class ids).

    With `classes`, every class id must lie in [0, len(classes)) and the error for a class too small
    for the requested shots names it; a class with no example gets none in any split. `balance`
    is FLAIR's `balance_data`: every train class is topped up to the largest one's count with
    examples drawn with replacement (`random.choices`, continuing the shuffle's generator), so the
    train indices then repeat.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"class_split needs single-label class ids [N], got shape {labels.shape}")
    names = [str(c) for c in classes] if classes is not None else None
    if names is not None and len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise ValueError(f"labels must be class ids in [0, {len(names)}), got range [{labels.min()}, {labels.max()}]")
    # In the order the original takes them from each class: test, then train, then validation.
    shots = {key: check_shots(value, key) for key, value in
             (("shots_test", shots_test), ("shots_train", shots_train), ("shots_val", shots_val))}
    order = list(range(len(labels)))
    rng = random.Random(seed)
    rng.shuffle(order)  # == random.seed(seed); random.shuffle(data) in the original
    order = np.asarray(order, np.int64)
    shuffled = labels[order]
    out = {"test": [], "train": [], "val": []}
    class_ids = range(len(names)) if names is not None else np.unique(labels)
    for c in class_ids:
        positions = np.flatnonzero(shuffled == c)
        counts = {k: shots_count(v, len(positions)) for k, v in shots.items()}
        if sum(counts.values()) > len(positions):
            name = names[c] if names is not None else str(c)
            asked = ", ".join(f"{k}={shots[k]} ({counts[k]})" for k in shots)
            raise ValueError(f"class {name!r} has {len(positions)} examples, too few for {asked}")
        start = 0
        for split, key in (("test", "shots_test"), ("train", "shots_train"), ("val", "shots_val")):
            out[split].append(order[positions[start:start + counts[key]]])
            start += counts[key]
    cat = {k: np.concatenate(v) if v else np.zeros((0,), np.int64) for k, v in out.items()}
    if balance and len(cat["train"]):
        cat["train"] = _balance(cat["train"], labels, rng)
    return Split(seed=seed, train=cat["train"], val=cat["val"], test=cat["test"])


def _balance(train: np.ndarray, labels: np.ndarray, rng: random.Random) -> np.ndarray:
    """FLAIR's `balance_data` on the train indices (grouped by class, in class order)."""
    train_labels = labels[train]
    counts = np.bincount(train_labels)
    out = []
    for c in np.unique(train_labels):
        members = train[train_labels == c].tolist()
        out += members + rng.choices(members, k=int(counts.max() - counts[c]))
    return np.asarray(out, np.int64)


def fold_splits(labels: Sequence[int], folds: int, shots_train: str | int, shots_test: str | int,
                shots_val: str | int = "0", classes: Sequence[str] | None = None, balance: bool = False) -> list[Split]:
    """Folds 0..folds-1 of `class_split`, fold k seeded with k (as the original's `seed=iFold`)."""
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    return [class_split(labels, k, shots_train, shots_test, shots_val, classes, balance) for k in range(folds)]


def random_split(num_examples: int, seed: int, train: str, test: str) -> Split:
    """A seeded split for multi-label tasks, where per-class quotas are undefined: the examples are
    shuffled as `class_split` does and the first `test` (count or % of all examples) go to test,
    the next `train` to train."""
    order = list(range(num_examples))
    random.Random(seed).shuffle(order)
    order = np.asarray(order, np.int64)
    n_test, n_train = shots_count(test, num_examples), shots_count(train, num_examples)
    if n_test + n_train > num_examples:
        raise ValueError(f"{num_examples} examples are too few for shots_test={test} ({n_test}) and "
                         f"shots_train={train} ({n_train})")
    return Split(seed=seed, train=order[n_test:n_test + n_train], val=np.zeros((0,), np.int64), test=order[:n_test])


def fold_summary(per_fold: Sequence[dict], exclude: Sequence[str] = ("fold", "seed")) -> dict:
    """{'mean': {...}, 'std': {...}} over folds of every numeric value but the `exclude` keys
    (population std, as FLAIR's `average_folds_results`, which also rounds to 3 decimals; here the
    values are kept unrounded)."""
    if not per_fold:
        raise ValueError("no folds to summarise")
    keys = [k for k, v in per_fold[0].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in exclude]
    values = {k: np.asarray([fold[k] for fold in per_fold], np.float64) for k in keys}
    return {"mean": {k: float(v.mean()) for k, v in values.items()},
            "std": {k: float(v.std()) for k, v in values.items()}}
