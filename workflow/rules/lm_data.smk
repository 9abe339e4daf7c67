# Language-model data: each BPE tokenizer is trained once (per corpus and vocabulary size), then every LM
# dataset (task config and seed) is tokenized, packed and cut into windows in the shared data cache.
#
# `lm_dataset` writes the marker that training jobs already wait for (DATA_CACHE/ready/<key>.json, see
# data.smk) for the LM keys and takes them over from the generic `dataset` rule (ruleorder below), so the
# train rule needs no change. It waits for its tokenizer: datasets of one corpus (seeds, lengths, sizes)
# never train the same tokenizer twice, even when they run in parallel. Both rules take up to 8 cores:
# tokenizers trains and encodes on as many threads as the job has (RAYON_NUM_THREADS).

# What a trained BPE depends on among the task's fields: datasets that agree on them share one tokenizer.
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
# dataset key -> tokenizer key, for every LM dataset that trains a BPE (tokenizer: bpe:<n>)
LM_TOKENIZER_OF = {
    key: "tok-"
    + hashlib.sha256(
        json.dumps({f: s["task"].get(f) for f in LM_TOKENIZER_FIELDS}, sort_keys=True, default=str).encode()
    ).hexdigest()[:12]
    for key, s in DATASETS.items()
    if s["task"]["name"] == "lm" and str(s["task"].get("tokenizer") or "").startswith("bpe:")
}
# tokenizer key -> one dataset spec that trains it; dataset key -> the tokenizer marker its job waits for
LM_TOKENIZERS = {tok: DATASETS[key] for key, tok in sorted(LM_TOKENIZER_OF.items())}
LM_TOKENIZER_INPUT = {k: f"{DATA_CACHE}/tokenizers/ready/{tok}.json" for k, tok in LM_TOKENIZER_OF.items()}


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
    threads: 8
    resources:
        gpu=0,
    conda:
        CONDA_ENV
    shell:
        'RAYON_NUM_THREADS={threads} "$PALIMPSA_PY" "$PALIMPSA_SCRIPTS"/prepare_lm.py'
        " --task-json {params.spec:q} --cache {params.cache}"
        " --tokenizer-only --out {output.marker} > {log} 2>&1"


rule lm_dataset:
    """Tokenize, pack and window one LM dataset (per task config and seed) into the shared cache, once."""
    input:
        tokenizer=lambda w: LM_TOKENIZER_INPUT.get(w.key, []),
    output:
        marker=f"{DATA_CACHE}/ready/{{key}}.json",
    params:
        spec=lambda w: json.dumps(DATASETS[w.key], sort_keys=True),
        cache=lambda w, output: str(Path(output.marker).parent.parent),
    log:
        f"{DATA_CACHE}/ready/{{key}}.log",
    wildcard_constraints:
        key=r"lm-[0-9a-f]{12}",
    threads: 8
    resources:
        gpu=0,
    conda:
        CONDA_ENV
    shell:
        'RAYON_NUM_THREADS={threads} "$PALIMPSA_PY" "$PALIMPSA_SCRIPTS"/prepare_lm.py'
        " --task-json {params.spec:q} --cache {params.cache}"
        " --out {output.marker} > {log} 2>&1"


ruleorder: lm_dataset > dataset
