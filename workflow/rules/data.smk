# Shared state that must exist once before training jobs start: the MLflow store and the datasets.


rule mlflow_store:
    """Create the MLflow store once: parallel jobs racing to create a SQLite schema corrupt it."""
    output:
        MLFLOW_READY,
    log:
        f"{RESULTS}/meta/mlflow-store.log",
    localrule: True
    conda:
        CONDA_ENV
    shell:
        '"$PALIMPSA_PY" "$PALIMPSA_SCRIPTS/mlflow_store.py" init --out {output} > {log} 2>&1'


rule dataset:
    """Generate one task dataset (per task config and seed) into the shared cache, once."""
    output:
        marker=f"{DATA_CACHE}/ready/{{key}}.json",
    params:
        spec=lambda w: json.dumps(DATASETS[w.key], sort_keys=True),
        cache=lambda w, output: cache_of_marker(output.marker),
    log:
        f"{DATA_CACHE}/ready/{{key}}.log",
    threads: 1
    resources:
        gpu=0,
    conda:
        CONDA_ENV
    shell:
        '"$PALIMPSA_PY" "$PALIMPSA_SCRIPTS/build_data.py" --spec {params.spec:q} --cache {params.cache}'
        " --out {output.marker} > {log} 2>&1"
