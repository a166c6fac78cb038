"""Entry point: `python -m retina_jax.main --config configs/flair.py:demo --workdir DIR`.

Any config field can be overridden on the command line (`--config.train.epochs=2`); the config is
locked so a misspelt override is an error, and `validate` runs before anything is built.
"""
from __future__ import annotations

import json

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/flair.py:demo.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, tokenizer, evals.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from retina_jax.metrics import quiet_library_logs
    from retina_jax.train import Trainer

    quiet_library_logs()

    trainer = Trainer(_CONFIG.value, _WORKDIR.value)
    result = trainer.train()
    if result:
        print(json.dumps({"zero_shot": _CONFIG.value.eval.zero_shot.name, **result}, indent=2))
    logging.info("done: %s", _WORKDIR.value)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
