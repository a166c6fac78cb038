"""Multi-controller runs (retina_jax/distributed.py, pipeline.ProcessRows): the environment contract,
two local processes with 4 CPU devices each joining one 8-device runtime over gloo, each process
reading disjoint rows of the same global batches, and a 2-process training run with checkpoints that
gives the 1-process losses and restores in one process."""
import json
import os
import socket
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest

from retina_jax import checkpointing, distributed
from retina_jax.data import pipeline
from test_train import REPO, leaves, subprocess_env, tiny_config, train_rows

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


def test_process_rows_split_every_global_batch_into_disjoint_parts():
    ds = grain.MapDataset.range(100).shuffle(seed=3).repeat(None)
    one = [ds[i] for i in range(3 * 16)]  # three global batches of 16, one process
    parts = [pipeline.ProcessRows(ds, 16, p, 2) for p in (0, 1)]
    rows = [[part[i] for i in range(3 * 8)] for part in parts]
    assert set(rows[0]).isdisjoint(rows[1])
    for n in range(3):  # batch n of the one process = process 0's rows then process 1's
        assert one[16 * n:16 * (n + 1)] == rows[0][8 * n:8 * (n + 1)] + rows[1][8 * n:8 * (n + 1)]
    assert len(pipeline.ProcessRows(grain.MapDataset.range(50), 16, 1, 2)) == 3 * 8  # whole global batches only


# test_train's tiny FLAIR run cut to 8 of its 12 scheduled steps (batch 16, checkpoints every 4; the
# same compiled step) in one of two processes; process 0 then saves its final parameters.
TRAIN_WORKER = """
import sys
import jax
import numpy as np
sys.path.insert(0, "tests")
from retina_jax import distributed
distributed.initialize()
from test_train import tiny_config
from retina_jax.train import Trainer
trainer = Trainer(tiny_config(**{"eval.at_end": False, "train.epochs": 2.0}), sys.argv[1])  # SHORT
trainer.train()
if jax.process_index() == 0:
    params = jax.tree.leaves(trainer.state.params)
    np.savez(sys.argv[2], *[np.asarray(p.addressable_data(0)) for p in params])
"""


SHORT = {"eval.at_end": False, "train.epochs": 2.0}


def test_two_processes_train_like_one_and_their_checkpoint_restores_in_one(tmp_path):
    from retina_jax.train import Trainer
    port, workdir, saved = free_port(), str(tmp_path / "two"), str(tmp_path / "params.npz")
    procs = []
    for i in range(2):
        env = {**subprocess_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "RETINA_JAX_DISTRIBUTED": "manual", "RETINA_JAX_COORDINATOR": f"127.0.0.1:{port}",
               "RETINA_JAX_NUM_PROCESSES": "2", "RETINA_JAX_PROCESS_ID": str(i)}
        procs.append(subprocess.Popen([sys.executable, "-c", TRAIN_WORKER, workdir, saved], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    # Meanwhile the same run in this process on 8 devices (test_train's compiled step).
    one = Trainer(tiny_config(**SHORT), str(tmp_path / "one"))
    one.train()
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
    two_rows, one_rows = train_rows(workdir), train_rows(one.workdir)
    assert [r["step"] for r in two_rows] == list(range(1, 9))
    np.testing.assert_allclose([r["train/loss"] for r in two_rows], [r["train/loss"] for r in one_rows],
                               rtol=2e-5)
    # The 2-process checkpoints (steps 4, 8) restore in one process on 8 devices, exactly.
    mngr = checkpointing.manager(checkpointing.checkpoint_dir(workdir), read_only=True)
    assert mngr.all_steps() == [4, 8]
    mngr.close()
    restored = Trainer(tiny_config(**SHORT), workdir).restore_latest()
    assert int(jax.device_get(restored.step)) == 8
    want = np.load(saved)
    for got, (name, value) in zip(leaves(restored.params), sorted(want.items(), key=lambda kv: int(kv[0][4:]))):
        np.testing.assert_array_equal(got, value, err_msg=name)
    # And they are the 1-process run's parameters up to float32 reduction order. Adam's normalised
    # steps carry that order into single small weights (a few of 1M differed by ~2e-4 after 12
    # steps), so each tensor is compared as a whole.
    for got, ref in zip(leaves(restored.params), leaves(one.state.params)):
        # (measured: at most 3e-4 of the norm; tensors still near zero differ by ~2e-7 absolute)
        assert np.linalg.norm(got - ref) <= 1e-3 * np.linalg.norm(ref) + 1e-5
