"""The researcher's path, driven through the `retina-jax` command as a user would (docs/usage.md,
"The retina-jax command"): the README's "Train on your own CSV and evaluate on your task" section
run verbatim in a temporary directory, then what each of its commands left behind, the run
directory read back by `evaluate` and `predict` (`--step`, overrides), the help, and the one-line
errors of a user's mistakes. No third-party banner or warning may appear in any of their output."""
import csv
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
from ast import literal_eval
from contextlib import redirect_stderr

import pytest
from test_plots import tensorboard_scalars
from test_train import REPO

from retina_jax import cli, commands, metric_writer
from retina_jax.data.sources import is_ood_banned
from retina_jax.errors import ConfigError, UserError

# What a newcomer must never see: banners and warnings of the libraries underneath.
NOISE = re.compile(r"PyTorch was not found|leaked shared_memory|could not be restored|read_only=True|"
                   r"Given directory is read only|Metadata file does not exist|Traceback|\w+Warning:|^WARNING", re.M)
TINY = ["--config.data.batch_size=16", "--config.data.image_size=32", "--config.text.vocab_size=600",
        "--config.text.vocab_corpus_size=50", "--config.text.max_len=24", "--config.train.epochs=1.0",
        "--config.optim.schedule_epochs=1.0", "--config.train.progress=False"]


