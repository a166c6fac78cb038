"""Transfer-evaluation reports: `<protocol>.json`, `<protocol>.md` and PNG plots side by side in the
task's output folder (the metrics of docs/methods.md, "FLAIR": ACA, kappa, macro F1, AUC; mean +- std over folds).

Plots (matplotlib's Agg canvas, no pyplot state): the row-normalised confusion matrix and the
one-vs-rest ROC curves of one fold's test predictions, and, when a protocol ran at several
`shots_train` settings, the few-shot curves of the fold-mean metrics against the shots; the
multi-label heads' per-class AUC; retrieval's recall@k curves in both directions.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn import metrics as skm

CLASSIFICATION_METRICS = ("aca", "kappa", "f1", "auc")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_confusion(path: str, labels, probs, classes: Sequence[str], title: str) -> None:
    """Row-normalised confusion matrix (rows: true class) with the counts written in the cells."""
    labels, preds = np.asarray(labels), np.asarray(probs).argmax(axis=1)
    counts = skm.confusion_matrix(labels, preds, labels=np.arange(len(classes)))
    rows = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    size = 2.5 + 0.6 * len(classes)
    fig = _figure(size + 1.5, size)
    ax = fig.add_subplot()
    im = ax.imshow(norm, vmin=0.0, vmax=1.0, cmap="Blues")
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def plot_roc(path: str, labels, probs, classes: Sequence[str], title: str) -> None:
    """One-vs-rest ROC curve of every class with both positives and negatives in `labels`."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    fig = _figure(6, 5)
    ax = fig.add_subplot()
    for c, name in enumerate(classes):
        positive = labels == c
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = skm.roc_curve(positive, probs[:, c])
        ax.plot(fpr, tpr, label=f"{name} (AUC {skm.auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def plot_few_shot(path: str, settings: Sequence[dict], title: str,
                  metrics: Sequence[str] = CLASSIFICATION_METRICS) -> None:
    """Fold-mean metrics (error bars: std over folds) against `shots_train`, one line per metric.
    The shots are categorical ticks in run order: counts and percentages may be mixed."""
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    x = np.arange(len(settings))
    for metric in metrics:
        ax.errorbar(x, [s["mean"][metric] for s in settings], yerr=[s["std"][metric] for s in settings],
                    marker="o", capsize=3, label=metric)
    ax.set_xticks(x, [str(s["shots_train"]) for s in settings])
    ax.set_xlabel("shots_train (per class)")
    ax.set_ylabel("test metric (mean over folds)")
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def plot_per_class_auc(path: str, labels, scores: dict[str, np.ndarray], classes: Sequence[str], title: str) -> None:
    """Multi-label heads: per-class ROC AUC, one bar per head (`scores`: head -> [N, C]); a class
    without both positives and negatives in `labels` has no bar."""
    labels = np.asarray(labels)
    fig = _figure(7, 1.5 + 0.3 * len(classes) * max(1, len(scores)) / 2)
    ax = fig.add_subplot()
    height = 0.8 / max(1, len(scores))
    y = np.arange(len(classes))
    for h, (head, s) in enumerate(scores.items()):
        s = np.asarray(s)
        aucs = [skm.roc_auc_score(labels[:, c], s[:, c]) if 0 < labels[:, c].sum() < len(labels) else np.nan
                for c in range(len(classes))]
        ax.barh(y + h * height, aucs, height=height, label=f"{head} (macro {np.nanmean(aucs):.3f})")
    ax.axvline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_yticks(y + height * (len(scores) - 1) / 2, classes, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("ROC AUC on the test split")
    # Below the axes: inside, it would cover the bars of the last classes.
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=max(1, len(scores)))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")


