# One MLflow experiment per grid with a parent sweep run; one job and one nested MLflow run per point.


rule sweep:
    """The grid's MLflow experiment and its parent sweep run (created once; its summary comes at the end)."""
    input:
        MLFLOW_READY,
    output:
        f"{RUNS}/{{grid}}/sweep.json",
    params:
        experiment=lambda w: GRIDS[w.grid].experiment,
        description=lambda w: GRIDS[w.grid].description,
        tags=lambda w: json.dumps({**GRIDS[w.grid].tags, "grid.file": str(GRIDS[w.grid].path)}),
    log:
        f"{RUNS}/{{grid}}/sweep.log",
    localrule: True
    conda:
        CONDA_ENV
    shell:
        '"$PALIMPSA_PY" "$PALIMPSA_SCRIPTS/mlflow_store.py" sweep --grid {wildcards.grid}'
        " --experiment {params.experiment:q} --description {params.description:q}"
        " --tags {params.tags:q} --out {output} > {log} 2>&1"


rule point_config:
    """The point's run config (run.yaml, tracking included: `palimpsa train` on it reproduces the run)."""
    input:
        sweep=f"{RUNS}/{{grid}}/sweep.json",
        overrides_from=lambda w: list(GRIDS[w.grid].overrides_from),
    output:
        config=f"{RUNS}/{{grid}}/{{point}}/run.yaml",
        point=f"{RUNS}/{{grid}}/{{point}}/point.json",
    params:
        # The resolved config is a param: Snakemake reruns the point when it changes.
        config=lambda w: json.dumps(grid_point(w).config, sort_keys=True),
    log:
        f"{RUNS}/{{grid}}/{{point}}/point_config.log",
    localrule: True
    run:
        write_point_files(wildcards, input, output, log)


rule train:
    """Train one grid point; a failure fails this job only (its MLflow run is marked FAILED).

    The log gets a progress line every ~5% of the steps (step, loss, metric, ETA); the terminal gets one
    summary line per finished point. If metrics.json was removed (`snakemake --force` on the point), the
    trainer retrains from scratch in a new MLflow run and tags the old run superseded; an interrupted run
    resumes from its checkpoint.
    """
    input:
        config=f"{RUNS}/{{grid}}/{{point}}/run.yaml",
        data=lambda w: data_marker(grid_point(w).config),
        mlflow=MLFLOW_READY,
    output:
        metrics=f"{RUNS}/{{grid}}/{{point}}/metrics.json",
    params:
        out=lambda w, output: os.path.dirname(output.metrics),
        data_dir=lambda w, input: cache_of_marker(input.data),
    log:
        f"{RUNS}/{{grid}}/{{point}}/train.log",
    threads: 1
    resources:
        gpu=0,
    conda:
        CONDA_ENV
    # gpu_slot.py gives the job its own CUDA_VISIBLE_DEVICES (one free slot per requested gpu) and hides
    # the GPUs from jobs that request none; under SLURM it leaves the allocation alone.
    shell:
        '"$PALIMPSA_PY" "$PALIMPSA_SCRIPTS/gpu_slot.py" --gpus {resources.gpu} --'
        ' "$PALIMPSA_PY" -m palimpsa train {input.config} --out {params.out} --data-dir {params.data_dir}'
        " > {log} 2>&1"
        ' && "$PALIMPSA_PY" "$PALIMPSA_SCRIPTS/run_line.py" {output.metrics}'
