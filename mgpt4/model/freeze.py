"""The freeze policy: a declared set of modules that train; everything else is frozen.

The projection always trains; with `model.lora` the LLM's LoRA adapters train next to it (their
modules, `...q_proj.lora_A`, are declared by name once they are attached: `trainable_modules`).
"""

from __future__ import annotations

from torch import nn

# In both official stages exactly the projection trains.
TRAINABLE_MODULES: tuple[str, ...] = ("llama_proj",)


def is_trainable(param_name: str, modules: tuple[str, ...] = TRAINABLE_MODULES) -> bool:
    """A parameter trains when it is one of `modules` or belongs to one (dotted names, no wildcards)."""
    return any(param_name == m or param_name.startswith(f"{m}.") for m in modules)


def trainable_modules(model: nn.Module) -> tuple[str, ...]:
    """The policy for `model`: the projection, and the LoRA adapter modules it holds (`model.lora`)."""
    from mgpt4.model.lora import lora_modules

    return TRAINABLE_MODULES + lora_modules(model)


def apply_freeze(model: nn.Module, modules: tuple[str, ...] | None = None) -> list[str]:
    """Set requires_grad from the policy and put frozen children in eval mode; returns the trainable names.
    `modules` None: `trainable_modules(model)`.

    ValueError when `modules` is empty or names a module without parameters in `model`."""
    if modules is None:
        modules = trainable_modules(model)
    if not modules:
        raise ValueError("freeze policy: no trainable modules given")
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(name, modules))
        if param.requires_grad:
            trainable.append(name)
    unmatched = [m for m in modules if not any(is_trainable(n, (m,)) for n in trainable)]
    if unmatched:
        raise ValueError(
            f"freeze policy: trainable module(s) {unmatched} match no parameter of {type(model).__name__}"
        )
    # MiniGPT4.train keeps frozen children in eval; calling it re-applies that after the change above.
    model.train(model.training)
    return trainable
