"""What a run leaves for its reader (docs/usage.md, "Run directories"): TensorBoard event files that
hold exactly the scalars written, Weights & Biases when asked for, and the PNGs of the curves."""
import json
import struct
import sys
import types

import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2
from test_train import tiny_config

from retina_jax import plots
from retina_jax.config import ConfigError, validate
from retina_jax.metric_writer import MetricWriter


def tensorboard_scalars(folder) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in the folder's event files, read from the TFRecord frames
    (8-byte length, 4-byte CRC, the Event proto, 4-byte CRC) without TensorBoard."""
    out = []
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    return out


def test_tensorboard_holds_the_scalars_written(tmp_path):
    writer = MetricWriter(str(tmp_path))
    writer.write(1, {"train/loss": np.float32(2.5), "train/lr": 1e-3, "eval/x/per_class": [0.1, 0.2]})
    writer.write(2, {"train/loss": 2.25, "perf/examples_per_sec": 120})
    writer.close()
    writer.write(3, {"train/loss": 2.0})  # written after close: the file opens again
    writer.close()
    got = tensorboard_scalars(tmp_path / "tensorboard")
    want = [(1, "train/loss", 2.5), (1, "train/lr", 1e-3), (2, "train/loss", 2.25),
            (2, "perf/examples_per_sec", 120.0), (3, "train/loss", 2.0)]
    assert [(s, t) for s, t, _ in got] == [(s, t) for s, t, _ in want]  # the list-valued metric is left out
    np.testing.assert_allclose([v for *_, v in got], [v for *_, v in want], rtol=1e-7)
    # metrics.jsonl keeps every value, the list too
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[0]["eval/x/per_class"] == [0.1, 0.2] and [r["step"] for r in rows] == [1, 2, 3]


def test_wandb_logs_every_step_and_a_resumed_run_continues_its_run(tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(util=types.SimpleNamespace(generate_id=lambda: "abc123"))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return types.SimpleNamespace(log=lambda metrics, step: calls.append(("log", step, metrics)))

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    writer = MetricWriter(str(tmp_path), wandb_project="retina", run_config={"seed": 3})
    writer.write(1, {"train/loss": 2.0})
    writer.write(2, {"train/loss": 1.5, "eval/t/aca": 0.5})
    assert calls[0] == ("init", {"project": "retina", "id": "abc123", "resume": "allow", "dir": str(tmp_path),
                                 "config": {"seed": 3}})
    assert calls[1:] == [("log", 1, {"train/loss": 2.0}), ("log", 2, {"train/loss": 1.5, "eval/t/aca": 0.5})]
    fake.util.generate_id = lambda: "another"  # a resumed run reads the id its workdir holds
    MetricWriter(str(tmp_path), wandb_project="retina").write(3, {"train/loss": 1.0})
    assert calls[3][0] == "init" and calls[3][1]["id"] == "abc123"


def test_wandb_asked_for_without_wandb_is_a_config_error(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"config.train.wandb: 'proj' asked for, but wandb is not installed"):
        validate(tiny_config(**{"train.wandb": "proj"}), 8)


ROWS = [
    {"step": 1, "train/loss": 3.0, "train/loss_img": 1.0, "train/lr": 0.0, "train/logit_scale": 14.3,
     "perf/examples_per_sec": 10.0, "perf/step_seconds": 1.0, "perf/data_wait_seconds": 0.1},
    {"step": 2, "train/loss": 2.0, "train/loss_img": 0.5, "train/lr": 1e-3, "train/logit_scale": 14.2,
     "perf/examples_per_sec": 100.0, "perf/step_seconds": 0.5, "perf/data_wait_seconds": 0.0},
    {"step": 2, "eval/zs/aca": 0.4, "eval/zs/aca_std": 0.0, "eval/zs/num_test": 48.0, "eval/lp/auc": 0.7},
]


def test_plots_draw_the_panels_of_the_metrics_present(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS)
    assert plots.curve_panels(ROWS[:2]) == {
        "loss": ["train/loss", "train/loss_img"], "learning rate": ["train/lr"], "logit scale": ["train/logit_scale"],
        "examples per second": ["perf/examples_per_sec"],
        "seconds per step": ["perf/data_wait_seconds", "perf/step_seconds"]}
    assert plots.eval_panels(ROWS) == {"lp": ["eval/lp/auc"], "zs": ["eval/zs/aca"]}
    written = plots.plot_run(str(tmp_path))
    assert written == {"training_curves": str(tmp_path / plots.CURVES), "eval_figures": str(tmp_path / plots.EVALS)}
    for path in written.values():
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width >= 500 and im.height >= 300
    # The masked-LM stage logs no logit scale: no such panel.
    without = [{k: v for k, v in r.items() if k != "train/logit_scale"} for r in ROWS[:2]]
    assert "logit scale" not in plots.curve_panels(without)


def test_a_run_without_metrics_has_no_plots(tmp_path):
    assert plots.plot_run(str(tmp_path)) == {}
    (tmp_path / "metrics.jsonl").write_text("")
    assert plots.plot_run(str(tmp_path)) == {}
