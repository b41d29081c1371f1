"""Stage 2: fine-tune the projection on cc_sbu_align. `deepspeed launchers/finetune.py --deepspeed ds_configs/z2.json`"""

from mgpt4.train.cli import main

if __name__ == "__main__":
    main(default_recipe="tiny_stage2", description=__doc__)
