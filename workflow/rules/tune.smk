# Optuna studies: one init job, N parallel worker jobs on the same storage, one job for best.yaml.


rule tune_init:
    """Create the study and its MLflow parent run once, before the workers race for it."""
    input:
        MLFLOW_READY,
    output:
        f"{TUNING}/{{study}}/study.json",
    params:
        cmd=lambda w: tune_cmd(w.study, "init"),
    log:
        f"{TUNING}/{{study}}/init.log",
    localrule: True
    conda:
        CONDA_ENV
    shell:
        "{params.cmd} > {log} 2>&1"


rule tune_worker:
    """One worker: runs trials until the study holds n_trials (other workers' trials count)."""
    input:
        study=f"{TUNING}/{{study}}/study.json",
        data=lambda w: data_marker(STUDIES[w.study].config),
    output:
        f"{TUNING}/{{study}}/worker-{{worker}}.json",
    params:
        cmd=lambda w: tune_cmd(w.study, "work"),
    log:
        f"{TUNING}/{{study}}/worker-{{worker}}.log",
    threads: 1
    # The longest jobs start first, so they do not trail behind the short training jobs.
    priority: 10
    resources:
        gpu=0,
    conda:
        CONDA_ENV
    shell:
        '"$PALIMPSA_PY" "$PALIMPSA_SCRIPTS/gpu_slot.py" --gpus {resources.gpu} --'
        " {params.cmd} --done-file {output} > {log} 2>&1"


rule tune_best:
    """Best parameters as dotted overrides (grids reference them with overrides_from) + trials table."""
    input:
        lambda w: expand(f"{TUNING}/{w.study}/worker-{{i}}.json", i=range(config["tuning"]["workers"])),
    output:
        best=f"{TUNING}/{{study}}/best.yaml",
        trials=f"{TUNING}/{{study}}/trials.parquet",
        curves=f"{TUNING}/{{study}}/trial_curves.parquet",
    params:
        cmd=lambda w: tune_cmd(w.study, "best"),
    log:
        f"{TUNING}/{{study}}/best.log",
    localrule: True
    conda:
        CONDA_ENV
    shell:
        "{params.cmd} > {log} 2>&1"
