"""Palimpsa lab: the model family and the lab that runs experiments on it.

The model (imports torch, triton kernels and yaml only; enough on a bare GPU box):
    ``config`` (one typed config per run), ``layers/`` (one module per mixer), ``model`` (the causal LM,
    generation, checkpoints), ``tasks/`` (MQAR, MAD, language modelling), ``conversion`` (metaplastic
    surgery), ``diagnostics`` (importance-state statistics), ``errors``, ``io``, ``atomic`` (atomic writes,
    the file-mode policy), ``credentials`` (URL masking, where secrets are read from).

The lab (brings in MLflow, Optuna, polars, Snakemake where it is used):
    ``training/`` (one run: loop, checkpoints, evaluation, tracking lifecycle), ``distributed`` (data
    parallelism), ``grid`` (declarative ablation grids), ``tuning`` (Optuna studies), ``tracking`` (MLflow),
    ``results`` (tidy tables), ``cli`` (``palimpsa ...``).

Nothing in the model imports the lab; ``kernels`` imports neither; ``reports`` and ``workflow`` sit on top.
"""
