"""Share a trained model: `python -m mgpt4.export hf` writes a folder that transformers loads on its own.

- `hf.py`: `export_hf`, the folder (weights, config, processor, generation config, model card), written
  into a temporary sibling and renamed into place.
- `hf_blip2.py`: a model with a Q-Former as transformers' `Blip2ForConditionalGeneration`.
- `hf_llama2.py` + `modeling_minigpt4_llama2.py`: the LLaMA-2 variant (no Q-Former) with its modeling
  code in the folder (`trust_remote_code=True`).
- `weights.py`: the EVA ViT -> `Blip2VisionModel` renames and the LLM with room for `<image>`.
- `processor.py`: tokenizer with `<image>`, image processor, chat template, generation config, and the
  check that the processor tokenizes prompts as mgpt4 does.
- `model_card.py`: the folder's README.md.

The model is loaded through `mgpt4.inference.load_model` (a run folder, a checkpoint or official files).
"""

from mgpt4.export.hf import ExportError, export_hf
from mgpt4.export.model_card import ExportFacts

__all__ = ["ExportError", "ExportFacts", "export_hf"]
