"""Flags shared by the absl entry points (`retina-jax train` = `retina_jax.main`, `retina-jax evaluate`
= `retina_jax.evaluate`; docs/usage.md, "Your data from the command line" and "Evaluation tasks").

`--config path.py[:arg]` is locked, so a misspelt `--config.x=...` override is an error. Datasets on
disk come from config files (`data.datasets`) or from `--dataset name=format:path[:image_root]`
(repeatable; `--expert_dataset` for KeepFIT's expert stream); evaluations from `--eval` (the
`config.evals` entries to run), `--task` (their task: a shipped name or a task .json file) and
`--data_root` (where a task's images are). All of them end up as config fields, which `validate`
checks as it checks a config file.
"""
from __future__ import annotations

import os

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from retina_jax import evals
from retina_jax.errors import ConfigError

CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/flair.py:demo.",
                                         lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, tokenizer, evals.")
flags.mark_flag_as_required("workdir")
DATASET = flags.DEFINE_multi_string(
    "dataset", None, "A training dataset on disk, name=format:path[:image_root] (repeatable), e.g. "
    "mine=flair_csv:data/mine/dataframe.csv:data/mine; sets data.source='files'.")
EXPERT_DATASET = flags.DEFINE_multi_string(
    "expert_dataset", None, "An expert image-caption dataset (KeepFIT's stream), name=format:path[:image_root].")
EVAL = flags.DEFINE_multi_string("eval", None, "config.evals entries to run, repeatable or comma separated ('all' = "
                                 "every entry that applies to this run); default: those training runs at its end.")
TASK = flags.DEFINE_string("task", None, "The task of every --eval entry that has one: a held-out synthetic task of "
                           "the config, a task of retina_jax.evals.tasks or a task .json file (with --data_root).")
EVAL_EVERY = flags.DEFINE_integer("eval_every", None, "train: also run the --eval entries every this many steps "
                                  "during training (their every_steps).")
DATA_ROOT = flags.DEFINE_string("data_root", None, "Root folder of the task's images (config.eval_data_root).")

# `dataset` formats: retina_jax/data/files.py FORMATS.
DATASET_SYNTAX = "name=format:path[:image_root]"


def parse_dataset(spec: str, flag: str = "--dataset") -> tuple[str, ml_collections.ConfigDict]:
    """`mine=flair_csv:data/mine.csv:data/images` -> ('mine', {format, path, image_root}); the format
    and the files are checked by `validate` and the dataset reader, as for a config file."""
    name, sep, rest = spec.partition("=")
    parts = rest.split(":")
    if not sep or not name.strip() or len(parts) not in (2, 3) or not all(p.strip() for p in parts):
        raise ConfigError(f"{flag} {spec!r}: expected {DATASET_SYNTAX}, e.g. "
                          "mine=flair_csv:data/mine/dataframe.csv:data/mine")
    fmt, path, *root = (p.strip() for p in parts)
    return name.strip(), ml_collections.ConfigDict(
        {"format": fmt, "path": os.path.abspath(path), "image_root": os.path.abspath(root[0]) if root else "",
         "weight": 1.0})


def eval_names(config) -> list[str] | None:
    """The entries `--eval` names (`all`: every entry whose checks pass on this config); None without --eval."""
    if not EVAL.value:
        return None
    names = [name.strip() for value in EVAL.value for name in value.split(",") if name.strip()]
    if names == ["all"]:
        from retina_jax.evals import base
        return [n for n in config.evals.keys()
                if not base.entry_errors(config, n) and not base.REGISTRY[config.evals[n].type].check(
                    config, n, config.evals[n])]
    unknown = [n for n in names if n not in config.evals]
    if unknown:
        raise ConfigError(f"config.evals.{unknown[0]}: no such entry (--eval); entries: {', '.join(config.evals.keys())}")
    return names


def apply_data_flags(config) -> None:
    """--dataset / --expert_dataset into `data.datasets` / `data.expert.datasets` (data.source='files')."""
    for specs, field, target in ((DATASET.value, "--dataset", config.data.datasets),
                                 (EXPERT_DATASET.value, "--expert_dataset", config.data.expert.datasets)):
        for spec in specs or ():
            name, entry = parse_dataset(spec, field)
            with target.unlocked():
                target[name] = entry
    if DATASET.value:
        config.data.source = "files"


def apply_eval_flags(config, names: list[str] | None) -> None:
    """`--task` and `--data_root` into the named entries and `config.eval_data_root`."""
    if DATA_ROOT.value:
        config.eval_data_root = os.path.abspath(DATA_ROOT.value)
    if TASK.value is None:
        return
    having = [n for n in names or () if "task" in config.evals[n]]
    if not having:
        raise ConfigError(f"--task sets config.evals.<name>.task, which none of {names or '(no --eval)'} has: "
                          "name task-based entries with --eval (e.g. transfer_zero_shot, transfer_linear_probe)")
    for name in having:
        config.evals[name].task = TASK.value


def train_config():
    """The config of `retina-jax train`: the file, its overrides, the data flags and the evaluation
    flags. With --eval (or --task), exactly the entries named run, at the end of training and
    every --eval_every steps; on datasets from disk
    without --eval, no evaluation runs on the held-out synthetic corpora (they test nothing about
    the user's data; --eval zero_shot asks for it)."""
    from retina_jax.evals import suite
    config = CONFIG.value
    apply_data_flags(config)
    names = eval_names(config)
    if names is None and TASK.value is not None:
        names = suite.default_entries(config, TASK.value)
    apply_eval_flags(config, names)
    if EVAL_EVERY.value is not None and names is None:
        raise ConfigError("--eval_every sets every_steps of the entries named by --eval (or run on --task): add one")
    if names is not None:
        for name in config.evals.keys():  # exactly the entries named run, in training and at its end
            entry = config.evals[name]
            entry.at_end = name in names
            entry.every_steps = (entry.every_steps if EVAL_EVERY.value is None else EVAL_EVERY.value) \
                if name in names else 0
    elif config.data.source == "files":
        off = [n for n in evals.active(config) if suite.runs_on_synthetic(config, n)]
        for name in off:
            config.evals[name].at_end, config.evals[name].every_steps = False, 0
        if off:
            logging.info("training on datasets from disk: no evaluation on the synthetic held-out task (%s); "
                         "--task FILE evaluates on yours, --eval %s asks for it", ", ".join(off), off[0])
    return config


def trainer(config, workdir: str, argv):
    """The Trainer both entry points use, after the multi-process runtime is joined."""
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {argv[1:]} (flags start with --)")
    from retina_jax import distributed
    from retina_jax.metric_writer import quiet_library_logs
    from retina_jax.train import Trainer

    # Before anything touches a device: one process per host joins the pod's runtime (a no-op alone).
    distributed.initialize()
    quiet_library_logs()
    return Trainer(config, workdir)


def trainer_from_flags(argv):
    """`retina-jax train`'s Trainer: `train_config()` in `--workdir`."""
    if CONFIG.value is None:
        raise ConfigError("--config is required, e.g. --config configs/flair.py:demo")
    return trainer(train_config(), WORKDIR.value, argv)