def user_env():
    """A user's machine: one CPU device (not the suite's 8 fake ones), the command on the PATH."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def run(args, cwd, timeout=600):
    """`retina-jax ARGS` in `cwd` -> (exit code, stdout + stderr)."""
    proc = subprocess.run([sys.executable, "-m", "retina_jax.commands", *args], cwd=cwd, env=user_env(),
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def readme_section() -> list[str]:
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = text[text.index("### Train on your own CSV and evaluate on your task"):]
    start = section.index("```bash\n") + len("```bash\n")
    block = section[start:section.index("\n```", start)]
    return [line.split("  #")[0].strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """The README section's commands, in order, in a fresh directory (the repo's configs beside it)."""
    root = tmp_path_factory.mktemp("user")
    os.symlink(os.path.join(REPO, "configs"), root / "configs")
    lines = readme_section()
    assert len(lines) == 5 and all(line.startswith("retina-jax ") for line in lines), lines
    outputs = []
    for line in lines:
        proc = subprocess.run(line, shell=True, cwd=root, env=user_env(), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (line, proc.stdout[-2000:], proc.stderr[-4000:])
        outputs.append(proc.stdout + proc.stderr)
    return root, outputs


def test_the_readme_flow_runs_clean(flow):
    _, outputs = flow
    for output in outputs:
        assert not NOISE.search(output), NOISE.search(output).group(0)


def test_training_reads_the_csv_given_by_flag(flow):
    root, _ = flow
    run_dir = root / "runs" / "mine"
    info = json.load(open(run_dir / "run_info.json"))
    data = info["config"]["data"]
    assert data["source"] == "files"
    assert data["datasets"] == {"mine": {"format": "flair_csv", "path": str(root / "data/mine/dataframe.csv"),
                                         "image_root": str(root / "data/mine"), "weight": 1.0}}
    # 512 exported rows, less those FLAIR's out-of-distribution ban drops from pretraining: one
    # epoch is the rest in whole batches of 64, for the demo's 8 epochs.
    with open(root / "data/mine/dataframe.csv", newline="") as f:
        kept = sum(not is_ood_banned(literal_eval(row["categories"])) for row in csv.DictReader(f))
    assert info["steps_per_epoch"] == kept // 64 and info["total_steps"] == 8 * (kept // 64)


def test_the_run_evaluates_on_the_task_file_not_the_synthetic_task(flow):
    root, _ = flow
    run_dir = root / "runs" / "mine"
    assert not (run_dir / "eval_zero_shot.json").exists()  # the synthetic held-out task is not asked for
    total = json.load(open(run_dir / "run_info.json"))["total_steps"]
    rows = metric_writer.read(str(run_dir / "metrics.jsonl"))
    for name in ("transfer_zero_shot", "transfer_linear_probe"):
        report = json.load(open(run_dir / f"eval_{name}.json"))
        assert report["task"] == name and report["step"] == total
        result = json.load(open(run_dir / "transfer" / "mine_test" / f"{name}.json"))
        assert result["task"] == "mine_test"
        # --eval_every 16: in training at 16, 32, ... and at the end; then the README's evaluate
        # (the linear probe at the latest step) appends its own row.
        again = [total] if name == "transfer_linear_probe" else []
        assert sorted(r["step"] for r in rows if f"eval/{name}/aca" in r) == list(range(16, total + 1, 16)) + again
    # 128 test rows, every one a test row of zero-shot (0 % train, 100 % test)
    zero_shot = [r for r in rows if "eval/transfer_zero_shot/num_test" in r]
    assert all(r["eval/transfer_zero_shot/num_test"] == 128 for r in zero_shot)


def test_the_run_writes_tensorboard_and_prints_its_plots(flow):
    root, outputs = flow
    run_dir = root / "runs" / "mine"
    rows = metric_writer.read(str(run_dir / "metrics.jsonl"))
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    # every logged training loss is in TensorBoard at its step
    logged = {(r["step"], r["train/loss"]) for r in rows if "train/loss" in r}
    assert {(s, round(v, 4)) for s, t, v in scalars if t == "train/loss"} == {(s, round(v, 4)) for s, v in logged}
    assert {t for _, t, _ in scalars} >= {"train/lr", "train/logit_scale", "perf/examples_per_sec",
                                          "eval/transfer_zero_shot/aca"}
    for name in ("training_curves.png", "eval_figures.png"):
        assert (run_dir / name).is_file() and f": {run_dir / name}" in outputs[2]
    assert f"tensorboard --logdir {run_dir / 'tensorboard'}" in outputs[2]


def test_evaluate_reads_the_run_directory(flow):
    root, outputs = flow
    rows = metric_writer.read(str(root / "runs/mine/metrics.jsonl"))
    total = json.load(open(root / "runs/mine/run_info.json"))["total_steps"]
    # The README's evaluate (latest checkpoint, no --config) gives the in-training figure of the last step.
    printed = json.loads(outputs[3][outputs[3].index("{"):outputs[3].rindex("}") + 1])
    last = next(r for r in rows if r["step"] == total and "eval/transfer_linear_probe/aca" in r)
    assert printed["transfer_linear_probe"]["aca"] == pytest.approx(last["eval/transfer_linear_probe/aca"], abs=1e-9)
    # --step picks a checkpoint: step 16's figure is the one training logged at step 16.
    code, out = run(["evaluate", "--workdir", "runs/mine", "--step", "16", "--eval", "transfer_zero_shot",
                     "--task", "data/mine_test/task.json", "--data-root", "data/mine_test"], root)
    assert code == 0 and not NOISE.search(out), out[-3000:]
    at_16 = json.loads(out[out.index("{"):out.rindex("}") + 1])["transfer_zero_shot"]
    logged = next(r for r in rows if r["step"] == 16 and "eval/transfer_zero_shot/aca" in r)
    assert at_16["aca"] == pytest.approx(logged["eval/transfer_zero_shot/aca"], abs=1e-9)
    # Overrides still apply to the config read from the run: half the rows as the test split.
    code, out = run(["evaluate", "--workdir", "runs/mine", "--eval", "transfer_zero_shot", "--task",
                     "data/mine_test/task.json", "--data_root", "data/mine_test",
                     "--config.evals.transfer_zero_shot.shots_test=50%"], root)
    assert code == 0, out[-3000:]
    assert 60 <= json.loads(out[out.index("{"):out.rindex("}") + 1])["transfer_zero_shot"]["num_test"] <= 68


def test_predict_reads_the_run_and_its_steps(flow):
    root, _ = flow
    image = "data/mine_test/images/0000001.png"
    outs = {}
    for step in (None, 16):
        target = root / f"pred_{step}.json"
        code, out = run(["predict", "--checkpoint", "runs/mine", "--image", image, "--classes", "normal,glaucoma",
                         "--json", str(target), *(["--step", str(step)] if step else [])], root)
        assert code == 0 and not NOISE.search(out), out[-3000:]
        outs[step] = json.load(open(target))["results"][0]["probs"]
    assert outs[None] != outs[16]  # two checkpoints, two models


def test_help_lists_every_command_with_an_example():
    code, out = run(["--help"], REPO)
    assert code == 0
    for name in commands.COMMANDS:
        assert re.search(rf"^  {name} ", out, re.M) and f"e.g. retina-jax {name} " in out, name
    for name in commands.COMMANDS:
        code, out = run([name, "--help"], REPO, timeout=120)
        assert code == 0 and ("usage" in out.lower() or "flags:" in out) and not NOISE.search(out), (name, out[-800:])


def test_user_mistakes_are_one_line_and_exit_2(flow, tmp_path):
    root, _ = flow
    (tmp_path / "weights.pth").write_text("not a checkpoint")
    shutil.copytree(root / "data" / "mine", tmp_path / "bad")
    first = open(tmp_path / "bad" / "dataframe.csv").read().splitlines()[1].split(",")[1]
    (tmp_path / "bad" / first).write_bytes(b"\x89PNG truncated")
    cases = [
        (["evaluate", "--workdir", "runs/mine", "--step", "3"], "no checkpoint of step 3"),
        (["evaluate", "--workdir", str(tmp_path / "empty")], "no run_info.json"),
        (["predict", "--checkpoint", str(tmp_path / "empty"), "--image", "x.png", "--classes", "a,b"],
         "no such directory"),
        (["train", "--config", "configs/flair.py:demo", "--workdir", str(tmp_path / "w"), "--config.train.epoch=3"],
         "config.train has no field 'epoch'; did you mean epochs"),
        (["train", "--config", "configs/flair.py:dmo", "--workdir", str(tmp_path / "w")], "unknown config argument 'dmo'"),
        (["train", "--config", "configs/flair.py:demo", "--workdir", str(tmp_path / "w"), "--dataset", "x.csv"],
         "expected name=format:path[:image_root]"),
        (["convert", "--from", "flair", str(tmp_path / "weights.pth"), "--out", str(tmp_path / "c")],
         "is not a checkpoint"),
        (["train", "--config", "configs/flair.py:demo", "--workdir", str(tmp_path / "b"), "--dataset",
          f"bad=flair_csv:{tmp_path}/bad/dataframe.csv", *TINY], f"{tmp_path}/bad/dataframe.csv row 0"),
    ]
    for args, message in cases:
        code, out = run(args, root)
        errors = [line for line in out.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and message in errors[0], (args, out[-3000:])
        assert not NOISE.search(out), (args, out[-3000:])


def test_the_main_jobs_first_stage_runs_clean(tmp_path):
    """ViLReF's stage `clip` (the main job's first command), shrunk: nothing but our own lines."""
    code, out = run(["train", "--config", "configs/vilref.py:stage=clip,demo", "--workdir", str(tmp_path / "w"),
                     *TINY, "--config.data.synthetic.size=64", "--config.data.synthetic.image_size=32",
                     "--config.heldout.batch_size=16", "--config.heldout.conditions.size=32"], REPO)
    assert code == 0 and not NOISE.search(out), out[-3000:]


# ---------------------------------------------------------------------------------- in-process units

def test_dataset_flags_parse_to_config_entries():
    name, entry = cli.parse_dataset("mine=flair_csv:/d/x.csv:/d/images")
    assert name == "mine" and entry.to_dict() == {"format": "flair_csv", "path": "/d/x.csv", "image_root": "/d/images",
                                                  "weight": 1.0}
    assert cli.parse_dataset("a=jsonl:/d/a.jsonl")[1].image_root == ""
    for bad in ("x.csv", "a=flair_csv", "=flair_csv:x.csv", "a=flair_csv:x.csv:r:extra", "a=:x.csv"):
        with pytest.raises(ConfigError, match="expected name=format:path"):
            cli.parse_dataset(bad)


def test_flag_names_take_either_spelling_and_values_stay():
    assert commands.normalize_flags(["--image-size=96", "--data-root", "a-b", "-n", "--config.train.log_every=2",
                                     "--classes=mild-dr,x"]) == \
        ["--image_size=96", "--data_root", "a-b", "-n", "--config.train.log_every=2", "--classes=mild-dr,x"]


def test_user_errors_exit_2_and_programming_errors_keep_their_traceback():
    buffer = io.StringIO()
    with redirect_stderr(buffer), pytest.raises(SystemExit) as stop:
        with commands.user_errors():
            raise UserError("config.x: wrong; set --config.x=1")
    assert stop.value.code == 2 and buffer.getvalue() == "error: config.x: wrong; set --config.x=1\n"
    with pytest.raises(ZeroDivisionError):
        with commands.user_errors():
            1 / 0


def test_the_vocabulary_is_learned_from_the_training_files_and_the_tasks(tmp_path):
    """A learned vocabulary reads the run's own data: a word only the CSV's attributes hold and one
    only the task file's descriptions hold are in its texts; the synthetic corpus's reports are not."""
    from test_train import tiny_config

    from retina_jax.data import export, pipeline
    from retina_jax.data.synthetic import CorpusSpec, SyntheticFundus
    from retina_jax.evals import tasks
    corpus = SyntheticFundus(CorpusSpec(seed=3, size=6, image_size=32))
    csv_path = export.write_flair_csv(corpus, str(tmp_path / "mine"))
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    for row in rows[1:]:
        row[2] = str(["zorblaxian"])  # the atributes column
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    task = tasks.load_task(export.write_task(str(tmp_path / "mine")))
    task_path = tmp_path / "task.json"
    tasks.save_task(dataclasses.replace(task, descriptions={**task.descriptions, "glaucoma": ("quorvexine cupping",)}),
                    str(task_path))
    config = tiny_config(**{"data.source": "files", "evals.transfer_zero_shot.task": str(task_path),
                            "evals.transfer_zero_shot.at_end": True})
    with config.data.datasets.unlocked():
        config.data.datasets["mine"] = cli.parse_dataset(f"mine=flair_csv:{csv_path}")[1]
    texts = pipeline.vocabulary_texts(config)
    trained = sum(not is_ood_banned(literal_eval(row[3])) for row in rows[1:])  # FLAIR's ban drops the rest
    assert 0 < trained and texts.count("zorblaxian") == trained and "quorvexine cupping" in texts
    synthetic = pipeline.synthetic_source(config)
    assert not {synthetic.record(i)["report_en"] for i in range(5)} & set(texts)
