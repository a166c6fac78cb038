"""The train state: everything a checkpoint must hold to continue a run exactly.

Every field is a pytree updated inside the jitted step and saved and restored with the rest.
ViLReF's momentum encoders and queues (docs/methods.md, "ViLReF") live here too: `ema_params` has the
tree (and shardings) of `params`, `queues` the replicated `momentum.Queues`; both are empty trees
(`{}`) for methods without them.
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
    ema_params: Any = flax.struct.field(default_factory=dict)  # momentum (EMA) copy of params, or {}
    queues: Any = flax.struct.field(default_factory=dict)  # momentum.Queues, or {}
