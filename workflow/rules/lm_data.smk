# Language-model data: each BPE tokenizer is trained once (per corpus and vocabulary size), then every LM
# dataset (task config and seed) is tokenized, packed and cut into windows in the shared data cache.
#
# `lm_dataset` writes the marker that training jobs already wait for (DATA_CACHE/ready/<key>.json, see
# data.smk) for the LM keys and takes them over from the generic `dataset` rule (ruleorder below), so the
# train rule needs no change. It waits for its tokenizer: datasets of one corpus (seeds, lengths, sizes)
# never train the same tokenizer twice, even when they run in parallel.

LM_TOKENIZER_FIELDS = (
    "tokenizer",
    "tokenizer_train_chars",
    "source",
    "path",
    "hf_dataset",
    "hf_config",
    "hf_split",
    "text_field",
    "val_fraction",
)


def lm_trains_tokenizer(task):
    return task["name"] == "lm" and str(task.get("tokenizer") or "").startswith("bpe:")


def lm_tokenizer_key(task):
    """One key per trained tokenizer: the task fields that a BPE depends on."""
    payload = json.dumps({k: task.get(k) for k in LM_TOKENIZER_FIELDS}, sort_keys=True, default=str)
    return f"tok-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


LM_TOKENIZERS = {}
for _spec in DATASETS.values():
    if lm_trains_tokenizer(_spec["task"]):
        LM_TOKENIZERS.setdefault(lm_tokenizer_key(_spec["task"]), _spec)


def lm_tokenizer_marker(wildcards):
    task = DATASETS[wildcards.key]["task"]
    if not lm_trains_tokenizer(task):
        return []
    return [f"{DATA_CACHE}/tokenizers/ready/{lm_tokenizer_key(task)}.json"]


rule lm_tokenizer:
    """Train one BPE tokenizer into DATA_CACHE/tokenizers (a file named by the digest of its corpus)."""
    output:
        marker=f"{DATA_CACHE}/tokenizers/ready/{{tok}}.json",
    params:
        spec=lambda w: json.dumps(LM_TOKENIZERS[w.tok], sort_keys=True),
        cache=lambda w, output: str(Path(output.marker).parent.parent.parent),
    log:
        f"{DATA_CACHE}/tokenizers/ready/{{tok}}.log",
    wildcard_constraints:
        tok=r"tok-[0-9a-f]{12}",
    threads: 1
    resources:
        gpu=0,
    conda:
        CONDA_ENV
    shell:
        '"$PALIMPSA_PY" "$PALIMPSA_SCRIPTS"/prepare_lm.py --task-json {params.spec:q} --cache {params.cache}'
        " --tokenizer-only --out {output.marker} > {log} 2>&1"


rule lm_dataset:
    """Tokenize, pack and window one LM dataset (per task config and seed) into the shared cache, once."""
    input:
        tokenizer=lm_tokenizer_marker,
    output:
        marker=f"{DATA_CACHE}/ready/{{key}}.json",
    params:
        spec=lambda w: json.dumps(DATASETS[w.key], sort_keys=True),
        cache=lambda w, output: str(Path(output.marker).parent.parent),
    log:
        f"{DATA_CACHE}/ready/{{key}}.log",
    wildcard_constraints:
        key=r"lm-[0-9a-f]{12}",
    threads: 1
    resources:
        gpu=0,
    conda:
        CONDA_ENV
    shell:
        '"$PALIMPSA_PY" "$PALIMPSA_SCRIPTS"/prepare_lm.py --task-json {params.spec:q} --cache {params.cache}'
        " --out {output.marker} > {log} 2>&1"


ruleorder: lm_dataset > dataset
