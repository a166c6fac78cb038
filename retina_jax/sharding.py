"""Device mesh and shardings from the config (ARCHITECTURE.md: jit with NamedSharding).

The batch is sharded over the `data` axis and parameters are replicated. Axes are created as
`AxisType.Auto`: this jax defaults `make_mesh` to Explicit axes, under which Linen modules fail
with ShardingTypeError.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh(mesh_config) -> Mesh:
    devices = jax.devices()
    n = len(devices) if mesh_config.data == -1 else mesh_config.data
    if not 1 <= n <= len(devices):
        raise ValueError(f"config.mesh.data={mesh_config.data}: {len(devices)} devices available")
    return Mesh(np.asarray(devices[:n]), (DATA,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over the data axis, everything else replicated."""
    return NamedSharding(mesh, P(DATA))


def rows_sharding(mesh: Mesh) -> NamedSharding:
    """For [B, K] logits: rows over the data axis so a device holds [B_local, K]."""
    return NamedSharding(mesh, P(DATA, None))
