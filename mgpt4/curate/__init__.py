"""Data curation: from a stage-1 model to a cc_sbu_align set, in three resumable steps.

    python -m mgpt4.curate describe --images DIR --checkpoint CKPT --out work/describe
    python -m mgpt4.curate fix --input work/describe --out work/fix --base-url URL --model NAME
    python -m mgpt4.curate filter --input work/fix --out cc_sbu_align

Each step writes an item store (`store.py`): append-only JSONL parts keyed by item id, in which every
input item ends as `done` or `failed` with a reason, and which a re-run reads to skip finished items.
"""
