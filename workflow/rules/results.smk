# One tidy results table over every grid point (polars, parquet), the curves, and the report.


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
    shell:
        "{PY} -m palimpsa.results --runs-out {output.runs} --curves-out {output.curves}"
        " {input.metrics} > {log} 2>&1"


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
        table=f"{TABLES}/runs.parquet",
        curves=f"{TABLES}/curves.parquet",
    log:
        f"{RESULTS}/report/build.log",
    localrule: True
    shell:
        "{PY} -m {params.module} --table {params.table}"
        " --curves {params.curves} --tuning {TUNING} --out {output.html} > {log} 2>&1"
