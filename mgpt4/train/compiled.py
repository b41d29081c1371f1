"""`train.compile`: the step's frozen vision forward and its LLM (forward, and backward through
AOTAutograd) compiled with `torch.compile`.

Every step has the same shapes (images [B, 3, S, S]; answers padded to max_txt_len, or packed rows of
`pack_rows x pack_length`), so each part compiles once, with static shapes (`dynamic=False`), on the first
step; later steps reuse the graphs. Calls without gradients (validation, generation) run eager. On the
CPU inductor generates C++/OpenMP kernels; on CUDA the mode is "reduce-overhead": the compiled parts are
replayed as CUDA graphs, which removes the launch overhead of the many small kernels of a step. `compiled_graphs()` counts what has been compiled, so a run can show
that it compiled once (the trainer logs it with every log window).

The projection (two tensors) and the loss stay eager. Not under ZeRO-3: there every parameter is
gathered by hooks around each module's call, which compiled graphs bypass (refused when the run starts).
"""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from mgpt4.model import MiniGPT4
from mgpt4.strict_config import ConfigError


def check_compile(compile_on: bool, zero_stage: int) -> None:
    """Refuse `train.compile` under ZeRO-3 (ConfigError naming the key)."""
    if compile_on and zero_stage == 3:
        raise ConfigError(
            "train.compile: not under ZeRO-3 (its hooks gather each module's parameters, which compiled "
            "graphs bypass); use a ZeRO-2 config or train.compile=false"
        )


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far (recompilations included)."""
    return int(counters["stats"]["unique_graphs"])


class CompiledParts:
    """The compiled `image_features` and LLM forward of `model`, installed on it (`enable`) or not, so
    one model can run compiled and eager steps (the benchmark compares them)."""

    def __init__(self, model: MiniGPT4, device: torch.device):
        mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs: the shapes never change
        self.model = model
        self.vision = torch.compile(model.image_features, mode=mode, dynamic=False)
        self.llm = torch.compile(model.llm.forward, mode=mode, dynamic=False)
        self.cuda_graphs = mode == "reduce-overhead"
        self._hook = None

    def enable(self, on: bool = True) -> None:
        """Install the compiled parts on the model (instance attributes shadow its methods), or remove
        them: the model's own eager methods run again. Installed, they serve the training forward
        (gradients on) only: validation and generation (no gradients; generation with a new length at
        every token) keep the eager methods instead of compiling graphs of their own."""
        m = self.model
        if on:
            m.image_features = _training_only(self.vision, type(m).image_features.__get__(m))
            m.llm.forward = _training_only(self.llm, type(m.llm).forward.__get__(m.llm))
            if self.cuda_graphs and self._hook is None:
                # Each forward starts a new step of the CUDA graphs: outputs of the last one may be reused.
                self._hook = m.register_forward_pre_hook(
                    lambda *_: torch.compiler.cudagraph_mark_step_begin()
                )
        else:
            m.__dict__.pop("image_features", None)
            m.llm.__dict__.pop("forward", None)
            if self._hook is not None:
                self._hook.remove()
                self._hook = None


def _training_only(compiled, eager):
    def call(*args, **kwargs):
        return (compiled if torch.is_grad_enabled() else eager)(*args, **kwargs)

    return call


def compile_model(model: MiniGPT4, device: torch.device) -> CompiledParts:
    """Compile `model`'s frozen vision forward and LLM in place (`train.compile`); returns the parts."""
    parts = CompiledParts(model, device)
    parts.enable()
    return parts
