#!/usr/bin/env bash
# Waits up to SECONDS for the runs started by run.sh to finish, then copies the MLflow store and one archive
# of every run's folder and log (checkpoints left out) to OUTDIR: two files, however many runs.
#   reports/examples/mqar-official/collect.sh WORKDIR OUTDIR [SECONDS]
set -uo pipefail
work="${1:?}" out="${2:?}" wait_s="${3:-0}"
start=$(date +%s)
# A run is done when its process has exited: metrics.json lands a moment before the run's end reaches MLflow.
while [ $(( $(date +%s) - start )) -lt "$wait_s" ]; do
  pgrep -f -- "--out $work/runs/" > /dev/null || break
  sleep 10
done
mkdir -p "$out"
sqlite3 "$work/mlflow.db" ".backup '$out/mlflow.db'" 2>/dev/null || python3 - "$work/mlflow.db" "$out/mlflow.db" <<'PY'
import sqlite3, sys
src, dst = sqlite3.connect(sys.argv[1]), sqlite3.connect(sys.argv[2])
src.backup(dst)
PY
for run in "$work"/runs/*/; do tail -n 5 "$work/runs/$(basename "$run").log"; done
tar -czf "$out/runs.tar.gz" -C "$work" --exclude='*.pt' runs
ls "$work"/runs/*/metrics.json 2>/dev/null | wc -l
