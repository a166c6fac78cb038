"""Label extractor recovery on the synthetic corpus (docs/methods.md, "ViLReF"; docs/labels.md): every
report, in both languages, must give back the generated labels, read whole and read as its image's
eye's section. The test suite checks 3,000 records; this checks 55,000, and times the extractor
(reports per second on one core, extraction alone: the records are generated first).

  python benchmarks/label_recovery.py
  PYTHONPATH=<an older checkout> python benchmarks/label_recovery.py   # that checkout's extractor
"""
import inspect
import time

import numpy as np

from retina_jax.data.labels import LabelExtractor
from retina_jax.data.synthetic import CorpusSpec, SyntheticFundus

SPECS = (CorpusSpec(seed=0, size=20000), CorpusSpec(seed=1, size=20000), CorpusSpec(seed=2, size=5000, difficulty=1.0),
         CorpusSpec(seed=3, size=10000, comorbidity_prob=0.9))


def main():
    records = [r for spec in SPECS for r in map(SyntheticFundus(spec).record, range(spec.size))]
    want = np.stack([r["labels"] for r in records])
    for language in ("en", "zh"):
        ex = LabelExtractor.load(language)
        texts = [r[f"report_{language}"] for r in records]
        began = time.perf_counter()
        got = np.stack([ex.extract(t) for t in texts])
        rate = len(texts) / (time.perf_counter() - began)
        line = f"{language}: {len(texts)} reports, {int((got != want).any(1).sum())} mismatches, {rate:.0f} reports/s"
        if "eye" in inspect.signature(ex.extract).parameters:
            per_eye = np.stack([ex.extract(t, eye=r["eye"]) for t, r in zip(texts, records)])
            line += f"; read per eye: {int((per_eye != want).any(1).sum())} mismatches"
        print(line, flush=True)


if __name__ == "__main__":
    main()
