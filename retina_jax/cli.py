"""Flags shared by the command-line entry points (`retina_jax.main`, `retina_jax.evaluate`).

`--config path.py[:arg]` (locked, so a misspelt `--config.x=...` override is an error) and
`--workdir`; `trainer_from_flags` validates and builds the one Trainer both entry points use.
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/flair.py:demo.",
                                         lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, tokenizer, evals.")
flags.mark_flags_as_required(["config", "workdir"])


def trainer_from_flags(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from retina_jax import distributed
    from retina_jax.metric_writer import quiet_library_logs
    from retina_jax.train import Trainer

    # Before anything touches a device: one process per host joins the pod's runtime (a no-op alone).
    distributed.initialize()
    quiet_library_logs()
    return Trainer(CONFIG.value, WORKDIR.value)
