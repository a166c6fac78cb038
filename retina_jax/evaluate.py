"""Evaluate a run's checkpoint: `retina-jax evaluate --workdir DIR` (= `python -m retina_jax.evaluate`).

The run's config is read from its directory (`run_info.json`, configs/run.py), so nothing of the
training command is repeated; `--config FILE` gives another, and `--config.x=...` overrides apply
either way. `--step N` picks a checkpoint (default the latest).

What runs is the config's `config.evals` entries (docs/architecture.md, "Evaluators"), the same
configuration training reads: without `--eval`, the entries training runs at its end; with `--eval`
(repeatable or a comma list; `all` = every entry that applies to the run's method), the ones named.
Every setting is a config field, set like any other (`--config.evals.transfer_finetune.epochs=5`).
Each evaluator writes `eval_<name>.json` in the workdir; the task-based ones (the transfer suite,
evals/suite.py) also write `<out>/<task>/<name>.json`, `.md` and plots. The metrics are printed as
JSON. For example, a few-shot curve of Tip-Adapter-F over 3 folds:

  retina-jax evaluate --workdir workdirs/flair_demo --eval transfer_tip_adapter_f --shots_train 1,5,10 \
      --shots_test 20% --folds 3

`--task`, `--test_task`, `--shots_train`, `--shots_val`, `--shots_test` and `--folds` are shorthands
that set that field of every entry named by `--eval` that has it (none having it is an error).
`--task` is a shipped task, a held-out synthetic one or a task .json file (evals/tasks.py gives the
format), its images under `--data_root`. `--test_task` adds external test sets (FLAIR's
`--experiment_test`) to the classification protocols, e.g. DeepDRiD's test set after adapting on
its training set:

  retina-jax evaluate --workdir workdirs/flair --data_root /data/FUNDUS \
      --eval transfer_linear_probe --task 37_DeepDRiD_train_eval --test_task 37_DeepDRiD_test
"""
from __future__ import annotations

import json
import os
import sys

import jax
from absl import flags, logging

from retina_jax import cli, commands, evals, plots
from retina_jax.errors import ConfigError

OUT = flags.DEFINE_string("out", None, "Report folder of the task-based evaluators; default <workdir>/transfer.")
STEP = flags.DEFINE_integer("step", None, "The checkpoint to evaluate (a step the run kept); default the latest.")
SHORTHANDS = {
    "test_task": flags.DEFINE_list("test_task", None, "Sets `test_task`: external test task(s) with --task's classes "
                                   "(FLAIR's --experiment_test), scored by each fold's adapter."),
    "shots_train": flags.DEFINE_list("shots_train", None, "Sets `shots_train`: train shots per class, a count or a "
                                     "percentage; several (comma separated) run a few-shot curve."),
    "shots_test": flags.DEFINE_string("shots_test", None, "Sets `shots_test` (count or percentage per class)."),
    "shots_val": flags.DEFINE_string("shots_val", None, "Sets `shots_val` (fine-tuning's early stopping)."),
    "folds": flags.DEFINE_integer("folds", None, "Sets `folds` (seeds 0..folds-1; mean and std over folds)."),
}
RUN_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "run.py")


def selected(config) -> list[str]:
    """The entries `--eval` names, or without it those training runs at its end."""
    names = cli.eval_names(config)
    return [n for n in evals.active(config) if config.evals[n].at_end] if names is None else names


def apply_shorthands(config, names: list[str]) -> None:
    """Write the shorthand flags given into the named entries that have the field (the config is the
    one place settings live)."""
    for field, flag in SHORTHANDS.items():
        if flag.value is None:
            continue
        value = ",".join(flag.value) if isinstance(flag.value, list) else flag.value
        having = [n for n in names if n in config.evals and field in config.evals[n]]
        if not having:
            raise ConfigError(f"--{field} sets config.evals.<name>.{field}, which none of {names} has")
        for name in having:
            config.evals[name][field] = value


def main(argv):
    for flag in (cli.DATASET, cli.EXPERT_DATASET, cli.EVAL_EVERY):
        if flag.value is not None:
            raise ConfigError(f"--{flag.name} is a flag of retina-jax train; evaluate reads the run's datasets "
                              "from its directory")
    given = [f"--{field}" for field, flag in [("task", cli.TASK), *SHORTHANDS.items()] if flag.value is not None]
    if given and not cli.EVAL.value:
        raise ConfigError(f"{given[0]} sets a field of the entries named by --eval: add --eval")
    config = cli.CONFIG.value
    names = selected(config)
    cli.apply_eval_flags(config, names)
    apply_shorthands(config, names)
    # Before any model is built: what cannot run is one message, exit code 2.
    chosen = evals.build(config, names, out_dir=OUT.value or os.path.join(cli.WORKDIR.value, "transfer"),
                         data_root=config.eval_data_root or None)
    trainer = cli.trainer(config, cli.WORKDIR.value, argv)
    state = trainer.restore_latest(STEP.value)
    step = int(jax.device_get(state.step))
    logging.info("evaluating step %d of %s: %s", step, trainer.workdir, ", ".join(names))
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
    trainer.writer.close()
    plots.report(trainer.workdir)  # the evaluation rows just written join the run's plots
    print(json.dumps(results, indent=2))


def with_run_config(argv: list[str]) -> list[str]:
    """Without --config, the run directory's own config (configs/run.py:WORKDIR), so that
    `--config.x=...` overrides apply to it."""
    argv = commands.normalize_flags(argv)
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        return argv
    workdir = next((a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")), None)
    if workdir is None and "--workdir" in argv[:-1]:
        workdir = argv[argv.index("--workdir") + 1]
    if workdir is None:
        return argv  # absl reports the missing --workdir
    return [argv[0], f"--config={RUN_CONFIG}:{os.path.abspath(workdir)}", *argv[1:]]


def run():
    sys.argv = with_run_config(sys.argv)
    cli.run_absl(main, __doc__, __name__)


if __name__ == "__main__":
    run()
