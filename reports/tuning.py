"""Optuna trials for the report: from an exported trials table or straight from the study storage.

An exported table carries no search-space definitions, so for parameter importances the study is
rebuilt in memory with distributions spanning the values actually tried (log scale when a positive
range covers a decade or more); fANOVA only needs the observed values and their ranges.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from palimpsa.credentials import mask_url


class TuningInputError(ValueError):
    """The tuning source cannot be read (missing file, unknown study, no value column)."""


@dataclass
class TuningData:
    trials: pl.DataFrame  # number, value, state, params_<name> ...
    study_name: str
    maximize: bool
    importances: dict[str, float] | None
    importance_note: str  # why importances are missing, or how they were computed

    @property
    def complete(self) -> pl.DataFrame:
        return self.trials.filter((pl.col("state") == "COMPLETE") & pl.col("value").is_not_null())

    @property
    def param_columns(self) -> list[str]:
        return [c for c in self.trials.columns if c.startswith("params_")]


def _from_storage(url: str, study_name: str | None):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if study_name is None:
        names = optuna.get_all_study_names(storage=url)
        if len(names) != 1:
            where = mask_url(url)
            raise TuningInputError(f"{where}: give --study, the storage holds {len(names)} studies: {names}")
        study_name = names[0]
    try:
        return optuna.load_study(study_name=study_name, storage=url)
    except KeyError:
        raise TuningInputError(f"{mask_url(url)}: no study named {study_name!r}") from None


def _study_table(study) -> pl.DataFrame:
    rows = []
    for t in study.trials:
        row = {"number": t.number, "value": t.value, "state": t.state.name}
        row.update({f"params_{k}": v for k, v in t.params.items()})
        rows.append(row)
    return pl.DataFrame(rows)


def _normalise(df: pl.DataFrame, source: str) -> pl.DataFrame:
    """Common columns: number, value, state, params_<name> (from the tuner's or Optuna's own layout)."""
    if "value" not in df.columns:
        raise TuningInputError(f"{source}: the trials table has no 'value' column")
    df = df.rename({c: "params_" + c[len("param.") :] for c in df.columns if c.startswith("param.")})
    if "number" not in df.columns:
        df = df.rename({"trial": "number"}) if "trial" in df.columns else df.with_row_index("number")
    if "state" not in df.columns:
        df = df.with_columns(pl.lit("COMPLETE").alias("state"))
    df = df.with_columns(pl.col("state").cast(pl.String).str.replace(r"^TrialState\.", ""))
    return df.with_columns(pl.col("value").cast(pl.Float64)).sort("number")


def _distribution(values: list):
    import optuna

    if all(isinstance(v, bool) for v in values) or any(isinstance(v, str) for v in values):
        return optuna.distributions.CategoricalDistribution(sorted(set(values), key=str))
    low, high = min(values), max(values)
    if all(isinstance(v, int) for v in values):
        return optuna.distributions.IntDistribution(int(low), int(high))
    log = low > 0 and high / low >= 10
    return optuna.distributions.FloatDistribution(float(low), float(high), log=log)


def importances_from_table(trials: pl.DataFrame, maximize: bool) -> tuple[dict[str, float] | None, str]:
    """fANOVA importances of the varied parameters, or None and the reason."""
    import optuna

    done = trials.filter((pl.col("state") == "COMPLETE") & pl.col("value").is_not_null())
    params = [
        c for c in done.columns if c.startswith("params_") and done.get_column(c).drop_nulls().n_unique() > 1
    ]
    if done.height < 3:
        return None, f"only {done.height} completed trials (fANOVA needs at least 3)"
    if not params:
        return None, "no parameter took more than one value"
    dists = {c[len("params_") :]: _distribution(done.get_column(c).drop_nulls().to_list()) for c in params}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if maximize else "minimize")
    for row in done.iter_rows(named=True):
        chosen = {name: row[f"params_{name}"] for name in dists if row[f"params_{name}"] is not None}
        study.add_trial(
            optuna.trial.create_trial(
                params=chosen, distributions={k: dists[k] for k in chosen}, value=float(row["value"])
            )
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        imp = optuna.importance.get_param_importances(study)
    return {k: float(v) for k, v in imp.items()}, f"fANOVA over {done.height} completed trials"


def _direction_next_to(path: Path, default_maximize: bool) -> bool:
    """``best.yaml`` beside ``trials.parquet`` names the study's direction."""
    best = path.parent / "best.yaml"
    if best.is_file():
        from palimpsa.io import read_yaml

        doc = read_yaml(best) or {}
        if isinstance(doc, dict) and doc.get("direction") in ("maximize", "minimize"):
            return doc["direction"] == "maximize"
    return default_maximize


def _from_table(path: Path, study_name: str | None, default_maximize: bool) -> TuningData:
    trials = _normalise(pl.read_parquet(path), str(path))
    name = study_name or (path.parent.name if path.name == "trials.parquet" else path.stem)
    if "study" in trials.columns and trials.get_column("study").drop_nulls().len():
        name = str(trials.get_column("study").drop_nulls()[0])
    maximize = _direction_next_to(path, default_maximize)
    importances, note = importances_from_table(trials, maximize)
    return TuningData(
        trials=trials, study_name=name, maximize=maximize, importances=importances, importance_note=note
    )


def load_tuning(source: str, study_name: str | None, default_maximize: bool) -> list[TuningData]:
    """Studies from a ``trials.parquet``, a folder of ``<study>/trials.parquet`` (the workflow's
    ``results/tuning``) or an Optuna storage URL such as ``sqlite:///x.db`` (with ``study_name``)."""
    path = Path(source)
    if "://" in source:
        study = _from_storage(source, study_name)
        trials = _normalise(_study_table(study), mask_url(source))
        maximize = study.direction.name == "MAXIMIZE"
        importances, note = importances_from_table(trials, maximize)
        return [TuningData(trials, study.study_name, maximize, importances, note)]
    if path.is_dir():
        tables = sorted(path.glob("trials.parquet")) + sorted(path.glob("*/trials.parquet"))
        if study_name is not None:
            tables = [t for t in tables if t.parent.name == study_name]
        return [_from_table(t, None, default_maximize) for t in tables]
    if not path.is_file():
        raise TuningInputError(f"{source}: no trials table, tuning folder or storage URL")
    return [_from_table(path, study_name, default_maximize)]
