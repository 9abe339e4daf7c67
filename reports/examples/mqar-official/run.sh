#!/usr/bin/env bash
# Starts every run config in CONFIGS on one GPU, side by side under CUDA MPS, in the background.
#   reports/examples/mqar-official/run.sh WORKDIR CONFIGS      then   .../collect.sh WORKDIR OUTDIR SECONDS
set -euo pipefail
work="${1:?usage: run.sh WORKDIR CONFIGS}" configs="${2:?usage: run.sh WORKDIR CONFIGS}"
mkdir -p "$work/runs" "$work/data"
export MLFLOW_TRACKING_URI="sqlite:///$work/mlflow.db"
nvidia-cuda-mps-control -d 2>/dev/null || true  # the runs' kernels overlap instead of taking turns
python3 workflow/scripts/mlflow_store.py init --tracking-uri "$MLFLOW_TRACKING_URI" --out "$work/store.json"
for config in "$configs"/*.yaml; do
  name="$(basename "$config" .yaml)"
  setsid nohup python3 -m palimpsa train "$config" --out "$work/runs/$name" --data-dir "$work/data" --quiet \
    > "$work/runs/$name.log" 2>&1 < /dev/null &
done
echo "started $(ls "$configs"/*.yaml | wc -l) runs in $work"
