#!/usr/bin/env bash
# A retina_jax run on a Cloud TPU VM pod slice: create the slice (or reuse it), install the checkout
# on every worker, then run the same command on every worker at once; JAX finds the pod's
# coordinator and each worker's id itself (RETINA_JAX_DISTRIBUTED=auto). See launch/README.md.
#
#   launch/tpu_pod.sh --name vilref-v4 --zone us-central2-b --type v4-32 \
#       --repo https://github.com/ORG/retina_jax.git [--ref main] [--dry-run] \
#       -- --config configs/vilref.py --workdir gs://BUCKET/ckpt/vilref
#
# Everything after `--` goes to `python -m retina_jax.main`. Running the script again reuses the
# slice and resumes from the workdir's latest checkpoint. GCLOUD (default gcloud) is the CLI used.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=launch/_lib.sh
source "$here/launch/_lib.sh"
HELP_LINES=2,11

name="" zone="" type="" repo="" ref="main" version="tpu-ubuntu2204-base" dry_run=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --name) name="${2:?--name needs a value}"; shift 2 ;;
        --zone) zone="${2:?--zone needs a value}"; shift 2 ;;
        --type) type="${2:?--type needs an accelerator type, e.g. v4-32}"; shift 2 ;;
        --repo) repo="${2:?--repo needs a git URL}"; shift 2 ;;
        --ref) ref="${2:?--ref needs a branch, tag or commit}"; shift 2 ;;
        --version) version="${2:?--version needs a TPU VM software version}"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage 0 ;;
        --) shift; break ;;
        *) echo "tpu_pod.sh: unknown option $1" >&2; usage 2 ;;
    esac
done
require $# name zone type repo

gcloud="${GCLOUD:-gcloud}"
tpu=("$gcloud" compute tpus tpu-vm)
where=(--zone "$zone")

# On every worker: the checkout at --ref in ~/retina_jax, its pinned packages plus JAX's TPU
# runtime in ~/retina_jax/.venv (each step is a no-op when already done), then the run.
main_args="$(print_command "$@")"
# One line (joined by `&&`), so that it prints and quotes plainly.
install="{ test -d retina_jax/.git || git clone --quiet $(printf '%q' "$repo") retina_jax; }"
install+=" && cd retina_jax && git fetch --quiet origin $(printf '%q' "$ref") && git checkout --quiet --detach FETCH_HEAD"
install+=" && { test -x .venv/bin/python || python3 -m venv .venv; }"
install+=" && .venv/bin/pip install --quiet -r requirements.txt 'jax[tpu]==0.10.2'"
install+=" && .venv/bin/pip install --quiet --no-deps -e ."
run="cd retina_jax && RETINA_JAX_DISTRIBUTED=auto .venv/bin/python -m retina_jax.main $main_args"

create=("${tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$type" --version "$version")
describe=("${tpu[@]}" describe "$name" "${where[@]}" --format 'value(state)')
install_all=("${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$install")
run_all=("${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$run")

if [[ $dry_run -eq 1 ]]; then
    echo "# when this finds no slice, create it: $(print_command "${describe[@]}")"
    print_command "${create[@]}"
    print_command "${install_all[@]}"
    print_command "${run_all[@]}"
    exit 0
fi
if state="$("${describe[@]}" 2>/dev/null)"; then
    echo "tpu_pod.sh: reusing TPU slice $name ($state)"
else
    echo "tpu_pod.sh: creating TPU slice $name ($type) in $zone"
    "${create[@]}"
fi
"${install_all[@]}"
"${run_all[@]}"
