"""mgpt4: train MiniGPT-4 vision-language models on DeepSpeed."""

from mgpt4 import logs as _logs  # noqa: F401  (one console handler with the rank filter, for every command)

__version__ = "0.1.0"
