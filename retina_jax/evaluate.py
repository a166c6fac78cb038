"""Evaluate a run's latest checkpoint: `python -m retina_jax.evaluate --config ... --workdir ...`.

Runs the evaluations the trainer runs at the end of training (the zero-shot protocol of METHODS.md
section 1 on the held-out synthetic task, and what the config enables: multi-label probe and
fine-tuning, KeepFIT V2's caption metrics; stage `text`'s held-out masked-token accuracy) and prints
the metrics as JSON.
"""
from __future__ import annotations

import json

import jax
from absl import app

from retina_jax import cli


def main(argv):
    trainer = cli.trainer_from_flags(argv)
    state = trainer.restore_latest()
    result = trainer.evaluate(state, step=int(jax.device_get(state.step)))
    task = {} if cli.CONFIG.value.mlm.enabled else {"zero_shot": cli.CONFIG.value.eval.zero_shot.name}
    print(json.dumps({**task, **result}, indent=2))


if __name__ == "__main__":
    app.run(main)
