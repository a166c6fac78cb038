"""Evaluate a run's latest checkpoint: `python -m retina_jax.evaluate --config ... --workdir ...`.

Runs the zero-shot protocol of METHODS.md section 1 on the held-out synthetic task (the same
evaluation the trainer runs at the end of training) and prints the metrics as JSON.
"""
from __future__ import annotations

import json

import jax
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory holding checkpoints/.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from retina_jax.metrics import quiet_library_logs
    from retina_jax.train import Trainer

    quiet_library_logs()

    trainer = Trainer(_CONFIG.value, _WORKDIR.value)
    state = trainer.restore_latest()
    result = trainer.evaluate(state, step=int(jax.device_get(state.step)))
    print(json.dumps({"zero_shot": _CONFIG.value.eval.zero_shot.name, **result}, indent=2))


if __name__ == "__main__":
    app.run(main)
