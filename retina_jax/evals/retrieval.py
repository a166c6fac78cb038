"""Image-text retrieval recall@K (docs/architecture.md, "Evaluators"; the image-report pairs
of the held-out synthetic corpus: the report stream of docs/methods.md, "ViLReF").

Image -> text ranks every text by `zimg @ ztxt.T` for each image, text -> image every image for each
text. A query's correct items are its paired item and every item with exactly the same text (two
images described by one identical report are both right for it). A query scores a hit at K when one
of its correct items ranks within the top K, where an item's rank counts the wrong items scoring AT
LEAST as high as it: ties are broken against the query, so a constant similarity cannot score
better than chance (an argsort would break them by index order, i.e. arbitrarily).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

RECALL_KS = (1, 5, 10)


def first_hit_ranks(scores, positives) -> np.ndarray:
    """[Q] 0-based rank of each query's best correct item: the wrong items scoring at least as high
    (ties counted against the query, module docstring). A query hits at k when its rank is < k."""
    scores, positives = np.asarray(scores, np.float64), np.asarray(positives, bool)
    if scores.ndim != 2 or scores.shape != positives.shape:
        raise ValueError(f"scores and positives must both be [Q, N], got {scores.shape} and {positives.shape}")
    if not positives.any(axis=1).all():
        raise ValueError(f"query rows {np.flatnonzero(~positives.any(axis=1))[:10].tolist()} have no correct item")
    best = np.where(positives, scores, -np.inf).max(axis=1, keepdims=True)  # [Q, 1]
    return np.sum((scores >= best) & ~positives, axis=1)  # [Q]


def recall_at_k(scores, positives, ks: Sequence[int] = RECALL_KS) -> dict[int, float]:
    """Fraction of queries (rows of `scores` [Q, N]) with a correct item (`positives` [Q, N] bool)
    ranked within the top k, ties counted against the query (module docstring)."""
    rank = first_hit_ranks(scores, positives)
    return {k: float(np.mean(rank < k)) for k in ks}


def pair_positives(texts: Sequence[str]) -> np.ndarray:
    """[N, N] bool: item j is correct for query i when their texts are identical (the pair itself included)."""
    texts = np.asarray(list(texts), dtype=object)
    return texts[:, None] == texts[None, :]


def retrieval_ranks(zimg, ztxt, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """{'i2t', 't2i'}: every query's first-hit rank (`first_hit_ranks`) for N paired normalised
    embeddings `zimg`, `ztxt` [N, D] and their texts."""
    zimg, ztxt = np.asarray(zimg, np.float64), np.asarray(ztxt, np.float64)
    if zimg.ndim != 2 or zimg.shape != ztxt.shape or len(texts) != len(zimg):
        raise ValueError(f"paired embeddings [N, D] and N texts expected, got {zimg.shape}, {ztxt.shape} "
                         f"and {len(texts)} texts")
    sim = zimg @ ztxt.T  # [N_img, N_txt]
    positives = pair_positives(texts)
    return {"i2t": first_hit_ranks(sim, positives), "t2i": first_hit_ranks(sim.T, positives.T)}


def recall_summary(ranks: dict[str, np.ndarray], ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Recall@k both ways (`i2t_r1`, ..., `t2i_r10`), their mean and the number of pairs, from
    `retrieval_ranks`."""
    out = {f"{direction}_r{k}": float(np.mean(ranks[direction] < k)) for direction in ("i2t", "t2i") for k in ks}
    out["mean_recall"] = float(np.mean(list(out.values())))
    out["num_pairs"] = len(ranks["i2t"])
    return out


def retrieval_metrics(zimg, ztxt, texts: Sequence[str], ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Recall@k both ways for N paired normalised embeddings `zimg`, `ztxt` [N, D] and their texts."""
    return recall_summary(retrieval_ranks(zimg, ztxt, texts), ks)
