"""Entry point: `retina-jax train --config configs/flair.py:demo --workdir DIR`
(= `python -m retina_jax.main`; docs/usage.md, "The retina-jax command").

Any config field can be overridden on the command line (`--config.train.epochs=2`); the config is
locked so a misspelt override is an error, and `validate` runs before anything is built. Datasets
on disk and evaluation tasks can be given by flag (`--dataset`, `--task`; retina_jax/cli.py).
"""
from __future__ import annotations

import json

from absl import logging

from retina_jax import cli


def main(argv):
    trainer = cli.trainer_from_flags(argv)
    result = trainer.train()
    if result:
        print(json.dumps(result, indent=2))
    logging.info("done: %s", trainer.workdir)


def run():
    cli.run_absl(main, __doc__, __name__)


if __name__ == "__main__":
    run()
