# Config validation, grid expansion and target lists shared by every rule file.
#
# Everything here runs when Snakemake parses the workflow: a malformed workflow config, grid or
# study spec stops the run before any job starts, with one line naming the file and the key.

import hashlib
import json
import os
import re
import shlex
import sys
from pathlib import Path

from snakemake_interface_executor_plugins.settings import DeploymentMethod

BASEDIR = str(Path(workflow.basedir).resolve())
sys.path.insert(0, BASEDIR)  # the checkout's palimpsa package, installed or not

from palimpsa.atomic import file_mode  # noqa: E402
from palimpsa.config import ConfigError  # noqa: E402
from palimpsa.credentials import has_password, mask_url, reject_passwords  # noqa: E402
from palimpsa.grid import load_grid, schema_errors  # noqa: E402
from palimpsa.tuning import load_tune_spec, storage_url  # noqa: E402

# Jobs run in the interpreter that runs Snakemake, or with `--sdm conda` in the environment.yml env that
# each rule names. The interpreter and the scripts folder reach the shell commands as environment
# variables ($PALIMPSA_PY, $PALIMPSA_SCRIPTS) and not as params, since a new checkout path or virtualenv
# must not make Snakemake retrain every point.
CONDA_ENV = f"{BASEDIR}/environment.yml"
USES_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
PY = "python" if USES_CONDA else sys.executable
SCRIPTS = f"{BASEDIR}/workflow/scripts"


def _user_error(message):
    """Stop at parse time with one clear line and no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _config_sources():
    files = [str(f) for f in getattr(workflow, "configfiles", [])] or ["workflow/config.yaml"]
    return " + ".join(dict.fromkeys(files))


_errors = schema_errors(config, Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml")
if _errors:
    _user_error(f"{_config_sources()}: {_errors[0][0] or '(top level)'}: {_errors[0][1]}")
config.setdefault("run_overrides", {})
config.setdefault("data_cache", "results/data")
config["tuning"].setdefault("workers", 1)
config["tuning"].setdefault("storage", None)
config["tuning"].setdefault("storage_env", None)
config["tuning"].setdefault("storage_file", None)
config["tuning"].setdefault("n_trials", None)
config["report"].setdefault("module", "reports.build")

RESULTS = config["results"].rstrip("/")
RUNS = f"{RESULTS}/runs"
TUNING = f"{RESULTS}/tuning"
TABLES = f"{RESULTS}/tables"
DATA_CACHE = config["data_cache"]
MLFLOW_READY = f"{RESULTS}/meta/mlflow-store.json"
RUN_OVERRIDES = config["run_overrides"]


def _check_credentials():
    """Passwords stay out of the config (job logs and params copy it): the environment, an owner-only file or
    ~/.pgpass hold them. The Optuna storage is read once here, so a missing variable stops the run now."""
    tuning = config["tuning"]
    try:
        reject_passwords(config)
        if sum(bool(tuning[k]) for k in ("storage", "storage_env", "storage_file")) > 1:
            raise ConfigError("tuning", "give one of storage, storage_env and storage_file")
        storage_url(env=tuning["storage_env"], file=tuning["storage_file"])
        file_mode()
    except ConfigError as err:
        _user_error(f"{_config_sources()}: {err}")


_check_credentials()
TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or config["mlflow"]["tracking_uri"]

# What every job sees, wherever it runs: the checkout's package (whatever the working directory), the
# MLflow store every job (trainer, tuning, report) logs to, the interpreter and the workflow's scripts.
os.environ.update(
    PYTHONPATH=os.pathsep.join(filter(None, [BASEDIR, os.environ.get("PYTHONPATH")])),
    MLFLOW_TRACKING_URI=TRACKING_URI,
    PALIMPSA_PY=PY,
    PALIMPSA_SCRIPTS=SCRIPTS,
)
# Declared variables are handed to jobs, by some executors as `export VAR=value &&` on the job's command
# line, where the process list shows them: a tracking URI with a password is inherited instead (local and
# SLURM jobs start in this environment), and so are MLFLOW_TRACKING_USERNAME / _PASSWORD.
JOB_ENVVARS = ["PYTHONPATH", "PALIMPSA_PY", "PALIMPSA_SCRIPTS"]
if not has_password(TRACKING_URI):
    JOB_ENVVARS.append("MLFLOW_TRACKING_URI")


envvars:
    *JOB_ENVVARS,


# --------------------------------------------------------------------------- grids

GRIDS = {}
try:
    for _ref in config["grids"]:
        _grid = load_grid(_ref, extra=RUN_OVERRIDES)
        if _grid.name in GRIDS:
            _user_error(f"{_config_sources()}: grids: two grids named {_grid.name!r} ({_ref})")
        GRIDS[_grid.name] = _grid
    STUDIES = {}
    for _ref in config["tuning"]["studies"]:
        _spec = load_tune_spec(_ref, extra=RUN_OVERRIDES)
        if _spec.name in STUDIES:
            _user_error(f"{_config_sources()}: tuning.studies: two studies named {_spec.name!r} ({_ref})")
        STUDIES[_spec.name] = _spec
except ConfigError as _err:
    _user_error(str(_err))


def point_dir(grid, point):
    return f"{RUNS}/{grid}/{point}"


def grid_point(wildcards):
    return GRIDS[wildcards.grid].point(wildcards.point)


def write_point_files(wildcards, input, output, log):
    """The point's run.yaml (tracking included: `palimpsa train` on it reproduces the run) and point.json."""
    from palimpsa.grid import write_point

    write_point(
        grid_point(wildcards),
        GRIDS[wildcards.grid],
        sweep_file=input.sweep,
        config_out=output.config,
        point_out=output.point,
        tracking_uri=TRACKING_URI,
    )
    Path(log[0]).write_text(f"wrote {output.config} and {output.point}\n")


