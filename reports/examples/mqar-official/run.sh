#!/usr/bin/env bash
# Starts run configs on one GPU, side by side under CUDA MPS, in the background, in the order given.
#   reports/examples/mqar-official/run.sh WORKDIR CONFIG...     then   .../collect.sh WORKDIR OUTDIR SECONDS
# Each CONFIG is a run config or a folder of them. With JOBS=N at most N run at once and the rest wait in
# WORKDIR/queue, so runs finish one after another and a sitting cut short loses only the runs in flight;
# `touch WORKDIR/stop` starts no more. Without JOBS every run starts at once.
set -euo pipefail
work="${1:?usage: run.sh WORKDIR CONFIG...}"
queue="$work/queue"
running() { pgrep -fc -- "--out $work/runs/" || true; }

if [ -n "${RUN_SH_DISPATCHER:-}" ]; then  # the background loop that starts the queue's runs
  while [ -s "$queue" ] && [ ! -e "$work/stop" ]; do
    if [ "$(running)" -lt "$JOBS" ]; then
      config="$(head -n 1 "$queue")"
      sed -i 1d "$queue"
      name="$(basename "$config" .yaml)"
      setsid nohup python3 -m palimpsa train "$config" --out "$work/runs/$name" --data-dir "$work/data" \
        --quiet > "$work/runs/$name.log" 2>&1 < /dev/null &
      echo "$(date +%T) started $name"
      sleep 2  # until the run shows in the process table
    else
      sleep 5
    fi
  done
  exit 0
fi

shift
[ $# -gt 0 ] || { echo "usage: run.sh WORKDIR CONFIG..." >&2; exit 2; }
mkdir -p "$work/runs" "$work/data"
rm -f "$work/stop"
for arg in "$@"; do
  if [ -d "$arg" ]; then ls "$arg"/*.yaml; elif [ -f "$arg" ]; then echo "$arg"
  else echo "run.sh: no such config or folder: $arg" >&2; exit 2; fi
done > "$queue"
export MLFLOW_TRACKING_URI="sqlite:///$work/mlflow.db"
nvidia-cuda-mps-control -d 2>/dev/null || true  # the runs' kernels overlap instead of taking turns
python3 workflow/scripts/mlflow_store.py init --tracking-uri "$MLFLOW_TRACKING_URI" --out "$work/store.json"
total=$(wc -l < "$queue")
JOBS="${JOBS:-$total}" RUN_SH_DISPATCHER=1 setsid nohup bash "$0" "$work" >> "$work/queue.log" 2>&1 < /dev/null &
echo "queued $total runs in $work, at most ${JOBS:-$total} at once"
