"""Talk with a trained MiniGPT-4 about an image in the terminal; replies stream as they are written.

    python -m mgpt4.chat --image photo.jpg --checkpoint runs/stage2
    python -m mgpt4.chat --image photo.jpg --preset vicuna13b --eva-vit eva_vit_g.pth \
        --blip2 blip2_pretrained_flant5xxl.pth --llm vicuna-13b --proj pretrained_minigpt4.pth
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings

import torch

from mgpt4.chat.flags import (
    add_decoding_args,
    add_model_args,
    add_session_args,
    limits_from_args,
    settings_from_args,
)
from mgpt4.chat.placement import model_from_args
from mgpt4.chat.session import ChatSession, ImageRejected
from mgpt4.model.generation import GenerationSettings

PROMPT = "You: "
SPEAKER = "MiniGPT-4: "
HELP = """commands:
  /image PATH   talk about another image (starts a new conversation)
  /reset        forget the conversation, keep the image
  /help         this list
  /quit         leave (Ctrl-D too); Ctrl-C stops a reply being written"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mgpt4.chat",
        description="Multi-turn chat about an image with a MiniGPT-4 model, in the terminal.",
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--image", required=True, help="the image to talk about (PNG, JPEG, WebP, ...)")
    add_model_args(parser)
    add_decoding_args(parser, GenerationSettings(), "decoding (defaults: the official demo's)")
    add_session_args(parser)
    return parser


def say(session: ChatSession, question: str, settings: GenerationSettings) -> None:
    """Print the reply as it streams; Ctrl-C stops it and keeps what was said."""
    print(SPEAKER, end="", flush=True)
    printed = ""
    try:
        for partial in session.stream_reply(question, settings):
            # A reply only grows, except when the model echoes "Assistant:" and the text before it goes.
            new = partial[len(printed) :] if partial.startswith(printed) else "\n" + partial
            print(new, end="", flush=True)
            printed = partial
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    print(flush=True)


def set_image(session: ChatSession, path: str) -> bool:
    try:
        img = session.set_image(path)
    except ImageRejected as e:
        print(f"! {e}", flush=True)
        return False
    print(f"Image: {path} ({img.width}x{img.height}). Ask about it; /help lists the commands.", flush=True)
    return True


def repl(session: ChatSession, settings: GenerationSettings) -> None:
    while True:
        try:
            line = input(PROMPT).strip()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            if cmd in ("/quit", "/exit"):
                return
            if cmd == "/reset":
                session.reset()
                print("(conversation cleared)", flush=True)
            elif cmd == "/image" and rest.strip():
                set_image(session, rest.strip())
            elif cmd == "/help":
                print(HELP, flush=True)
            else:
                print(f"unknown command {line!r}\n{HELP}", flush=True)
            continue
        say(session, line, settings)


def main(argv: list[str] | None = None) -> None:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    # The prompt is embeddings, so the penalty can only see new tokens, as in the official chat;
    # the warning saying so would land in the middle of a streamed reply.
    warnings.filterwarnings("ignore", message="Passing `repetition_penalty` with `inputs_embeds`")
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    print("Loading the model ...", flush=True)
    session = ChatSession(model_from_args(args), limits_from_args(args))
    if not set_image(session, args.image):
        sys.exit(2)
    repl(session, settings)


if __name__ == "__main__":
    main()
