"""Training on DeepSpeed: recipes, the trainer's build order and loop, checkpoints and metrics.

    deepspeed launchers/pretrain.py --deepspeed ds_configs/z2.json     # cli.py -> trainer.py

`engine.py` is the only module of mgpt4 that imports `deepspeed`; everything else here (the
optimizer and schedule, the DeepSpeed JSON, checkpoint names, metrics, FLOPs) can be imported and
tested without it. The rank wiring every job shares is `mgpt4/dist.py`.
"""
