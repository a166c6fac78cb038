"""The evaluator interface and registry (docs/architecture.md, "Evaluators"; big_vision's evaluator
shape): every evaluation is a class registered under its `type`, configured by one
`config.evals.<name>` entry (`type`, `every_steps`, `at_end` and the type's settings, whose
defaults are in configs/common.py `EVALUATORS`), and run on the public `Encoder`, never the trainer.

`run(encoder)` returns (metrics, report extras). The trainer logs the metrics as
`eval/<report_name>/<metric>` and writes `eval_<report_name>.json`; the task-based evaluators
(evals/suite.py) also write a Markdown report with plots under `out_dir/<task>/`.
"""
from __future__ import annotations

import importlib

from configs import common
from retina_jax.errors import ConfigError

BASE_FIELDS = ("type", "every_steps", "at_end")
REGISTRY: dict[str, type] = {}


def register(cls):
    """Class decorator: the evaluator class of its `type` (one per type)."""
    if cls.type in REGISTRY:
        raise ValueError(f"evaluator type {cls.type!r} registered twice")
    REGISTRY[cls.type] = cls
    return cls


class Evaluator:
    type: str = ""
    prefix: str | None = None  # of its metrics in the flat dict `Trainer.evaluate` returns; None: '<name>/'

    def __init__(self, config, name: str, settings, *, out_dir: str | None = None, data_root: str | None = None):
        self.config, self.name, self.settings = config, name, settings
        self.out_dir, self.data_root = out_dir, data_root

    @property
    def report_name(self) -> str:
        return self.name

    @property
    def metric_prefix(self) -> str:
        return f"{self.name}/" if self.prefix is None else self.prefix

    @classmethod
    def check(cls, config, name: str, settings) -> list[str]:
        """Errors ('config.evals.<name>.<field>: why') that make this entry unable to run on `config`."""
        return []

    def run(self, encoder) -> tuple[dict, dict]:
        raise NotImplementedError


def _registry() -> dict[str, type]:
    # The evaluator modules import the data pipeline and the models; they register on first use.
    for module in ("retina_jax.evals.evaluators", "retina_jax.evals.suite"):
        importlib.import_module(module)
    return REGISTRY


def make(config, type_: str, *, name: str | None = None, out_dir: str | None = None, data_root: str | None = None,
         **settings) -> Evaluator:
    """An evaluator of `type_` outside `config.evals` (notebooks, tests): its default settings
    (configs/common.py) with `settings` overridden, named `name` (default: the type)."""
    entry = common.evaluator(type_, **settings)
    return _registry()[type_](config, name or type_, entry, out_dir=out_dir, data_root=data_root)


def entry_errors(config, name: str) -> list[str]:
    """What is wrong with `config.evals.<name>` as an entry (type, fields), before its own checks."""
    where = f"config.evals.{name}"
    settings = config.evals[name]
    if not hasattr(settings, "keys") or "type" not in settings:
        return [f"{where}: an entry needs a type (configs/common.py evaluator(type, ...))"]
    kind = settings.type
    if kind not in _registry():
        return [f"{where}.type: unknown evaluator type {kind!r}; known: {sorted(REGISTRY)}"]
    want = set(BASE_FIELDS) | set(common.EVALUATORS[kind])
    missing, unknown = sorted(want - set(settings.keys())), sorted(set(settings.keys()) - want)
    if missing or unknown:
        return [f"{where}: type {kind!r} has the fields {sorted(want)}; missing {missing}, unknown {unknown} "
                "(build entries with configs/common.py evaluator())"]
    if not isinstance(settings.every_steps, int) or settings.every_steps < 0:
        return [f"{where}.every_steps: {settings.every_steps!r} must be an int >= 0 (0 = not during training)"]
    return []


def active(config) -> list[str]:
    """The entries training runs (every_steps > 0 or at_end), in config order."""
    return [name for name in config.evals.keys()
            if config.evals[name].every_steps > 0 or config.evals[name].at_end]


def check(config) -> list[str]:
    """Errors of every entry, and the own checks of those training runs (`validate`)."""
    errors = [e for name in config.evals.keys() for e in entry_errors(config, name)]
    if errors:
        return errors
    for name in active(config):
        errors += REGISTRY[config.evals[name].type].check(config, name, config.evals[name])
    return errors


def build(config, names=None, *, out_dir: str | None = None, data_root: str | None = None) -> list[Evaluator]:
    """The evaluators of `names` (default: those training runs), in that order; an unknown name or an
    entry that cannot run on `config` raises ConfigError naming it. `data_root` '' or None: none."""
    names = active(config) if names is None else list(names)
    errors = []
    for name in names:
        if name not in config.evals:
            errors.append(f"config.evals.{name}: no such entry; entries: {sorted(config.evals.keys())}")
            continue
        found = entry_errors(config, name)
        errors += found or REGISTRY[config.evals[name].type].check(config, name, config.evals[name])
    if errors:
        raise ConfigError("cannot evaluate:\n  " + "\n  ".join(errors))
    return [REGISTRY[config.evals[n].type](config, n, config.evals[n], out_dir=out_dir, data_root=data_root or None)
            for n in names]
