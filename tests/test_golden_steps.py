"""Every method's first 3 training steps give the numbers recorded before the trainer was split into
methods and evaluators (tests/golden_steps.py, tests/data/golden_steps.json): the loss, its terms,
every logged statistic and a digest of every tree of the final train state.

The recording was made on the 2-core Intel Xeon of the issue 17/18 sessions, where the test held to
rtol 2e-6. XLA's CPU kernels differ between processors (vector width, fusion choices), so float32
sums reorder: on an AMD EPYC the logged metrics agree within 3.1e-5 relative and each leaf's sum and
norm within 3.6e-3 of its tree's scale (rms of the tree's elements x sqrt(leaf size)). A leaf is
compared against its tree's scale, not its own, because some leaves are rounding noise by
construction: an attention key bias has a zero gradient in exact arithmetic (softmax ignores a
shift shared by a row's logits), so its value after 3 steps is ~1e-7 of either sign. The tolerances
below (1e-4 and 1e-2) hold across both machines and still catch a changed loss, term, optimizer
or update: compared with its neighbour's recording (FLAIR's loss against CLIP's, ViLReF against its
late-queue or distillation variant), a case breaks 7-19 of the metrics and 22-114 leaves.
"""
import json

import numpy as np
import pytest
from golden_steps import GOLDEN, cases, run_case

with open(GOLDEN) as f:
    RECORDED = json.load(f)

METRIC_RTOL, METRIC_ATOL = 1e-4, 1e-6
TREE_TOL = 1e-2


@pytest.mark.parametrize("name", sorted(RECORDED["cases"]))
def test_first_steps_match_the_recording(name, tmp_path):
    want = RECORDED["cases"][name]
    got = run_case(cases()[name], str(tmp_path))
    assert len(got["rows"]) == len(want["rows"]) == 3
    for step, (g, w) in enumerate(zip(got["rows"], want["rows"])):
        assert sorted(g) == sorted(w), f"step {step}: logged metrics differ"
        for key in w:
            np.testing.assert_allclose(g[key], w[key], rtol=METRIC_RTOL, atol=METRIC_ATOL,
                                       err_msg=f"{name} step {step} {key}")
    for tree, sums in want["trees"].items():
        assert sorted(got["trees"][tree]) == sorted(sums), f"{tree}: tree structure differs"
        size = {path: got["trees"][tree][path][2] for path in sums}
        # A recording made after the size was added to the digest holds [sum, sum of squares, size].
        rms = np.sqrt(sum(values[1] for values in sums.values()) / max(sum(size.values()), 1))
        for path, values in sums.items():
            total, sumsq = values[:2]
            got_total, got_sumsq, _ = got["trees"][tree][path]
            scale = TREE_TOL * rms * np.sqrt(size[path])
            assert abs(got_total - total) <= scale, f"{name} {tree}{path}: sum {got_total} vs {total}"
            assert abs(np.sqrt(got_sumsq) - np.sqrt(sumsq)) <= scale, \
                f"{name} {tree}{path}: norm {np.sqrt(got_sumsq)} vs {np.sqrt(sumsq)}"
