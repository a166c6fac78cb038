"""Device mesh and shardings from the config (docs/architecture.md, "Sharding and checkpoints").

The mesh has two axes, `data` x `fsdp` (`config.mesh`). The batch is sharded over both (every
device holds B / (data * fsdp) rows), and so are the rows of the contrastive logits, so a device
holds a `[B_local, B]` block and never the whole `[B, B]` matrix (losses.py).

Parameters follow `config.mesh.param_sharding`:
- 'replicate': every device holds every parameter (plain data parallelism);
- 'fsdp': each tensor of at least `mesh.fsdp_min_size` elements is split along its largest
  dimension divisible by the `fsdp` axis size (ZeRO-3 / FSDP); smaller or indivisible tensors stay
  replicated. The rule depends on a tensor's shape alone, so the optimizer state (Adam's moments)
  and the momentum encoder's EMA parameters, which have the parameters' shapes, are sharded
  exactly like the parameters they follow. XLA all-gathers each layer's parameters where the
  step uses them and reduce-scatters their gradients.
BatchNorm statistics, the RNG, the step counter and ViLReF's queues are always replicated: the
queues are read whole by every device's rows of the loss (docs/methods.md, "ViLReF").

Axes are created as `AxisType.Auto`: this jax defaults `make_mesh` to Explicit axes, under which
Linen modules fail with ShardingTypeError.
"""
from __future__ import annotations

import math

import jax
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
FSDP = "fsdp"
BATCH_AXES = (DATA, FSDP)  # the batch dimension is split over both axes
PARAM_SHARDINGS = ("replicate", "fsdp")


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
    """(data, fsdp) sizes; `mesh.data = -1` takes every device the `fsdp` axis leaves."""
    fsdp = mesh_config.fsdp
    data = num_devices // max(fsdp, 1) if mesh_config.data == -1 else mesh_config.data
    return data, fsdp


def batch_devices(mesh_config, num_devices: int) -> int:
    """Devices the global batch is split over (data x fsdp)."""
    data, fsdp = mesh_shape(mesh_config, num_devices)
    return data * fsdp


def make_mesh(mesh_config) -> Mesh:
    """The `data` x `fsdp` mesh laid out by `jax.make_mesh` from the device topology (neighbouring
    chips on the fast `fsdp` axis), not in `jax.devices()` list order.

    A mesh smaller than the machine (an explicit `mesh.data`) runs on the first devices with a
    warning naming how many sit idle; with several processes it is refused, since every process
    must hold its part of the mesh.
    """
    devices = jax.devices()
    data, fsdp = mesh_shape(mesh_config, len(devices))
    if data < 1 or fsdp < 1 or data * fsdp > len(devices):
        raise ValueError(f"config.mesh: data={mesh_config.data} x fsdp={mesh_config.fsdp} needs "
                         f"{data * fsdp} devices, {len(devices)} available")
    auto = (AxisType.Auto, AxisType.Auto)
    if data * fsdp == len(devices):
        return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=auto)
    if jax.process_count() > 1:
        raise ValueError(f"config.mesh: data={data} x fsdp={fsdp} uses {data * fsdp} of the {len(devices)} devices of "
                         f"{jax.process_count()} processes; a multi-process mesh must use every device "
                         "(mesh.data=-1)")
    logging.warning("config.mesh: data=%d x fsdp=%d uses %d of the %d devices; %d stay idle", data, fsdp,
                    data * fsdp, len(devices), len(devices) - data * fsdp)
    return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=auto, devices=devices[:data * fsdp])


def num_batch_shards(mesh: Mesh) -> int:
    """How many slices the batch is split into (devices on the data and fsdp axes together)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over the data and fsdp axes, everything else replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def rows_sharding(mesh: Mesh) -> NamedSharding:
    """For [B, K] logits: rows over the batch axes so a device holds [B_local, K]."""
    return NamedSharding(mesh, P(BATCH_AXES, None))


def fsdp_spec(shape: tuple[int, ...], axis_size: int, min_size: int) -> P:
    """The FSDP PartitionSpec of a tensor: its largest dimension divisible by `axis_size` (the
    first of equal ones: a square Dense kernel is split by its input features, which keeps XLA
    from resharding the row-split activations around it) over `fsdp`; P() (replicated) when it
    is small or nothing divides."""
    if axis_size <= 1 or math.prod(shape) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda i: (-shape[i], i)):
        if shape[dim] % axis_size == 0:
            return P(*[FSDP if i == dim else None for i in range(len(shape))])
    return P()


def state_shardings(abstract_state, mesh: Mesh, mesh_config):
    """NamedShardings for every leaf of a TrainState (module docstring)."""
    rep = replicated(mesh)
    if mesh_config.param_sharding == "replicate":
        return jax.tree.map(lambda _: rep, abstract_state)
    if mesh_config.param_sharding != "fsdp":
        raise ValueError(f"config.mesh.param_sharding={mesh_config.param_sharding!r} not in {PARAM_SHARDINGS}")

    def follow_params(tree):
        return jax.tree.map(lambda a: NamedSharding(mesh, fsdp_spec(a.shape, mesh.shape[FSDP],
                                                                     mesh_config.fsdp_min_size)), tree)

    return abstract_state.replace(
        step=rep, rng=rep, batch_stats=jax.tree.map(lambda _: rep, abstract_state.batch_stats),
        queues=jax.tree.map(lambda _: rep, abstract_state.queues), params=follow_params(abstract_state.params),
        opt_state=follow_params(abstract_state.opt_state), ema_params=follow_params(abstract_state.ema_params))
