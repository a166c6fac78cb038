"""The train state: everything a checkpoint must hold to continue a run exactly.

Later methods add fields (ViLReF's EMA params and queues) with the same discipline: every field is
a pytree leaf updated inside the jitted step, saved and restored with the rest.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 scalar, the number of optimizer steps taken
    params: Any
    batch_stats: Any  # BatchNorm running statistics of the image tower
    opt_state: Any
    rng: jax.Array  # base key; the step's key is fold_in(rng, step), so a resume redraws identically
