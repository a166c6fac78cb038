"""Label extractor recovery on the synthetic corpus (docs/methods.md, "ViLReF"): every report, in both
languages, must give back the generated labels. The test suite checks 3,000 records; this checks 55,000.

  python benchmarks/label_recovery.py
"""
import numpy as np
from retina_jax.data.labels import LabelExtractor
from retina_jax.data.synthetic import CorpusSpec, SyntheticFundus
ex = {l: LabelExtractor.load(l) for l in ("en", "zh")}
n = bad = 0
for spec in (CorpusSpec(seed=0, size=20000), CorpusSpec(seed=1, size=20000), CorpusSpec(seed=2, size=5000, difficulty=1.0),
             CorpusSpec(seed=3, size=10000, comorbidity_prob=0.9)):
    src = SyntheticFundus(spec)
    for i in range(spec.size):
        r = src.record(i); n += 1
        bad += sum(not np.array_equal(ex[l].extract(r[f"report_{l}"]), r["labels"]) for l in ("en", "zh"))
print(f"{n} records x 2 languages: {bad} mismatches")
