"""`python -m mgpt4.plan`: what a recipe needs per GPU under ZeRO-2, ZeRO-3 and ZeRO-3 with offload, before
any weight is read.

    python -m mgpt4.plan --recipe stage2_vicuna13b --gpus 4 --gpu-memory 40

`weights.py` counts every parameter of a meta-device build (by part and dtype; quantised LLM layers as
bitsandbytes stores them), `optimizer.py` the trainable set's copies as DeepSpeed keeps them per rank,
`activations.py` the bytes a training forward saves for backward, `fit.py` adds them up per ZeRO setting
and finds the largest micro-batch that fits; `__main__.py` prints it. The CPU tests check the weights and
optimizer bytes against the built model and its optimizer exactly, and the activations against the bytes
autograd saves (`tests/test_plan.py`).
"""
