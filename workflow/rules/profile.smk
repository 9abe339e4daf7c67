# Plain `snakemake` runs with the default profile (workflow/profiles/default), as `with-env snakemake` does.
#
# Snakemake looks for a default profile only in `profiles/default` beside the Snakefile or in the working
# directory, and in $SNAKEMAKE_PROFILE; this workflow keeps its profiles under workflow/profiles. So when
# the command line names no profile and $SNAKEMAKE_PROFILE is unset, the Snakemake command restarts itself
# once with SNAKEMAKE_PROFILE pointing at the default profile, before anything is read or locked. Any
# option given on the command line still wins over the profile's value (e.g. `snakemake --cores 8`).

import os
import sys
from pathlib import Path

DEFAULT_PROFILE = Path(workflow.basedir).resolve() / "workflow" / "profiles" / "default"


def _names_a_profile(argv):
    """True when the command line or the environment already picks a profile (or `--profile none`)."""
    on_command_line = any(arg == "--profile" or arg.startswith("--profile=") for arg in argv)
    return on_command_line or bool(os.environ.get("SNAKEMAKE_PROFILE"))


def _snakemake_command_line():
    """True when this process is the `snakemake` command (or `python -m snakemake`), not a library call."""
    launcher = Path(sys.argv[0])
    as_module = launcher.name == "__main__.py" and launcher.parent.name == "snakemake"
    return launcher.name == "snakemake" or as_module


def _restart_with_default_profile():
    sys.stdout.flush()
    sys.stderr.flush()
    env = {**os.environ, "SNAKEMAKE_PROFILE": str(DEFAULT_PROFILE)}
    os.execve(sys.executable, [sys.executable, "-m", "snakemake", *sys.argv[1:]], env)


if workflow.is_main_process and _snakemake_command_line() and not _names_a_profile(sys.argv[1:]):
    _restart_with_default_profile()
