"""Every method's first 3 training steps give the numbers recorded before the trainer was split into
methods and evaluators (tests/golden_steps.py, tests/data/golden_steps.json): the loss, its terms,
every logged statistic and a digest of every tree of the final train state."""
import json

import numpy as np
import pytest
from golden_steps import GOLDEN, cases, run_case

with open(GOLDEN) as f:
    RECORDED = json.load(f)


@pytest.mark.parametrize("name", sorted(RECORDED["cases"]))
def test_first_steps_match_the_recording(name, tmp_path):
    want = RECORDED["cases"][name]
    got = run_case(cases()[name], str(tmp_path))
    assert len(got["rows"]) == len(want["rows"]) == 3
    for step, (g, w) in enumerate(zip(got["rows"], want["rows"])):
        assert sorted(g) == sorted(w), f"step {step}: logged metrics differ"
        for key in w:
            np.testing.assert_allclose(g[key], w[key], rtol=2e-6, atol=1e-7, err_msg=f"{name} step {step} {key}")
    for tree, sums in want["trees"].items():
        assert sorted(got["trees"][tree]) == sorted(sums), f"{tree}: tree structure differs"
        for path, value in sums.items():
            np.testing.assert_allclose(got["trees"][tree][path], value, rtol=2e-6, atol=1e-7,
                                       err_msg=f"{name} {tree}{path}")
