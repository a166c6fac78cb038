"""benchmarks/device_check.py's logic at tiny shapes on the CPU (issue 19, item 5): the script an H200
runs measures what it says. The references are XLA's own cost analysis of the compiled step (not the
script's formula) and the non-rematerialised step."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The script as the GPU runs it: its own process on ONE device (not the suite's 8 fake ones, over
    which XLA's per-device cost would count the replicated optimizer and loss 8 times)."""
    out = str(tmp_path_factory.mktemp("device_check") / "report.json")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "device_check.py"), "--tiny", "--cases",
                    "vilref,vilref_remat,open_clip", "--steps", "2", "--warmup", "1", "--out", out],
                   check=True, env=env, cwd=REPO, capture_output=True)
    with open(out) as f:
        return json.load(f)


def cases(report):
    return {r["case"]: r for r in report["cases"]}


def test_written_out_flops_are_the_matmuls_of_xlas_count(report):
    """The model FLOPs count every matmul of the online forward and backward (x3) and the momentum
    forward; XLA counts those plus the elementwise ops, norms, softmax and loss. Forgetting the
    backward would put XLA's count 3.5x above, double counting would put it below."""
    r = cases(report)["vilref"]
    assert r["model_flops"] <= r["xla_flops"] <= 1.3 * r["model_flops"]
    assert r["mfu"] == pytest.approx(r["model_flops"] / (r["step_s"] * report["peak_tflops"] * 1e12))


def test_one_device_and_tiny_shapes(report):
    assert len(report["devices"]) == 1 and report["tiny"]


def test_remat_recomputes_the_forward_and_changes_no_number(report):
    plain, remat = cases(report)["vilref"], cases(report)["vilref_remat"]
    forward = plain["model_flops"] / 4  # online forward x3 + the momentum forward
    # Rematerialisation recomputes the towers' blocks once more in the backward pass.
    assert 0.5 * forward <= remat["xla_flops"] - plain["xla_flops"] <= 1.2 * forward
    assert remat["loss"] == pytest.approx(plain["loss"], rel=1e-5)


def test_a_comparison_that_cannot_run_says_why(report):
    if importlib.util.find_spec("open_clip") is None:
        assert cases(report)["open_clip"]["not_run"].startswith(("ImportError", "ModuleNotFoundError"))
        assert "vilref_over_open_clip" not in report
    else:
        assert cases(report)["open_clip"]["step_s"] > 0
