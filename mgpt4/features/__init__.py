"""A reusable frozen-feature cache: the ViT, ln_vision and Q-Former run once over the data.

    python -m mgpt4.features extract --recipe stage1_vicuna13b --out /data/features   # any launcher
    deepspeed launchers/pretrain.py --recipe stage1_vicuna13b --set data.kind=features \
        --set data.features_root=/data/features

The Q-Former's output does not depend on the LLM, so one pass serves stage 1 of every LLM a team tries:
training from the cache reads [num_query_tokens, qformer width] per sample instead of decoding and
encoding an image (`mgpt4/data/feature_shards.py` holds the format). The cache fixes one crop per sample,
drawn from the sample's shard name and key (`data.crops: sample`), as a one-epoch run from images would.
"""
