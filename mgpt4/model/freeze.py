"""The freeze policy: a declared set of module patterns that train; everything else is frozen."""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

# In both official stages exactly the projection trains.
TRAINABLE_MODULES: tuple[str, ...] = ("llama_proj",)


def is_trainable(param_name: str, patterns: tuple[str, ...] = TRAINABLE_MODULES) -> bool:
    """A parameter trains when its owning module (or the parameter itself) matches a pattern."""
    return any(fnmatchcase(param_name, p) or fnmatchcase(param_name, f"{p}.*") for p in patterns)


def apply_freeze(model: nn.Module, patterns: tuple[str, ...] = TRAINABLE_MODULES) -> list[str]:
    """Set requires_grad from the policy and put frozen children in eval mode; returns the trainable names."""
    if not patterns:
        raise ValueError("freeze policy: no trainable module patterns given")
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(name, patterns))
        if param.requires_grad:
            trainable.append(name)
    unmatched = [p for p in patterns if not any(is_trainable(n, (p,)) for n in trainable)]
    if unmatched:
        raise ValueError(
            f"freeze policy: pattern(s) {unmatched} match no parameter of {type(model).__name__}"
        )
    # MiniGPT4.train keeps frozen children in eval; calling it re-applies that after the change above.
    model.train(model.training)
    return trainable
