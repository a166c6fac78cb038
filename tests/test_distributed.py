"""Multi-controller start-up (retina_jax/distributed.py): the environment contract, and two local
processes with 4 CPU devices each joining one 8-device runtime over gloo."""
import json
import os
import socket
import subprocess
import sys

import pytest

from retina_jax import distributed
from test_train import REPO, subprocess_env

MANUAL = {"RETINA_JAX_DISTRIBUTED": "manual", "RETINA_JAX_COORDINATOR": "10.0.0.1:1234",
          "RETINA_JAX_NUM_PROCESSES": "4", "RETINA_JAX_PROCESS_ID": "3"}


def test_settings_from_the_environment():
    assert distributed.settings_from_env({}) == distributed.Settings("off")
    assert distributed.settings_from_env({}).single_process
    auto = distributed.settings_from_env({"RETINA_JAX_DISTRIBUTED": "AUTO", "RETINA_JAX_LOCAL_DEVICES": "0,1"})
    assert auto == distributed.Settings("auto", local_device_ids=(0, 1)) and not auto.single_process
    manual = distributed.settings_from_env(MANUAL)
    assert manual == distributed.Settings("manual", "10.0.0.1:1234", 4, 3) and not manual.single_process
    assert distributed.settings_from_env({**MANUAL, "RETINA_JAX_NUM_PROCESSES": "1",
                                          "RETINA_JAX_PROCESS_ID": "0"}).single_process
    # One process asks for nothing: initialize() is then a no-op that touches no device.
    assert distributed.initialize({}) == distributed.Settings("off")


@pytest.mark.parametrize("change, message", [
    ({"RETINA_JAX_DISTRIBUTED": "slurm"}, r"RETINA_JAX_DISTRIBUTED='slurm' is not one of \('off', 'auto', 'manual'\)"),
    ({"RETINA_JAX_COORDINATOR": "10.0.0.1"}, r"RETINA_JAX_COORDINATOR='10.0.0.1' must be 'host:port'"),
    ({"RETINA_JAX_COORDINATOR": ""}, r"RETINA_JAX_COORDINATOR='' must be 'host:port'"),
    ({"RETINA_JAX_NUM_PROCESSES": ""}, r"RETINA_JAX_NUM_PROCESSES is not set"),
    ({"RETINA_JAX_NUM_PROCESSES": "two"}, r"RETINA_JAX_NUM_PROCESSES='two' is not an integer"),
    ({"RETINA_JAX_NUM_PROCESSES": "0"}, r"RETINA_JAX_NUM_PROCESSES=0 must be >= 1"),
    ({"RETINA_JAX_PROCESS_ID": "4"}, r"RETINA_JAX_PROCESS_ID=4 must be < RETINA_JAX_NUM_PROCESSES=4"),
    ({"RETINA_JAX_PROCESS_ID": "-1"}, r"RETINA_JAX_PROCESS_ID=-1 must be >= 0"),
    ({"RETINA_JAX_LOCAL_DEVICES": "0;1"}, r"RETINA_JAX_LOCAL_DEVICES='0;1' is not a comma-separated list"),
])
def test_bad_settings_name_the_variable(change, message):
    with pytest.raises(ValueError, match=message):
        distributed.settings_from_env({**MANUAL, **change})


# Each process contributes its rows (all equal to its id + 1) to one global array over the 8 devices
# of both processes and reduces it: only a working cross-process runtime gives the full sum.
WORKER = """
import json
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from retina_jax import distributed
distributed.initialize()
mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
local = np.full((4, 2), jax.process_index() + 1.0, np.float32)
total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))(
    jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local))
print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                  "local": jax.local_device_count(), "global": jax.device_count(), "sum": float(total)}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_join_one_runtime_over_gloo():
    port = free_port()
    procs = []
    for i in range(2):
        env = {**subprocess_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "RETINA_JAX_DISTRIBUTED": "manual", "RETINA_JAX_COORDINATOR": f"127.0.0.1:{port}",
               "RETINA_JAX_NUM_PROCESSES": "2", "RETINA_JAX_PROCESS_ID": str(i)}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    assert [o["process"] for o in outputs] == [0, 1]
    for o in outputs:
        assert (o["processes"], o["local"], o["global"]) == (2, 4, 8)
        assert o["sum"] == 4 * 2 * 1.0 + 4 * 2 * 2.0  # both processes' rows
