# One MLflow experiment per grid with a parent sweep run; one job and one nested MLflow run per point.


rule sweep:
    """The grid's MLflow experiment and its parent sweep run (created once, never rewritten)."""
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
    shell:
        "{PY} {SCRIPTS}/mlflow_store.py sweep --tracking-uri '{TRACKING_URI}'"
        " --grid {wildcards.grid} --experiment {params.experiment:q} --description {params.description:q}"
        " --tags {params.tags:q} --out {output} > {log} 2>&1"


def _point(w):
    return GRIDS[w.grid].point(w.point)


rule point_config:
    """Write the point's run config (run.yaml, tracking included): `palimpsa train` on it reproduces the run."""
    input:
        sweep=f"{RUNS}/{{grid}}/sweep.json",
        overrides_from=lambda w: list(GRIDS[w.grid].overrides_from),
    output:
        config=f"{RUNS}/{{grid}}/{{point}}/run.yaml",
        point=f"{RUNS}/{{grid}}/{{point}}/point.json",
    params:
        # The resolved config is a param: Snakemake reruns the point when it changes.
        config=lambda w: json.dumps(_point(w).config, sort_keys=True),
    localrule: True
    run:
        from palimpsa.grid import write_point

        write_point(
            _point(wildcards),
            GRIDS[wildcards.grid],
            sweep_file=input.sweep,
            config_out=output.config,
            point_out=output.point,
            tracking_uri=TRACKING_URI,
        )


rule train:
    """Train one grid point; a failure fails this job only (its MLflow run is marked FAILED)."""
    input:
        config=f"{RUNS}/{{grid}}/{{point}}/run.yaml",
        data=lambda w: data_marker(_point(w).config),
        mlflow=MLFLOW_READY,
    output:
        metrics=f"{RUNS}/{{grid}}/{{point}}/metrics.json",
    params:
        out=lambda w: point_dir(w.grid, w.point),
    log:
        f"{RUNS}/{{grid}}/{{point}}/train.log",
    threads: 1
    resources:
        gpu=0,
    shell:
        LAUNCH
        + " {PY} -m palimpsa train {input.config} --out {params.out} --data-dir {DATA_CACHE} --quiet > {log} 2>&1"
