"""Multi-controller runs (retina_jax/distributed.py, pipeline.ProcessRows): the environment contract,
two local processes with 4 CPU devices each joining one 8-device runtime over gloo, each process
reading disjoint rows of the same global batches, and a 2-process training run, stopped by SIGTERM
on one process and resumed, that gives the 1-process losses and restores in one process on other
meshes."""
import json
import os
import re
import signal
import socket
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest

from retina_jax import checkpointing, distributed
from retina_jax.data import pipeline
from test_train import DEMO, REPO, cli_flags, leaves, subprocess_env, tiny_config, train_rows, wait_for_step

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
# `python -m retina_jax.main` (cli.trainer_from_flags, then train) that also leaves process 0's
# final parameters in an .npz, to compare with what one process restores from the checkpoint.
TRAIN_WORKER = """
import os
import sys
import jax
import numpy as np
from absl import app
from retina_jax import cli

def main(argv):
    trainer = cli.trainer_from_flags(argv)
    trainer.train()
    if jax.process_index() == 0:
        np.savez(os.environ["PARAMS_NPZ"], *[np.asarray(p.addressable_data(0))
                                             for p in jax.tree.leaves(trainer.state.params)])

app.run(main)
"""

# test_train's tiny FLAIR run cut to 8 steps (checkpoints at 4 and 8), without the final evaluation;
# the processes agree on stopping every 2 steps.
SHORT = {"train.eval_at_end": False, "train.epochs": 2.0, "train.stop_check_every": 2}


def _launch(workdir: str, port: int, npz: str, **extra) -> list[subprocess.Popen]:
    """The same command on 2 local processes of 4 CPU devices each (what launch/multinode.sh runs)."""
    procs = []
    for i in range(2):
        env = {**subprocess_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "RETINA_JAX_DISTRIBUTED": "manual", "RETINA_JAX_COORDINATOR": f"127.0.0.1:{port}",
               "RETINA_JAX_NUM_PROCESSES": "2", "RETINA_JAX_PROCESS_ID": str(i), "PARAMS_NPZ": npz}
        # No shared compilation cache: a process that loads the step from it would reach the first
        # collective long before one still compiling, past gloo's fixed 30 s rendezvous timeout.
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        cmd = [sys.executable, "-c", TRAIN_WORKER, f"--config={DEMO}", f"--workdir={workdir}", *cli_flags(**{**SHORT, **extra})]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def _finish(procs) -> list[str]:
    errs = []
    for i, proc in enumerate(procs):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"process {i}: {err[-4000:]}"
        errs.append(err)
    return errs


def test_preemption_check_gathers_host_flags_only_every_n_steps():
    gathers, flag = [], {"set": False}

    def allgather(local):  # process 1's flag is the local one; process 0 never got the signal
        gathers.append(bool(local[0]))
        return np.asarray([False, bool(local[0])])

    check = distributed.PreemptionCheck(lambda: flag["set"], every=4, process_count=2, allgather=allgather)
    seen = []
    for done in range(1, 13):
        flag["set"] = done >= 5  # SIGTERM arrives during step 5
        seen.append(check.requested(done))
    # One blocking collective per 4 steps, not one per step; the stop lands on the next multiple.
    assert gathers == [False, True, True]
    assert [done for done, stop in zip(range(1, 13), seen) if stop] == [8, 12]
    alone = distributed.PreemptionCheck(lambda: flag["set"], every=4, process_count=1,
                                        allgather=lambda _: pytest.fail("one process never gathers"))
    assert alone.requested(5)  # one process stops right after the step it was signalled in


def test_two_processes_stop_together_on_sigterm_resume_like_one_and_restore_on_other_meshes(tmp_path):
    from retina_jax.train import Trainer
    workdir, npz = str(tmp_path / "two"), str(tmp_path / "params.npz")
    # SIGTERM to process 1 alone once step 2 is logged: both processes save the same step, exit 0.
    procs = _launch(workdir, free_port(), npz)
    wait_for_step(workdir, 2, procs[0])
    procs[1].send_signal(signal.SIGTERM)
    errs = _finish(procs)
    stops = [re.findall(r"stopped by signal (.+) at step (\d+); checkpoint saved", err) for err in errs]
    assert stops[0] and stops[1], errs
    assert stops[1][0][0] == "15" and stops[0][0][0] == "SIGTERM on another process"
    stopped_at = int(stops[1][0][1])
    assert int(stops[0][0][1]) == stopped_at and 2 <= stopped_at < 8 and stopped_at % 2 == 0
    mngr = checkpointing.manager(checkpointing.checkpoint_dir(workdir), read_only=True)
    assert mngr.latest_step() == stopped_at
    mngr.close()

    # The same command again resumes there and finishes, then evaluates; meanwhile the 1-process,
    # 8-device run.
    procs = _launch(workdir, free_port(), npz, **{"train.eval_at_end": True})
    one = Trainer(tiny_config(**SHORT), str(tmp_path / "one"))
    one.train()
    one_eval = one.evaluate(one.state, 8)
    _finish(procs)
    assert json.load(open(os.path.join(workdir, "run_info.json")))["start_step"] == stopped_at
    two_rows, one_rows = train_rows(workdir), train_rows(one.workdir)
    assert [r["step"] for r in two_rows] == list(range(1, 9))  # each step once, across the stop
    np.testing.assert_allclose([r["train/loss"] for r in two_rows], [r["train/loss"] for r in one_rows],
                               rtol=2e-5)
    # The evaluation's 48 held-out images in batches of 32: each process reads its half of every
    # batch, the last one padded; the padding is masked out and no image is counted twice.
    two_eval = json.load(open(os.path.join(workdir, "eval_synthetic_conditions.json")))
    assert two_eval["num_examples"] == one_eval["num_examples"] == 48
    assert abs(two_eval["auc"] - one_eval["auc"]) < 0.01 and abs(two_eval["aca"] - one_eval["aca"]) <= 1 / 48

    # The final 2-process checkpoint restores in one process, on 8 replicated devices and on a
    # 2 x 2 data x fsdp mesh (parameters split in two), to exactly the parameters process 0 held.
    want = [value for _, value in sorted(np.load(npz).items(), key=lambda kv: int(kv[0][4:]))]
    for mesh in ({}, {"mesh.data": 2, "mesh.fsdp": 2, "mesh.param_sharding": "fsdp", "mesh.fsdp_min_size": 256}):
        restored = Trainer(tiny_config(**SHORT, **mesh), workdir).restore_latest()
        assert int(jax.device_get(restored.step)) == 8
        kernel = restored.params["txt_proj"]["dense"]["kernel"]
        assert kernel.sharding.shard_shape(kernel.shape) == ((64, 128) if mesh else (128, 128))
        for got, value in zip(leaves(restored.params), want):
            np.testing.assert_array_equal(got, value)
    # And they are the 1-process run's parameters up to float32 reduction order. Adam's normalised
    # steps carry that order into single small weights (a few of 1M differed by ~2e-4 after 12
    # steps), so each tensor is compared as a whole.
    for got, ref in zip(want, leaves(one.state.params)):
        # (measured: at most 3e-4 of the norm; tensors still near zero differ by ~2e-7 absolute)
        assert np.linalg.norm(got - ref) <= 1e-3 * np.linalg.norm(ref) + 1e-5
