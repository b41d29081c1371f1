"""Talk with a trained MiniGPT-4 about an image in the terminal; replies stream as they are written.

    python -m mgpt4.chat --image photo.jpg --checkpoint runs/stage2
    python -m mgpt4.chat --image photo.jpg --preset vicuna13b --eva-vit eva_vit_g.pth \
        --blip2 blip2_pretrained_flant5xxl.pth --llm vicuna-13b --proj pretrained_minigpt4.pth
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import urllib.parse
import warnings

import torch

from mgpt4.chat.flags import add_session_args, limits_from_args, load_model_or_exit
from mgpt4.chat.session import ChatSession, ImageRejected, load_image
from mgpt4.dataclass_flags import OneLineErrors
from mgpt4.inference import check_source
from mgpt4.inference.flags import add_decoding_args, add_model_args, settings_from_args, source_from_args
from mgpt4.model.generation import GenerationSettings
from mgpt4.model.prompts import displayable

PROMPT = "You: "
SPEAKER = "MiniGPT-4: "
HELP = """commands:
  /image PATH   talk about another image (starts a new conversation); drop a file on the terminal
                to paste its path (quotes, backslashes and ~ are understood)
  /reset        forget the conversation, keep the image
  /help         this list
  /quit         leave (Ctrl-D too); Ctrl-C stops a reply being written"""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(
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
    """Print the reply as it streams; Ctrl-C stops it and keeps what was said.

    Each text the session yields extends the one before (`visible_reply`), so only the new part is
    printed and a reply is never printed twice; its control characters are printed escaped
    (`displayable`).
    """
    print(SPEAKER, end="", flush=True)
    printed = ""
    try:
        for partial in session.stream_reply(question, settings):
            if partial.startswith(printed):
                # Control characters the model writes are shown escaped, never obeyed by the terminal.
                print(displayable(partial[len(printed) :]), end="", flush=True)
                printed = partial
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    print(flush=True)
    for notice in session.take_notices():
        print(f"({notice})", flush=True)


def image_path(text: str) -> str:
    """The file an `/image` argument names: a path as typed, or as a terminal pastes a dropped file
    (quoted, backslash-escaped, `~/...`, or a `file://` URL). Raises ImageRejected for no path or a folder."""
    raw = text.strip()
    if not raw:
        raise ImageRejected("give the image's path: /image PATH (or drop the file on the terminal)")
    candidates = [raw]
    if raw.startswith("file://"):
        candidates.insert(0, urllib.parse.unquote(urllib.parse.urlsplit(raw).path))
    with contextlib.suppress(ValueError):  # unbalanced quotes: the path as typed
        parts = shlex.split(raw)
        if len(parts) == 1:
            candidates.append(parts[0])
    paths = [os.path.expanduser(c) for c in candidates]
    path = next((p for p in paths if os.path.exists(p)), paths[-1])
    if os.path.isdir(path):
        raise ImageRejected(f"{path} is a folder; give an image file (PNG, JPEG, WebP, ...)")
    return path


def set_image(session: ChatSession, text: str) -> bool:
    try:
        path = image_path(text)
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
            elif cmd == "/image":
                set_image(session, rest)
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
    limits = limits_from_args(args)
    # Everything that can be checked without the model is checked before minutes of loading.
    source = source_from_args(args)
    check_source(source)
    try:
        load_image(image_path(args.image), limits)
    except ImageRejected as e:
        print(f"! {e}", flush=True)
        sys.exit(2)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    session = ChatSession(load_model_or_exit(source), limits)
    if not set_image(session, args.image):
        sys.exit(2)
    repl(session, settings)


if __name__ == "__main__":
    main()
