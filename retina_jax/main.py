"""Entry point: `python -m retina_jax.main --config configs/flair.py:demo --workdir DIR`.

Any config field can be overridden on the command line (`--config.train.epochs=2`); the config is
locked so a misspelt override is an error, and `validate` runs before anything is built.
"""
from __future__ import annotations

import json

from absl import app, logging

from retina_jax import cli


def main(argv):
    result = cli.trainer_from_flags(argv).train()
    if result:
        print(json.dumps({"zero_shot": cli.CONFIG.value.heldout.conditions.name, **result}, indent=2))
    logging.info("done: %s", cli.WORKDIR.value)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
