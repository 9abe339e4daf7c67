# What the terminal says when the pipeline ends (the Snakefile's onsuccess / onerror): where the report,
# the tables and the best results are, and the command that opens the MLflow UI on them.

UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def _shown(path):
    """A path as the user types it: relative in the checkout they started from, else absolute."""
    here = Path.cwd().resolve()
    return str(path) if here == Path(BASEDIR) else str((here / path).resolve())


def _count(n, singular, plural):
    return f"{n} {singular if n == 1 else plural}"


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _read_yaml(path):
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None


def _experiment_ids():
    """(name, MLflow experiment id) of each grid (from its sweep.json) and each study (from the store)."""
    found = []
    for grid in GRIDS:
        sweep = _read_json(f"{RUNS}/{grid}/sweep.json")
        if sweep:
            found.append((grid, sweep["experiment_id"]))
    studies = [(s, (_read_json(f"{TUNING}/{s}/study.json") or {}).get("experiment")) for s in STUDIES]
    if any(name for _, name in studies):
        try:
            import mlflow

            client = mlflow.MlflowClient(TRACKING_URI)
            for study, name in studies:
                experiment = client.get_experiment_by_name(name) if name else None
                if experiment is not None:
                    found.append((study, experiment.experiment_id))
        except Exception:  # the links are a convenience; the store may be out of reach from here
            pass
    return found


def mlflow_ui_lines():
    """The command that opens the UI on this store and the page of each grid's runs (passwords masked)."""
    uri = mask_url(TRACKING_URI)
    db = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
    if db is not None:
        command, address = f"mlflow ui --backend-store-uri sqlite:///{_shown(db)}", UI_ADDRESS
    elif uri.startswith(("http://", "https://")):
        command, address = None, uri.rstrip("/")
    else:
        command, address = f"mlflow ui --backend-store-uri {uri}", UI_ADDRESS
    pages = [f"{address}/#/experiments/{exp_id}/runs ({name})" for name, exp_id in _experiment_ids()]
    pages = pages or [f"{address}/#/experiments"]
    verb = "then open" if command else "open"
    steps = [command] if command else []
    steps += [f"{verb} {pages[0]}", *[f"{'':{len(verb)}} {page}" for page in pages[1:]]]
    return [f"  {'MLflow UI' if i == 0 else '':<10}  {step}" for i, step in enumerate(steps)]


def _best_lines():
    lines = []
    for grid in GRIDS:
        best = (_read_json(f"{RUNS}/{grid}/summary.json") or {}).get("best")
        if best:
            lines.append(f"{grid}: {best['point']} ({best['metric']} {best['value']:.4g})")
    for study in STUDIES:
        best = _read_yaml(f"{TUNING}/{study}/best.yaml")
        if isinstance(best, dict) and "value" in best:
            lines.append(f"{study}: trial {best.get('trial')} ({best.get('metric')} {best['value']:.4g})")
    return lines


def success_message():
    """Where everything is: only what exists, since a run may have built a single target."""
    points = run_metrics()
    finished = sum(Path(m).exists() for m in points)
    studies = sum(Path(t).exists() for t in tuning_outputs())
    lines = [
        f"Palimpsa pipeline done: {finished} of {_count(len(points), 'grid point', 'grid points')} and "
        f"{studies} of {_count(len(STUDIES), 'tuning study', 'tuning studies')} finished."
    ]
    report_html = f"{RESULTS}/report/index.html"
    if config["report"]["enabled"] and Path(report_html).exists():
        lines.append(f"  report      {_shown(report_html)}")
    tables = [_shown(t) for t in table_outputs() if Path(t).exists()]
    if tables:
        lines.append(f"  tables      {', '.join(tables)}")
    if finished:
        lines.append(f"  runs        {_shown(RUNS)}/<grid>/<point>/ (metrics.json, history.jsonl, train.log)")
    tuned = [_shown(t) for t in tuning_outputs() if Path(t).exists()]
    lines += [f"  {'tuning' if i == 0 else '':<10}  {t}" for i, t in enumerate(tuned)]
    lines += [f"  {'best' if i == 0 else '':<10}  {b}" for i, b in enumerate(_best_lines())]
    return "\n".join(lines + mlflow_ui_lines())


def _last_line(path):
    """The last non-empty line of a job log: the one-line error every palimpsa command ends with."""
    try:
        lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines()]
    except OSError:
        return None
    last = next((line for line in reversed(lines) if line), None)
    return last if last is None or len(last) <= 300 else last[:297] + "..."


def _failed_jobs():
    """One line per failed job: rule, wildcards, the last line of its log and where the log is.

    The default profile keeps Snakemake's job blocks (errors included) off the terminal, so this is where
    a failure's reason shows; the scheduler's record of failed jobs is read where this Snakemake has one.
    """
    failed = getattr(getattr(workflow, "scheduler", None), "failed", None) or ()
    lines = []
    for job in sorted(failed, key=str):
        name = " ".join([job.rule.name, "/".join(map(str, job.wildcards or []))]).strip()
        logs = [str(f) for f in (job.log or [])]
        reason = next((line for line in map(_last_line, logs) if line), "no log line")
        log_hint = f" (log: {', '.join(_shown(f) for f in logs)})" if logs else ""
        lines.append(f"{name}: {reason}{log_hint}")
    return lines


def failure_message():
    """What failed, where to read why, and that a rerun keeps what finished."""
    failed = _failed_jobs()
    what = _count(len(failed), "job", "jobs") if failed else "a job"
    lines = [f"Palimpsa pipeline stopped: {what} failed."]
    lines += [f"  failed      {f}" for f in failed]
    lines.append("  Failed runs are FAILED in MLflow, with the reason in their failure_reason tag.")
    lines.append("  Fix the cause and run snakemake again: finished points are kept, interrupted ones resume")
    lines.append("  from their checkpoint.")
    return "\n".join(lines + mlflow_ui_lines())
