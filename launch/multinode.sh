#!/usr/bin/env bash
# One retina_jax process on this host of a manually coordinated multi-host run (no SLURM, no TPU
# pod): run it on every host with the same --coordinator and --num-processes and that host's
# --process-id; process 0's host serves the coordinator. See launch/README.md.
#
#   launch/multinode.sh --coordinator 10.0.0.1:8476 --num-processes 2 --process-id 0 [--dry-run] \
#       -- --config configs/vilref.py --workdir /shared/ckpt/vilref
#
# Everything after `--` goes to `python -m retina_jax.main`; the same command restarted resumes
# from the workdir's latest checkpoint. PYTHON (default: .venv/bin/python, else python3) runs it.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=launch/_lib.sh
source "$here/launch/_lib.sh"
HELP_LINES=2,10

coordinator="" num_processes="" process_id="" dry_run=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --coordinator) coordinator="${2:?--coordinator needs host:port}"; shift 2 ;;
        --num-processes) num_processes="${2:?--num-processes needs a number}"; shift 2 ;;
        --process-id) process_id="${2:?--process-id needs a number}"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage 0 ;;
        --) shift; break ;;
        *) echo "multinode.sh: unknown option $1" >&2; usage 2 ;;
    esac
done
require $# coordinator num_processes process_id

env_vars=(RETINA_JAX_DISTRIBUTED=manual "RETINA_JAX_COORDINATOR=$coordinator"
          "RETINA_JAX_NUM_PROCESSES=$num_processes" "RETINA_JAX_PROCESS_ID=$process_id")
command=(env "${env_vars[@]}" "$(find_python "$here")" -m retina_jax.main "$@")
if [[ $dry_run -eq 1 ]]; then
    print_command "${command[@]}"
    exit 0
fi
cd "$here"
exec "${command[@]}"