def plot_recall_curve(path: str, ranks: dict[str, np.ndarray], title: str) -> None:
    """Retrieval: recall@k against k (1 .. the number of items) per direction, from first-hit ranks."""
    names = {"i2t": "image → text", "t2i": "text → image"}
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    for direction, rank in ranks.items():
        rank = np.asarray(rank)
        k = np.arange(1, len(rank) + 1)
        ax.plot(k, [(rank < kk).mean() for kk in k], label=names.get(direction, direction))
    n = len(next(iter(ranks.values())))
    k = np.arange(1, n + 1)
    ax.plot(k, k / n, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def _fold_tables(settings: Sequence[dict], title: str) -> list[str]:
    """Mean ± std per shots setting, then every fold, of `settings` entries that have folds."""
    settings = [s for s in settings if s["folds"]]
    if not settings:
        return []
    lines = [f"## {title} (mean ± std over folds)", ""]
    rows = [[s["shots_train"], s["shots_val"], s["shots_test"], len(s["folds"])]
            + [f"{s['mean'][m]:.4f} ± {s['std'][m]:.4f}" for m in CLASSIFICATION_METRICS] for s in settings]
    lines += _table(["shots_train", "shots_val", "shots_test", "folds", *CLASSIFICATION_METRICS], rows)
    lines += ["", f"### {title}: per fold", ""]
    extra = sorted({k for s in settings for f in s["folds"] for k in f} - {"fold", "seed", *CLASSIFICATION_METRICS})
    rows = [[s["shots_train"], f["fold"], f["seed"]] + [f[m] for m in CLASSIFICATION_METRICS]
            + [f.get(k, "") for k in extra] for s in settings for f in s["folds"]]
    lines += _table(["shots_train", "fold", "seed", *CLASSIFICATION_METRICS, *extra], rows)
    return lines + [""]


def _classification_markdown(result: dict, images: dict[str, str]) -> list[str]:
    lines = _fold_tables(result["settings"], "Test metrics")
    # External test tasks (FLAIR's --experiment_test): the same folds' adapters on another task's rows.
    for name in dict.fromkeys(n for s in result["settings"] for n in s.get("external", {})):
        external = [{**s, **s["external"][name], "shots_test": "all"} for s in result["settings"]]
        lines += _fold_tables(external, f"External test {name}")
    captions = {"confusion": "Confusion matrix", "roc": "ROC curves (one vs rest)", "few_shot": "Few-shot curves"}
    for key, caption in captions.items():
        if key in images:
            lines += ["", f"## {caption}", "", f"![{caption}]({images[key]})"]
    if "plotted" in result:
        lines += ["", f"Confusion matrix and ROC curves: {result['plotted']}."]
    return lines


def _flat_markdown(title: str, values: dict) -> list[str]:
    return [f"## {title}", ""] + _table(["metric", "value"], [[k, v] for k, v in values.items()])


def write_report(out_dir: str, result: dict, predictions: dict | None = None) -> dict[str, str]:
    """Write `<protocol>.json`, `<protocol>.md` and its plots into `out_dir`; returns their paths.

    `result` is the JSON-able protocol result (`kind` 'classification', 'multilabel', 'retrieval' or
    'segmentation'); `predictions` are what is plotted: classification {'labels' [N], 'probs' [N, C]}
    (confusion matrix, ROC curves), multilabel {'labels' [N, C], 'scores': {head: [N, C]}} (per-class
    AUC), retrieval {'ranks': {'i2t', 't2i': first-hit ranks [N]}} (recall@k curves).
    """
    os.makedirs(out_dir, exist_ok=True)
    protocol, kind = result["protocol"], result["kind"]
    paths = {"json": os.path.join(out_dir, f"{protocol}.json"), "markdown": os.path.join(out_dir, f"{protocol}.md")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=2)
    images = {}
    title = f"{protocol} on {result['task']}"
    if kind == "classification":
        if predictions is not None:
            images["confusion"], images["roc"] = f"{protocol}_confusion.png", f"{protocol}_roc.png"
            plot_confusion(os.path.join(out_dir, images["confusion"]), predictions["labels"], predictions["probs"],
                           result["classes"], title)
            plot_roc(os.path.join(out_dir, images["roc"]), predictions["labels"], predictions["probs"],
                     result["classes"], title)
        if len(result["settings"]) > 1 and all(s["folds"] for s in result["settings"]):
            images["few_shot"] = f"{protocol}_few_shot.png"
            plot_few_shot(os.path.join(out_dir, images["few_shot"]), result["settings"], title)
    elif kind == "multilabel" and predictions is not None:
        images["per_class_auc"] = f"{protocol}_per_class_auc.png"
        plot_per_class_auc(os.path.join(out_dir, images["per_class_auc"]), predictions["labels"],
                           predictions["scores"], result["classes"], title)
    elif kind == "retrieval" and predictions is not None:
        images["recall"] = f"{protocol}_recall.png"
        plot_recall_curve(os.path.join(out_dir, images["recall"]), predictions["ranks"], title)
    paths.update({k: os.path.join(out_dir, v) for k, v in images.items()})

    lines = [f"# {protocol}: {result['task']}", ""]
    lines += [f"- {k}: {_fmt(result[k])}" for k in ("checkpoint", "step", "kind", "seconds") if k in result]
    for key in ("split", "config"):
        if key in result:
            lines.append(f"- {key}: " + json.dumps(result[key]))
    if result.get("classes"):
        lines.append(f"- classes: {', '.join(result['classes'])}")
    if result.get("options"):
        lines.append("- options: " + ", ".join(f"{k}={v}" for k, v in result["options"].items()))
    lines.append("")
    if kind == "classification":
        lines += _classification_markdown(result, images)
    else:
        for name, values in result["metrics"].items():
            lines += _flat_markdown(name, values) + [""]
        captions = {"per_class_auc": "Per-class ROC AUC", "recall": "Recall@k"}
        for key, caption in captions.items():
            if key in images:
                lines += [f"## {caption}", "", f"![{caption}]({images[key]})", ""]
    with open(paths["markdown"], "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return paths
