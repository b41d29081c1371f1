"""Evaluation of a trained checkpoint: COCO caption metrics (the validation loss during training lives
in `mgpt4.train.validation`).

    python -m mgpt4.eval captions --checkpoint RUN --images DIR --references refs.json --out DIR
    python -m mgpt4.eval score --predictions DIR/predictions.jsonl --references refs.json

`captions` generates a caption per image (batched, greedy by default, across ranks under the
deepspeed launcher) and scores them with pycocoevalcap (`scores.py`); `references.py` reads the COCO
captions format and matches it to the images.

Benchmarks: `lmms_model.py` is the lmms-eval model `mgpt4` (`python -m lmms_eval --model mgpt4 ...`), and
`python -m mgpt4.eval bench --checkpoint RUN --tasks ...` (`bench.py`) runs lmms-eval on a run's newest
checkpoint and writes the scores to its TensorBoard and metrics.json.
"""
