"""Reproduce every experiment: `snakemake` (the CPU smoke grid, with workflow/profiles/default).

Thin on purpose: the config, its validation and the grid expansion live in workflow/rules/common.smk
and palimpsa/grid.py; each stage is one file under workflow/rules/.
"""

from snakemake.utils import min_version

min_version("9.0")


include: "workflow/rules/profile.smk"


configfile: f"{workflow.basedir}/workflow/config.yaml"


include: "workflow/rules/common.smk"


rule all:
    input:
        all_targets(),
    default_target: True


include: "workflow/rules/data.smk"
include: "workflow/rules/lm_data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/tune.smk"
include: "workflow/rules/results.smk"
include: "workflow/rules/messages.smk"


onsuccess:
    print(success_message(), flush=True)


onerror:
    print(failure_message(), flush=True)
