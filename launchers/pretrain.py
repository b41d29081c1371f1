"""Stage 1: align the projection on image-caption shards. `deepspeed launchers/pretrain.py --deepspeed ds_configs/z2.json`"""

from mgpt4.train.cli import main

if __name__ == "__main__":
    main(default_recipe="tiny_stage1", description=__doc__)
