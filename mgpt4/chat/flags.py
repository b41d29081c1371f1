"""Chat's own command-line pieces, shared by the terminal and the web page: the session's flags (image
limits, a seed) and the model loaded for a command line. The model and decoding flags are every
inference tool's (`mgpt4.inference.flags`).
"""

from __future__ import annotations

import argparse

from mgpt4.chat.session import ImageLimits
from mgpt4.inference import ModelSource, load_model
from mgpt4.model.llm import LLMFolderMismatch
from mgpt4.model.loading import WeightsError
from mgpt4.model.minigpt4 import MiniGPT4
from mgpt4.strict_config import ConfigError


def load_model_or_exit(source: ModelSource) -> MiniGPT4:
    """`load_model` for a command line: a model that cannot be built from these flags (weight files
    made for another size than --preset, a missing file, a bad --set, no checkpoint where --checkpoint
    points) ends in one error line. Flag and checkpoint errors come before "Loading the model ..."; an
    LLM folder of other sizes than --preset right after it, from the build's check of the folder, before
    any part is built."""
    try:
        return load_model(source, announce=True)
    except LLMFolderMismatch as e:
        raise SystemExit(
            f"error: {e.folder}: the LLM does not match the model config (--preset or the checkpoint's): "
            + "; ".join(e.problems)
        ) from None
    except (WeightsError, ConfigError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


def add_session_args(parser: argparse.ArgumentParser) -> None:
    """What a chat session accepts: image limits, and a seed for replies that can be reproduced."""
    g = parser.add_argument_group("session")
    g.add_argument("--seed", type=int, help="seed the sampler, for replies that can be reproduced")
    g.add_argument(
        "--max-image-mb",
        type=float,
        default=ImageLimits.max_bytes / 2**20,
        help="largest image file accepted",
    )
    g.add_argument(
        "--max-image-megapixels",
        type=float,
        default=ImageLimits.max_pixels / 1e6,
        help="largest image accepted, in millions of pixels",
    )


def limits_from_args(args: argparse.Namespace) -> ImageLimits:
    return ImageLimits(
        max_bytes=int(args.max_image_mb * 2**20), max_pixels=int(args.max_image_megapixels * 1e6)
    )
