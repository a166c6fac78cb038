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

import difflib
import os

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from retina_jax import commands, evals
from retina_jax import config as config_lib
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


# The last line of a config file's traceback that config_flags wraps into its flag error: these
# exception types are the user's (a wrong config argument or file); others are a bug in the file.
_USER_EXCEPTIONS = ("ConfigError", "ValueError", "FileNotFoundError", "KeyError", "DataError", "CheckpointError")


def flag_error_line(message: str) -> str | None:
    """absl's flag error as one line, or None when it wraps a config file's programming error."""
    if "Traceback (most recent call last)" not in message:
        return message.strip().splitlines()[0] + "  (--help lists the flags)"
    head = message.strip().splitlines()[0].rstrip(":")
    last = [line.strip() for line in message.strip().splitlines() if line.strip()][-1]
    kind, _, text = last.partition(": ")
    if kind.rsplit(".", 1)[-1] not in _USER_EXCEPTIONS:
        return None
    return f"{head.split(': Error whilst')[0]}: {text.strip(chr(34) + chr(39))}"


def bad_override(argv) -> str:
    """The first `--config.a.b=...` override that names no field, with the closest field names."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None and "--config" in argv[:-1]:
        spec = argv[argv.index("--config") + 1]
    config = config_lib.load(spec) if spec else None
    for arg in argv:
        if not arg.startswith("--config.") or config is None:
            continue
        path = arg[len("--config."):].partition("=")[0].split(".")
        node = config
        for depth, key in enumerate(path):
            if not hasattr(node, "keys") or key not in node:
                near = difflib.get_close_matches(key, list(node.keys()) if hasattr(node, "keys") else [], n=3)
                where = ".".join(["config", *path[:depth]])
                return (f"--config.{'.'.join(path)}: {where} has no field {key!r}"
                        + (f"; did you mean {', '.join(near)}?" if near else ""))
            node = node[key]
    return "a --config.<field> override names no config field"


def absl_help(doc: str, module: str) -> str:
    """A command's docstring and its flags: those of retina_jax/cli.py and of its own module (absl's
    --help lists only the flags of `__main__`, which under `retina-jax` is this dispatcher)."""
    by_module = flags.FLAGS.flags_by_module_dict()
    parts = [doc.strip(), "", "flags:"]
    for name in dict.fromkeys(("retina_jax.cli", module, "__main__")):
        if name in by_module:
            parts.append(flags.FLAGS.module_help(name))
    return "\n".join(parts)


def run_absl(main, doc: str, module: str) -> None:
    """`absl.app.run(main)` with the flag style, a --help of the command's own flags (`absl_help`)
    and the user-error rule: a bad flag, config file argument or override is one `error:` line and
    exit code 2 (absl's own would print a usage block, or a traceback for a misspelt override)."""
    from absl import app

    def parse(argv):
        argv = commands.normalize_flags(argv)
        if any(a in ("-h", "--help", "--helpshort") for a in argv[1:]):
            print(absl_help(doc, module))
            raise SystemExit(0)
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            line = flag_error_line(str(e))
            if line is None:
                raise
            raise SystemExit(commands.report_user_error(line)) from None
        except (AttributeError, KeyError):  # config_flags on an override of a field that does not exist
            raise SystemExit(commands.report_user_error(bad_override(argv))) from None

    def guarded(argv):
        with commands.user_errors():
            return main(argv)

    app.run(guarded, flags_parser=parse)
