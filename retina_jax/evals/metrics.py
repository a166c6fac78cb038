"""Classification metrics of FLAIR's transfer protocol (docs/methods.md, "FLAIR").

ACA is the mean per-class recall (balanced accuracy); kappa is Cohen's quadratic-weighted kappa
(meaningful for ordinal tasks such as DR grading, reported for every task as FLAIR does); F1 is the
macro average; AUC is the mean one-vs-rest ROC AUC over classes present in the labels.
"""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    labels = np.asarray(labels)
    probs = np.asarray(probs, np.float64)
    if labels.ndim != 1 or probs.ndim != 2 or len(labels) != len(probs):
        raise ValueError(f"labels [N] and probs [N, C] expected, got {labels.shape} and {probs.shape}")
    num_classes = probs.shape[1]
    preds = probs.argmax(axis=1)
    present = np.unique(labels)
    aucs = []
    for c in present:
        binary = labels == c
        if binary.all():
            continue
        aucs.append(skm.roc_auc_score(binary, probs[:, c]))
    class_ids = np.arange(num_classes)
    recall = skm.recall_score(labels, preds, labels=present, average=None, zero_division=0)
    return {
        "aca": float(np.mean(recall)),
        "kappa": float(skm.cohen_kappa_score(labels, preds, weights="quadratic", labels=class_ids)),
        "f1": float(skm.f1_score(labels, preds, labels=class_ids, average="macro", zero_division=0)),
        "auc": float(np.mean(aucs)) if aucs else float("nan"),
        "accuracy": float(np.mean(preds == labels)),
    }
