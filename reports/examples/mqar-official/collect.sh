#!/usr/bin/env bash
# Waits up to SECONDS for the runs started by run.sh to finish, then copies the MLflow store, every run's
# metrics, history and log to OUTDIR (flat: one file per run and kind).
#   reports/examples/mqar-official/collect.sh WORKDIR OUTDIR [SECONDS]
set -uo pipefail
work="${1:?}" out="${2:?}" wait_s="${3:-0}"
start=$(date +%s)
while [ $(( $(date +%s) - start )) -lt "$wait_s" ]; do
  done_runs=$(ls "$work"/runs/*/metrics.json "$work"/runs/*/failed.json 2>/dev/null | wc -l)
  total=$(ls "$work"/runs/*.log 2>/dev/null | wc -l)  # run.sh creates each run's log before it starts
  [ "$done_runs" -ge "$total" ] && break
  sleep 10
done
mkdir -p "$out"
sqlite3 "$work/mlflow.db" ".backup '$out/mlflow.db'" 2>/dev/null || python3 - "$work/mlflow.db" "$out/mlflow.db" <<'PY'
import sqlite3, sys
src, dst = sqlite3.connect(sys.argv[1]), sqlite3.connect(sys.argv[2])
src.backup(dst)
PY
for run in "$work"/runs/*/; do
  name="$(basename "$run")"
  cat "$run/history.jsonl" > "$out/$name.history.jsonl" 2>/dev/null || true
  tail -n 5 "$work/runs/$name.log"
done
tar -czf "$out/runs.tar.gz" -C "$work" --exclude='*.pt' runs
ls "$work"/runs/*/metrics.json 2>/dev/null | wc -l
