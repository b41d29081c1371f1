"""Loading a model for inference, shared by chat, the web demo, curation (describe) and evaluation.

`loader.py` turns a run folder, a checkpoint folder or the official weight files (`ModelSource`)
into a placed, frozen, eval-mode model (`load_model`); `from_export.py` reads an export folder back
(`--checkpoint EXPORT_DIR`); `placement.py` puts its parts on devices (8-bit LLM, vision path on the
CPU); `flags.py` derives the model and decoding flags from their dataclasses.
"""

from mgpt4.inference.loader import ModelSource, check_source, load_model, model_config

__all__ = ["ModelSource", "check_source", "load_model", "model_config"]
