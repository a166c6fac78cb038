"""The pretraining methods, chosen by `config.method` (docs/architecture.md, "Methods").

Adding one: a module here with a `Method` subclass (methods/base.py), an entry below, and a config
file under configs/ that sets `c.method`.
"""
from __future__ import annotations

from retina_jax.errors import ConfigError
from retina_jax.methods.base import FEATURES, Method
from retina_jax.methods.flair import Flair
from retina_jax.methods.keepfit import KeepFIT
from retina_jax.methods.keepfit_v2 import VisionLanguageStage as KeepFITV2
from retina_jax.methods.vilref import ViLReF

METHODS: dict[str, type[Method]] = {"flair": Flair, "keepfit": KeepFIT, "keepfit_v2": KeepFITV2, "vilref": ViLReF}


def _unknown(config) -> str:
    return f"config.method: {config.method!r} not in {tuple(METHODS)}"


def method_class(config) -> type[Method]:
    """The class that trains `config` (its stage's, for a method with stages)."""
    if config.method not in METHODS:
        raise ConfigError(f"invalid config:\n  {_unknown(config)}")
    return METHODS[config.method].for_config(config)


def check(config, num_devices: int) -> list[str]:
    """Config errors of `config.method`: an unknown method, a part only other methods use (each
    named with the methods that own it), then the method's own rules."""
    if config.method not in METHODS:
        return [_unknown(config)]
    cls = method_class(config)
    errors = []
    for field, on in FEATURES.items():
        if on(config) and field not in cls.features:
            owners = ", ".join(sorted({c.name for m in METHODS.values() for c in (m, *m.stages) if field in c.features}))
            errors.append(f"config.{field}: method {cls.name!r} has no use for it (set config.method to one that "
                          f"does: {owners})")
    return errors + cls.check(config, num_devices)
