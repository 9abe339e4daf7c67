#!/usr/bin/env bash
# Waits up to SECONDS for the runs started by run.sh to finish, queued ones included, then copies the MLflow
# store and one archive of every run's folder and log (checkpoints left out) to OUTDIR: two files, however many.
#   reports/examples/mqar-official/collect.sh WORKDIR OUTDIR [SECONDS]
set -uo pipefail
shopt -s nullglob
[ $# -ge 2 ] || { echo "usage: collect.sh WORKDIR OUTDIR [SECONDS]" >&2; exit 2; }
work="$(realpath -m "$1")" out="$2" wait_s="${3:-0}"
[ -f "$work/mlflow.db" ] || { echo "collect.sh: no MLflow store in $work: start the runs with run.sh" >&2; exit 2; }
[[ "$wait_s" =~ ^[0-9]+$ ]] || { echo "collect.sh: SECONDS must be a whole number, not '$wait_s'" >&2; exit 2; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
busy() {  # the dispatcher still has runs to start, or a run is still going
  local pid
  alive "$work/dispatcher.pid" && return 0
  for pid in "$work"/runs/*.pid; do alive "$pid" && return 0; done
  return 1
}
start=$(date +%s)
# A run is done when its process has exited: metrics.json lands a moment before the run's end reaches MLflow.
while [ $(( $(date +%s) - start )) -lt "$wait_s" ] && busy; do sleep 10; done
mkdir -p "$out"
sqlite3 "$work/mlflow.db" ".backup '$out/mlflow.db'" 2>/dev/null || python3 - "$work/mlflow.db" "$out/mlflow.db" <<'PY'
import sqlite3, sys
src, dst = sqlite3.connect(sys.argv[1]), sqlite3.connect(sys.argv[2])
src.backup(dst)
PY
for log in "$work"/runs/*.log; do tail -n 5 "$log"; done
tar -czf "$out/runs.tar.gz" -C "$work" --exclude='*.pt' runs
finished=("$work"/runs/*/metrics.json)
echo "${#finished[@]} runs finished"
