# One tidy results table over every grid point (polars, parquet), the curves, each grid's summary on its
# MLflow sweep run, and the report.


rule collect:
    """runs.parquet: one row per point (grid, axes, config, metrics); curves.parquet: one row per eval."""
    input:
        metrics=run_metrics(),
    output:
        runs=f"{TABLES}/runs.parquet",
        curves=f"{TABLES}/curves.parquet",
    log:
        f"{TABLES}/collect.log",
    localrule: True
    conda:
        CONDA_ENV
    shell:
        '"$PALIMPSA_PY" -m palimpsa.results --runs-out {output.runs} --curves-out {output.curves}'
        " {input.metrics} > {log} 2>&1"


rule sweep_summary:
    """The grid's summary on its sweep run: points, the best point and its metric, the grid's table."""
    input:
        sweep=f"{RUNS}/{{grid}}/sweep.json",
        runs=f"{TABLES}/runs.parquet",
    output:
        f"{RUNS}/{{grid}}/summary.json",
    log:
        f"{RUNS}/{{grid}}/summary.log",
    localrule: True
    conda:
        CONDA_ENV
    shell:
        '"$PALIMPSA_PY" "$PALIMPSA_SCRIPTS/mlflow_store.py" summary --sweep {input.sweep}'
        " --table {input.runs} --out {output} > {log} 2>&1"


rule report:
    """Render the report from the tables and the tuning outputs (module: config report.module)."""
    input:
        runs=table_outputs(),
        tuning=tuning_outputs(),
    output:
        html=report(
            f"{RESULTS}/report/index.html",
            caption="../../reports/templates/report.rst",
            category="Analysis report",
        ),
        figures=report(
            directory(f"{RESULTS}/report/figures"),
            patterns=["{name}.png"],
            caption="../../reports/templates/figures.rst",
            category="Figures",
        ),
    params:
        module=config["report"]["module"],
        # folders and tables the report reads, whether or not this run produced them
        table=lambda w: f"{TABLES}/runs.parquet",
        curves=lambda w: f"{TABLES}/curves.parquet",
        tuning=lambda w: TUNING,
    log:
        f"{RESULTS}/report/build.log",
    localrule: True
    conda:
        CONDA_ENV
    shell:
        '"$PALIMPSA_PY" -m {params.module} --table {params.table}'
        " --curves {params.curves} --tuning {params.tuning} --out {output.html} > {log} 2>&1"
