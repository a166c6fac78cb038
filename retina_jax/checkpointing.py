"""orbax checkpoints of the train state together with the grain iterator position.

One `CheckpointManager` per run directory saves a Composite of `state` (the TrainState pytree) and
`data` (the grain iterator state, one file per process), as maxtext does. Saves are atomic (orbax
writes to a temporary directory and renames it when complete), so a run killed mid-save still has
its previous checkpoint. Restores go to the abstract state's shardings, so a checkpoint written on
one mesh restores onto another.

Resume order (ARCHITECTURE.md): the workdir's own latest checkpoint > `config.resume` (another
run's checkpoint directory: full state and data position) > `config.model_init` (params and
batch_stats only) > scratch.
"""
from __future__ import annotations

import logging
import os

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def manager(directory: str, *, max_to_keep: int | None = None, async_save: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           read_only=read_only, create=not read_only)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=("state", "data"))


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter, *, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
        args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return mngr.save(step, args=ocp.args.Composite(**args), force=force)


def restore(mngr: ocp.CheckpointManager, abstract_state, data_iter=None, step: int | None = None):
    """Restore `state` onto `abstract_state`'s shardings; restore `data_iter` in place if given."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no finalized checkpoint in {mngr.directory}")
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
        args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = mngr.restore(step, args=ocp.args.Composite(**args))
    return restored["state"]


def restore_variables(directory: str, sharding, step: int | None = None) -> dict:
    """`params` and `batch_stats` of another run's checkpoint (config.model_init), on `sharding`."""
    mngr = manager(directory, read_only=True)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"config.model_init: no finalized checkpoint in {directory}")
    meta = mngr.item_metadata(step)["state"]
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), meta)
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    mngr.close()
    return {"params": state["params"], "batch_stats": state["batch_stats"]}
