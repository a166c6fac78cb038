"""Evaluate a run's latest checkpoint: `python -m retina_jax.evaluate --config ... --workdir ...`.

What runs is the config's `config.evals` entries (docs/architecture.md, "Evaluators"), the same
configuration training reads: without `--eval`, the entries training runs at its end; with `--eval`
(repeatable or a comma list; `all` = every entry that applies to the run's method), the ones named.
Every setting is a config field, set like any other (`--config.evals.transfer_finetune.epochs=5`).
Each evaluator writes `eval_<name>.json` in the workdir; the task-based ones (the transfer suite,
evals/suite.py) also write `<out>/<task>/<name>.json`, `.md` and plots. The metrics are printed as
JSON. For example, a few-shot curve of Tip-Adapter-F over 3 folds:

  python -m retina_jax.evaluate --config configs/flair.py:demo --workdir workdirs/flair_demo \
      --eval transfer_tip_adapter_f --shots_train 1,5,10 --shots_test 20% --folds 3

`--task`, `--test_task`, `--shots_train`, `--shots_val`, `--shots_test` and `--folds` are shorthands
that set that field of every entry named by `--eval` that has it (none having it is an error).
`--test_task` adds external test sets (FLAIR's `--experiment_test`) to the classification protocols,
e.g. DeepDRiD's test set after adapting on its training set:

  python -m retina_jax.evaluate --config configs/flair.py --workdir workdirs/flair --data_root /data/FUNDUS \
      --eval transfer_linear_probe --task 37_DeepDRiD_train_eval --test_task 37_DeepDRiD_test
"""
from __future__ import annotations

import json
import os

import jax
from absl import app, flags

from retina_jax import cli, evals
from retina_jax.errors import ConfigError

EVAL = flags.DEFINE_multi_string("eval", None, "config.evals entries to run, repeatable or comma separated ('all' = "
                                 "every entry that applies to this run); default: those training runs at its end.")
DATA_ROOT = flags.DEFINE_string("data_root", None, "Root folder of a public task's images.")
OUT = flags.DEFINE_string("out", None, "Report folder of the task-based evaluators; default <workdir>/transfer.")
SHORTHANDS = {
    "task": flags.DEFINE_string("task", None, "Sets `task` of every --eval entry: a held-out synthetic task of the "
                                "config or a public task of retina_jax.evals.tasks (with --data_root)."),
    "test_task": flags.DEFINE_list("test_task", None, "Sets `test_task`: external test task(s) with --task's classes "
                                   "(FLAIR's --experiment_test), scored by each fold's adapter."),
    "shots_train": flags.DEFINE_list("shots_train", None, "Sets `shots_train`: train shots per class, a count or a "
                                     "percentage; several (comma separated) run a few-shot curve."),
    "shots_test": flags.DEFINE_string("shots_test", None, "Sets `shots_test` (count or percentage per class)."),
    "shots_val": flags.DEFINE_string("shots_val", None, "Sets `shots_val` (fine-tuning's early stopping)."),
    "folds": flags.DEFINE_integer("folds", None, "Sets `folds` (seeds 0..folds-1; mean and std over folds)."),
}


def selected(config) -> list[str]:
    """The entries `--eval` names (`all`: every entry whose checks pass on this config)."""
    if not EVAL.value:
        return [n for n in evals.active(config) if config.evals[n].at_end]
    names = [name.strip() for value in EVAL.value for name in value.split(",") if name.strip()]
    if names == ["all"]:
        from retina_jax.evals import base
        return [n for n in config.evals.keys()
                if not base.entry_errors(config, n) and not base.REGISTRY[config.evals[n].type].check(
                    config, n, config.evals[n])]
    return names


def apply_shorthands(config, names: list[str]) -> None:
    """Write the shorthand flags given into the named entries that have the field (the config is the
    one place settings live)."""
    for field, flag in SHORTHANDS.items():
        if flag.value is None:
            continue
        value = ",".join(flag.value) if isinstance(flag.value, list) else flag.value
        having = [n for n in names if n in config.evals and field in config.evals[n]]
        if not having:
            raise app.UsageError(f"--{field} sets config.evals.<name>.{field}, which none of {names} has", exitcode=2)
        for name in having:
            config.evals[name][field] = value


def main(argv):
    given = [f"--{field}" for field, flag in SHORTHANDS.items() if flag.value is not None]
    if given and not EVAL.value:
        raise app.UsageError(f"{given[0]} sets a field of the entries named by --eval: add --eval", exitcode=2)
    config = cli.CONFIG.value
    names = selected(config)
    apply_shorthands(config, names)
    try:  # before any model is built: what cannot run is one message, exit code 2
        chosen = evals.build(config, names, out_dir=OUT.value or os.path.join(cli.WORKDIR.value, "transfer"),
                             data_root=DATA_ROOT.value)
    except ConfigError as e:
        raise app.UsageError(str(e), exitcode=2) from e
    trainer = cli.trainer_from_flags(argv)
    state = trainer.restore_latest()
    step = int(jax.device_get(state.step))
    results = {}
    for evaluator in chosen:
        metrics = trainer.evaluate(state, step=step, evaluators=[evaluator])
        prefix = evaluator.metric_prefix
        results[evaluator.name] = {k[len(prefix):]: v for k, v in metrics.items()}
        if jax.process_index() == 0:  # the one that writes the reports
            with open(os.path.join(trainer.workdir, f"eval_{evaluator.report_name}.json")) as f:
                written = json.load(f)
            if "report" in written:
                results[evaluator.name]["report"] = written["report"]["markdown"]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    app.run(main)
