"""Evaluate a run's latest checkpoint: `python -m retina_jax.evaluate --config ... --workdir ...`.

Without `--protocol`: runs the evaluations the trainer runs at the end of training (the zero-shot
protocol of docs/methods.md, "FLAIR", on the held-out synthetic task, and what the config enables:
multi-label probe and fine-tuning, KeepFIT V2's caption metrics; stage `text`'s held-out
masked-token accuracy) and prints the metrics as JSON.

With `--protocol` (repeatable or a comma list; `all` = every protocol of `evals.suite.PROTOCOLS`):
runs the transfer suite (evals/suite.py) and writes `<out>/<task>/<protocol>.json`, `.md` and plots,
then prints a JSON summary. For example, a few-shot curve of Tip-Adapter-F over 3 folds:

  python -m retina_jax.evaluate --config configs/flair.py:demo --workdir workdirs/flair_demo \
      --protocol tip_adapter_f --shots_train 1,5,10 --shots_test 20% --folds 3

`--task` defaults to each protocol's held-out synthetic task; `--option key=value` sets a protocol
hyperparameter (`evals.suite.Options`, e.g. `--option finetune_epochs=5`). `--test_task` adds external
test sets (FLAIR's `--experiment_test`) to the classification protocols, e.g. DeepDRiD's test set after
adapting on its training set:

  python -m retina_jax.evaluate --config configs/flair.py --workdir workdirs/flair --data_root /data/FUNDUS \
      --protocol linear_probe --task 37_DeepDRiD_train_eval --test_task 37_DeepDRiD_test
"""
from __future__ import annotations

import json
import os

import jax
from absl import app, flags

from retina_jax import cli
from retina_jax.evals import suite

PROTOCOL = flags.DEFINE_multi_string("protocol", None, "Transfer protocol(s), repeatable or comma separated "
                                     "('all' = every one); default: the trainer's own evaluation.")
TASK = flags.DEFINE_string("task", None, "Task for every protocol: a held-out synthetic task of the config or a "
                           "public task of retina_jax.evals.tasks (with --data_root); default: per protocol.")
TEST_TASK = flags.DEFINE_list("test_task", None, "External test task(s) with --task's classes (FLAIR's "
                              "--experiment_test), scored by each fold's adapter of the classification protocols.")
DATA_ROOT = flags.DEFINE_string("data_root", None, "Root folder of a public task's images.")
SHOTS_TRAIN = flags.DEFINE_list("shots_train", None, "Train shots per class, a count or a percentage; several "
                                "(comma separated) run a few-shot curve.")
SHOTS_TEST = flags.DEFINE_string("shots_test", None, "Test shots per class (count or percentage).")
SHOTS_VAL = flags.DEFINE_string("shots_val", None, "Validation shots per class (fine-tuning's early stopping).")
FOLDS = flags.DEFINE_integer("folds", None, "Folds (seeds 0..folds-1); results are the mean and std over folds.")
OUT = flags.DEFINE_string("out", None, "Report folder; default <workdir>/transfer.")
OPTION = flags.DEFINE_multi_string("option", [], "Protocol hyperparameter key=value (evals.suite.Options).")


def _protocols() -> list[str]:
    names = [name.strip() for value in PROTOCOL.value for name in value.split(",") if name.strip()]
    return list(suite.PROTOCOLS) if names == ["all"] else names


def run_suite(trainer, state) -> dict:
    """Run the `--protocol`s, each on its task, sharing a task's model outputs; returns the summary."""
    options = suite.Options.parse(OPTION.value)
    protocols = _protocols()
    for name in protocols:
        suite.get_protocol(name)  # unknown names fail before any work
    out_dir = OUT.value or os.path.join(trainer.workdir, "transfer")
    tasks, features, summary = {}, {}, {}
    encoder = trainer.encoder.at(state.params, state.batch_stats)

    def load(name):
        if name not in tasks:
            tasks[name] = suite.load_task(trainer.config, name, DATA_ROOT.value, options)
            features[name] = suite.TaskFeatures(trainer.config, encoder, tasks[name])
        return features[name]

    for protocol in protocols:
        name = TASK.value or suite.default_task(trainer.config, protocol)
        # External test sets belong to the classification protocols (the others run without them).
        per_fold = suite.get_protocol(protocol).per_fold
        externals = [load(n) for n in TEST_TASK.value or ()] if per_fold else []
        result = suite.run_protocol(trainer.config, encoder, protocol, load(name).task, out_dir,
                                    checkpoint=trainer.workdir, step=int(jax.device_get(state.step)),
                                    shots_train=SHOTS_TRAIN.value,
                                    shots_test=SHOTS_TEST.value, shots_val=SHOTS_VAL.value, folds=FOLDS.value,
                                    options=options, features=load(name), externals=externals)
        entry = {"task": name, "report": result["report"]["markdown"], "seconds": round(result["seconds"], 2)}
        if "settings" in result:
            entry["settings"] = [{"shots_train": s["shots_train"], **s.get("mean", {}),
                                  **{f"external/{t}": e["mean"] for t, e in s.get("external", {}).items()}}
                                 for s in result["settings"]]
        else:
            entry["metrics"] = result["metrics"]
        summary[protocol] = entry
    return summary


def main(argv):
    suite_flags = [flag for flag in (TASK, TEST_TASK, DATA_ROOT, SHOTS_TRAIN, SHOTS_TEST, SHOTS_VAL, FOLDS, OUT)
                   if flag.value is not None] + ([OPTION] if OPTION.value else [])
    if suite_flags and not PROTOCOL.value:
        raise app.UsageError(f"--{suite_flags[0].name} applies to the transfer suite: add --protocol")
    trainer = cli.trainer_from_flags(argv)
    state = trainer.restore_latest()
    if PROTOCOL.value:
        print(json.dumps(run_suite(trainer, state), indent=2))
        return
    result = trainer.evaluate(state, step=int(jax.device_get(state.step)))
    task = {} if cli.CONFIG.value.mlm.enabled else {"zero_shot": cli.CONFIG.value.eval.zero_shot.name}
    print(json.dumps({**task, **result}, indent=2))


if __name__ == "__main__":
    app.run(main)
