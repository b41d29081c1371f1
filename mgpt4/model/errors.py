"""The error of weight files and folders that do not fit the model (a leaf: the loaders and the LLM
construction both raise it)."""

from __future__ import annotations


class WeightsError(ValueError):
    """A weight file does not fit the model; the message lists every problem found."""
