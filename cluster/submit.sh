#!/usr/bin/env bash
# Submit a ctray run to a running Ray cluster with `ray job submit` (docs/cluster.md).
#
#   cluster/submit.sh [--address URL] [--no-wait] [--dry-run] COMMAND [ctray args...]
#
# COMMAND is a ctray sub-command run on the cluster (detect, sweep, ...); everything after it is passed
# to `python -m ctray.cli COMMAND` unchanged. The repository is uploaded as the job's working directory
# with cluster/runtime_env.yaml (excludes .venv/, data/, runs/, ...). Address: --address, else
# RAY_API_SERVER_ADDRESS / RAY_ADDRESS, else http://127.0.0.1:8265 (e.g. after `ray dashboard
# cluster/aws.yaml`). Token auth: export RAY_AUTH_MODE=token on this machine when the cluster has it.
# Exit status: that of `ray job submit` (0 when the job succeeded; 1 when it failed) unless --no-wait.
set -euo pipefail

usage() {
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
address="${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}"
dry_run=0
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --address) address="${2:?--address needs a URL}"; shift 2 ;;
    --address=*) address="${1#--address=}"; shift ;;
    --no-wait) extra+=(--no-wait); shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -*) echo "submit.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ $# -lt 1 ]]; then
  echo "submit.sh: missing COMMAND (detect, sweep, ...); see --help" >&2
  exit 2
fi
command="$1"
shift

# `ray job submit` quotes each entrypoint word for the head's shell (shlex.join on Linux): globs, braces
# and spaces reach ctray unchanged.
cmd=(ray job submit --address "$address" --working-dir "$repo" --runtime-env "$here/runtime_env.yaml"
     "${extra[@]}" -- python -m ctray.cli "$command" "$@")
if [[ $dry_run -eq 1 ]]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi
cd "$repo"
exec "${cmd[@]}"