# --------------------------------------------------------------------------- datasets


def data_key(cfg):
    """One dataset per (task config, seed): what palimpsa.tasks.build_task caches."""
    payload = json.dumps({"task": cfg["task"], "seed": cfg["seed"]}, sort_keys=True, default=str)
    return f"{cfg['task']['name']}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


DATASETS = {}
for _grid in GRIDS.values():
    for _p in _grid.points:
        DATASETS.setdefault(data_key(_p.config), {"task": _p.config["task"], "seed": _p.config["seed"]})
for _spec in STUDIES.values():
    DATASETS.setdefault(data_key(_spec.config), {"task": _spec.config["task"], "seed": _spec.config["seed"]})


def data_marker(cfg):
    return f"{DATA_CACHE}/ready/{data_key(cfg)}.json"


def cache_of_marker(marker):
    """The data cache folder of a dataset marker (DATA_CACHE/ready/<key>.json)."""
    return str(Path(marker).parent.parent)


# --------------------------------------------------------------------------- targets


def run_metrics():
    return [f"{point_dir(g.name, p.point_id)}/metrics.json" for g in GRIDS.values() for p in g.points]


def tuning_outputs():
    return [f"{TUNING}/{s}/best.yaml" for s in STUDIES]


def table_outputs():
    return [f"{TABLES}/runs.parquet", f"{TABLES}/curves.parquet"] if GRIDS else []


def sweep_summaries():
    return [f"{RUNS}/{g}/summary.json" for g in GRIDS]


def all_targets():
    targets = run_metrics() + tuning_outputs() + table_outputs() + sweep_summaries()
    if config["report"]["enabled"]:
        targets.append(f"{RESULTS}/report/index.html")
    return targets


# --------------------------------------------------------------------------- tuning commands


def _storage_arg(study):
    """The storage as the worker finds it: a URL without a password, or the name of the variable or file that
    holds one (never the URL itself, which would show in the process list and the job's params)."""
    options = {"storage": "--storage", "storage_env": "--storage-env", "storage_file": "--storage-file"}
    given = [(option, config["tuning"][key]) for key, option in options.items() if config["tuning"][key]]
    return " ".join(f"{option} {shlex.quote(str(value))}" for option, value in given)


def tune_cmd(study, stage):
    """`python -m palimpsa.tuning` for one stage (init, work, best) of a study."""
    overrides = " ".join(f"--set {shlex.quote(f'{k}={json.dumps(v)}')}" for k, v in RUN_OVERRIDES.items())
    n_trials = config["tuning"]["n_trials"]
    return (
        f'"$PALIMPSA_PY" -m palimpsa.tuning {shlex.quote(str(STUDIES[study].path))} --stage {stage}'
        f" --out {TUNING}/{study} --data-dir {DATA_CACHE} {_storage_arg(study)} {overrides}"
        f"{f' --n-trials {n_trials}' if n_trials else ''}"
    )


wildcard_constraints:
    grid="|".join(map(re.escape, GRIDS)) or "NO_GRID",
    point=r"[A-Za-z0-9][A-Za-z0-9_.+-]*",
    study="|".join(map(re.escape, STUDIES)) or "NO_STUDY",
    worker=r"\d+",
    key=r"[A-Za-z0-9_.+-]+",
