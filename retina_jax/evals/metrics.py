"""Classification metrics of FLAIR's transfer protocol (docs/methods.md, "FLAIR") and the
multi-label metrics of ViLReF's (docs/methods.md, "ViLReF": Evaluation).

ACA is the mean per-class recall (balanced accuracy); kappa is Cohen's quadratic-weighted kappa
(meaningful for ordinal tasks such as DR grading, reported for every task as FLAIR does); F1 is the
macro average; AUC is the mean one-vs-rest ROC AUC over classes present in the labels. Multi-label:
macro ROC AUC over the findings with both positives and negatives, mAP over those with a positive.
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


def multilabel_metrics(labels, scores) -> dict:
    """Macro AUC over classes with both positives and negatives; mAP over classes with a positive."""
    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    if labels.ndim != 2 or labels.shape != scores.shape:
        raise ValueError(f"labels and scores must both be [N, C], got {labels.shape} and {scores.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be multi-hot (0/1)")
    positives = labels.sum(axis=0)
    auc_classes = np.flatnonzero((positives > 0) & (positives < len(labels)))
    aucs = [skm.roc_auc_score(labels[:, c], scores[:, c]) for c in auc_classes]
    aps = [skm.average_precision_score(labels[:, c], scores[:, c]) for c in np.flatnonzero(positives)]
    return {"macro_auc": float(np.mean(aucs)) if aucs else float("nan"),
            "map": float(np.mean(aps)) if aps else float("nan"),
            "num_classes_scored": len(aucs), "num_examples": len(labels)}
