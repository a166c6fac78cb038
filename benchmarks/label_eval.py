"""ViLReF's expert label extractor on reports it was not written from (issue 20): exact-set accuracy and
per-finding F1 on the hand-written sets in tests/data/report_labels/.

Each set is JSON lines: `text` (a report sentence or paragraph in the phrasing of real fundus and FFA
reports: MM-Retinal captions, FFA-IR reports, DeepEyeNet keywords, Chinese hospital fundus reports),
`labels` (the findings a reader gives it, `knowledge.FINDINGS` names; ['normal'] when every
mentioned finding is denied or the report says normal; [] when nothing in it is recognisable), and
for per-eye reports `od` / `os` (each eye's own labels). `dev_*` sets were used while building the
extractor; `heldout_*` sets were written at the same time, committed before the extractor changed,
and only scored.

Exact set: a report counts when the extractor's set equals the reader's. Per-eye: each eye of a
per-eye report scored against its own labels, with the extractor told which eye the image is (an
extractor without that notion gives each eye the whole report's labels).

    python benchmarks/label_eval.py
"""
from __future__ import annotations

import argparse
import glob
import inspect
import json
import os
import time

import numpy as np

from retina_jax.data.knowledge import FINDINGS
from retina_jax.data.labels import LabelExtractor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETS = os.path.join(REPO, "tests", "data", "report_labels")


def read_set(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def names(vector: np.ndarray) -> set[str]:
    return {FINDINGS[i] for i in np.flatnonzero(vector)}


def extract(extractor: LabelExtractor, text: str, eye: str | None = None) -> set[str]:
    if eye is not None and "eye" in inspect.signature(extractor.extract).parameters:
        return names(extractor.extract(text, eye=eye))
    return names(extractor.extract(text))


def score(extractor: LabelExtractor, rows: list[dict]) -> dict:
    """Exact-set accuracy, per-finding F1 and the reports that missed."""
    got = [extract(extractor, r["text"]) for r in rows]
    want = [set(r["labels"]) for r in rows]
    f1 = {}
    for finding in FINDINGS:
        tp = sum(finding in g and finding in w for g, w in zip(got, want))
        fp = sum(finding in g and finding not in w for g, w in zip(got, want))
        fn = sum(finding not in g and finding in w for g, w in zip(got, want))
        if tp + fn:
            f1[finding] = 2 * tp / (2 * tp + fp + fn)
    eyes = [(r[key], extract(extractor, r["text"], eye)) for r in rows
            for key, eye in (("od", "right"), ("os", "left")) if key in r]
    return {"reports": len(rows), "exact": float(np.mean([g == w for g, w in zip(got, want)])),
            "macro_f1": float(np.mean(list(f1.values()))), "f1": f1,
            "per_eye": float(np.mean([set(w) == g for w, g in eyes])) if eyes else None, "eyes": len(eyes),
            "misses": [(r["text"], sorted(w), sorted(g)) for r, g, w in zip(rows, got, want) if g != w]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default=os.path.join(SETS, "*.jsonl"))
    parser.add_argument("--misses", action="store_true", help="print each report the extractor got wrong")
    args = parser.parse_args(argv)
    for path in sorted(glob.glob(args.sets)):
        name = os.path.basename(path)[:-len(".jsonl")]
        language = name.rsplit("_", 1)[1]
        extractor = LabelExtractor.load(language)
        rows = read_set(path)
        s = score(extractor, rows)
        began = time.perf_counter()
        texts = [r["text"] for r in rows] * 20
        for text in texts:
            extractor.extract(text)
        rate = len(texts) / (time.perf_counter() - began)
        per_eye = f", per-eye {s['per_eye']:.3f} of {s['eyes']} eyes" if s["eyes"] else ""
        print(f"{name}: {s['reports']} reports, exact-set accuracy {s['exact']:.3f}, macro F1 {s['macro_f1']:.3f}"
              f"{per_eye}; {rate:.0f} reports/s on one core")
        print("  F1: " + ", ".join(f"{k} {v:.2f}" for k, v in s["f1"].items()))
        if args.misses:
            for text, want, got in s["misses"]:
                print(f"  MISS {text!r}\n       reader {want}\n       got    {got}")


if __name__ == "__main__":
    main()
