#!/usr/bin/env bash
# Starts the five runs of this example on one GPU, side by side under CUDA MPS, in the background.
#   reports/examples/mqar-official-first/run.sh WORKDIR   then   reports/examples/mqar-official/collect.sh WORKDIR OUTDIR
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="${1:?usage: run.sh WORKDIR}"
mkdir -p "$work/runs" "$work/data"
export MLFLOW_TRACKING_URI="sqlite:///$work/mlflow.db"
nvidia-cuda-mps-control -d 2>/dev/null || true  # kernels of the five processes overlap instead of taking turns
python3 workflow/scripts/mlflow_store.py init --tracking-uri "$MLFLOW_TRACKING_URI" --out "$work/store.json"
for config in "$here"/configs/*.yaml; do
  name="$(basename "$config" .yaml)"
  setsid nohup python3 -m palimpsa train "$config" --out "$work/runs/$name" --data-dir "$work/data" \
    > "$work/runs/$name.log" 2>&1 < /dev/null &
done
echo "started $(ls "$here"/configs/*.yaml | wc -l) runs in $work"
