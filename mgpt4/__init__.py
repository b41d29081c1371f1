"""mgpt4: train MiniGPT-4 vision-language models on DeepSpeed."""

__version__ = "0.1.0"
