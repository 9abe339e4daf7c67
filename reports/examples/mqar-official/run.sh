#!/usr/bin/env bash
# Starts run configs on one GPU, side by side under CUDA MPS, in the background, in the order given.
#   reports/examples/mqar-official/run.sh WORKDIR CONFIG...     then   .../collect.sh WORKDIR OUTDIR SECONDS
# Each CONFIG is a run config or a folder of them. With JOBS=N at most N run at once and the rest wait in
# WORKDIR/queue, so runs finish one after another and a sitting cut short loses only the runs in flight;
# `touch WORKDIR/stop` starts no more. Without JOBS every run starts at once. A background dispatcher
# (WORKDIR/dispatcher.pid) starts the queued runs and records each one's pid (WORKDIR/runs/NAME.pid).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: run.sh WORKDIR CONFIG..." >&2; exit 2; }
work="$(realpath -m "$1")"
queue="$work/queue"
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
running() {
  local n=0 pid
  for pid in "$work"/runs/*.pid; do alive "$pid" && n=$((n + 1)); done
  echo "$n"
}

if [ -n "${RUN_SH_DISPATCHER:-}" ]; then  # the background loop that starts the queue's runs
  shopt -s nullglob
  echo $$ > "$work/dispatcher.pid"
  while [ -s "$queue" ] && [ ! -e "$work/stop" ]; do
    if [ "$(running)" -lt "$JOBS" ]; then
      config="$(head -n 1 "$queue")"
      name="$(basename "$config" .yaml)"
      setsid nohup python3 -m palimpsa train "$config" --out "$work/runs/$name" --data-dir "$work/data" \
        --quiet > "$work/runs/$name.log" 2>&1 < /dev/null &
      echo $! > "$work/runs/$name.pid"
      sed -i 1d "$queue"  # only once the run's pid is on record: collect.sh waits on both
      echo "$(date +%T) started $name"
    else
      sleep 5
    fi
  done
  exit 0
fi

shift
[ $# -gt 0 ] || { echo "usage: run.sh WORKDIR CONFIG..." >&2; exit 2; }
[[ "${JOBS:-1}" =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: JOBS must be a positive integer, not '$JOBS'" >&2; exit 2; }
if alive "$work/dispatcher.pid"; then
  echo "run.sh: $work has a queue running (dispatcher pid $(cat "$work/dispatcher.pid")); touch $work/stop" \
    "and wait for it, or use another WORKDIR" >&2
  exit 2
fi
mkdir -p "$work/runs" "$work/data"
shopt -s nullglob
for arg in "$@"; do
  if [ -d "$arg" ]; then
    configs=("$(realpath "$arg")"/*.yaml)
    [ ${#configs[@]} -gt 0 ] || { echo "run.sh: no run configs (*.yaml) in $arg" >&2; exit 2; }
    printf '%s\n' "${configs[@]}"
  elif [ -f "$arg" ]; then realpath "$arg"
  else echo "run.sh: no such config or folder: $arg" >&2; exit 2; fi
done > "$queue.new"
mv "$queue.new" "$queue"
rm -f "$work/stop" "$work/dispatcher.pid"
export MLFLOW_TRACKING_URI="sqlite:///$work/mlflow.db"
nvidia-cuda-mps-control -d 2>/dev/null || true  # the runs' kernels overlap instead of taking turns
python3 workflow/scripts/mlflow_store.py init --tracking-uri "$MLFLOW_TRACKING_URI" --out "$work/store.json"
total=$(wc -l < "$queue")
JOBS="${JOBS:-$total}" RUN_SH_DISPATCHER=1 setsid nohup bash "$0" "$work" >> "$work/queue.log" 2>&1 < /dev/null &
for _ in $(seq 50); do [ -f "$work/dispatcher.pid" ] && break; sleep 0.1; done  # collect.sh may start next
echo "queued $total runs in $work, at most ${JOBS:-$total} at once"
