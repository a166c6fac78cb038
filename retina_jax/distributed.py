"""Multi-controller start-up: one process per host on TPU pods and GPU clusters (docs/architecture.md,
Layout: `distributed.py`; JAX's `jax.distributed`). No paper section: the papers train on one node.

Every entry point calls `initialize()` before anything touches a device. What it does is read from
the environment, so the same command runs on a laptop, a TPU pod slice and a SLURM allocation:

  RETINA_JAX_DISTRIBUTED   'off' (default): one process, nothing is initialised.
                           'auto': `jax.distributed.initialize()` with no arguments; JAX detects the
                           cluster (Cloud TPU pod slices, SLURM, Open MPI) and finds the coordinator,
                           the process count and this process's id itself.
                           'manual': the three values below (e.g. `launch/multinode.sh`).
  RETINA_JAX_COORDINATOR   'host:port' of process 0's coordinator service (manual)
  RETINA_JAX_NUM_PROCESSES number of processes (manual)
  RETINA_JAX_PROCESS_ID    this process's id, 0 .. N-1 (manual)
  RETINA_JAX_LOCAL_DEVICES optional comma-separated local device ids this process drives

A manual run with one process is a no-op. On CPU, JAX's gloo collectives are switched on before
initialising, so multi-process runs (and their tests) work on machines without an accelerator.
A missing or malformed variable is an error that names it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax
import numpy as np
from absl import logging

MODES = ("off", "auto", "manual")
ENV_MODE = "RETINA_JAX_DISTRIBUTED"
ENV_COORDINATOR = "RETINA_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "RETINA_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "RETINA_JAX_PROCESS_ID"
ENV_LOCAL_DEVICES = "RETINA_JAX_LOCAL_DEVICES"


@dataclasses.dataclass(frozen=True)
class Settings:
    mode: str = "off"
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None

    @property
    def single_process(self) -> bool:
        return self.mode == "off" or (self.mode == "manual" and self.num_processes == 1)


def _int(env: Mapping[str, str], name: str, minimum: int) -> int:
    value = env.get(name, "").strip()
    if not value:
        raise ValueError(f"{name} is not set ({ENV_MODE}=manual needs it)")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None
    if number < minimum:
        raise ValueError(f"{name}={number} must be >= {minimum}")
    return number


def settings_from_env(env: Mapping[str, str] | None = None) -> Settings:
    """The start-up the environment asks for (module docstring); every error names the variable."""
    env = os.environ if env is None else env
    mode = env.get(ENV_MODE, "off").strip().lower() or "off"
    if mode not in MODES:
        raise ValueError(f"{ENV_MODE}={env[ENV_MODE]!r} is not one of {MODES}")
    local = env.get(ENV_LOCAL_DEVICES, "").strip()
    try:
        local_ids = tuple(int(i) for i in local.split(",")) if local else None
    except ValueError:
        raise ValueError(f"{ENV_LOCAL_DEVICES}={local!r} is not a comma-separated list of integers") from None
    if mode != "manual":
        return Settings(mode, local_device_ids=local_ids)
    coordinator = env.get(ENV_COORDINATOR, "").strip()
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{ENV_COORDINATOR}={coordinator!r} must be 'host:port' ({ENV_MODE}=manual needs it)")
    num_processes = _int(env, ENV_NUM_PROCESSES, 1)
    process_id = _int(env, ENV_PROCESS_ID, 0)
    if process_id >= num_processes:
        raise ValueError(f"{ENV_PROCESS_ID}={process_id} must be < {ENV_NUM_PROCESSES}={num_processes}")
    return Settings(mode, coordinator, num_processes, process_id, local_ids)


def initialize(env: Mapping[str, str] | None = None) -> Settings:
    """Start JAX's multi-controller runtime as the environment asks (a no-op for one process)."""
    settings = settings_from_env(env)
    if settings.single_process:
        return settings
    # CPU processes exchange collectives through gloo (JAX's default CPU client has none across
    # processes); it only concerns the CPU client, so accelerators keep their own (ICI/DCN, NCCL).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if settings.mode == "manual":
        kwargs = dict(coordinator_address=settings.coordinator, num_processes=settings.num_processes,
                      process_id=settings.process_id)
    if settings.local_device_ids is not None:
        kwargs["local_device_ids"] = list(settings.local_device_ids)
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return settings


class PreemptionCheck:
    """Whether to stop after a step: True on every process once any one of them was sent SIGTERM,
    so that all save the same step (a checkpoint is written collectively) and exit together.

    With several processes the host flags are all-gathered, a blocking collective that stops the
    host from loading the next batch while the step runs; so it happens only every `every` steps
    (`train.stop_check_every`), the same steps on every process. One process checks its own flag
    at every step for free.
    """

    def __init__(self, local_flag, every: int, process_count: int | None = None, allgather=None):
        self.local_flag, self.every = local_flag, max(1, every)
        self.process_count = jax.process_count() if process_count is None else process_count
        if allgather is None:
            from jax.experimental import multihost_utils
            allgather = multihost_utils.process_allgather
        self.allgather = allgather

    def requested(self, done: int) -> bool:
        local = bool(self.local_flag())
        if self.process_count == 1:
            return local
        if done % self.every:
            return False
        return bool(np.any(self.allgather(np.asarray([local]))))
