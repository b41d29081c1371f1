"""`python -m mgpt4.serve`: load a model, bind the address, serve the OpenAI chat-completions API.

The first line on stdout once the socket is bound and the model loaded is
`Serving MODEL at http://HOST:PORT/v1` (with `--port 0` the port the system chose), for scripts and
tests. SIGTERM (or Ctrl-C) stops taking connections, answers the requests in flight, then exits.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

from mgpt4.dataclass_flags import HelpWithDefaults, OneLineErrors
from mgpt4.inference import ModelSource, check_source, load_model
from mgpt4.inference.flags import add_decoding_args, add_model_args, settings_from_args, source_from_args
from mgpt4.logs import get_logger
from mgpt4.model.generation import GenerationSettings
from mgpt4.model.llm import LLMFolderMismatch
from mgpt4.model.loading import WeightsError
from mgpt4.model.minigpt4 import MiniGPT4
from mgpt4.serve.images import ImagePolicy
from mgpt4.strict_config import ConfigError

log = get_logger("mgpt4.serve")

API_KEY_ENV = "MGPT4_API_KEY"

EPILOG = f"""
Safe by default: it binds 127.0.0.1; images come as data: URLs, local files only under --allow-path,
http(s) URLs only with --allow-remote-images. Set {API_KEY_ENV} (or --api-key-file) to require
`Authorization: Bearer KEY`; a key on the command line would show in `ps`.

Example, with the official Python client:
    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="tiny_stage1", messages=[{{"role": "user", "content": [
        {{"type": "image_url", "image_url": {{"url": "data:image/png;base64,..."}}}},
        {{"type": "text", "text": "Describe this image."}}]}}])
"""


class _Help(HelpWithDefaults, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag's help; the epilog's example kept as written."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(
        prog="python -m mgpt4.serve",
        description="Serve a MiniGPT-4 model over OpenAI's chat-completions API (FastAPI + uvicorn).",
        epilog=EPILOG,
        formatter_class=_Help,
    )
    add_model_args(parser)
    add_decoding_args(
        parser, GenerationSettings(), "decoding defaults (a request's own fields override them)"
    )
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    g.add_argument("--port", type=int, default=8000, help="port to bind; 0: any free port (printed)")
    g.add_argument(
        "--served-model-name", help="the model's name in the API (default: the run folder's or preset's name)"
    )
    g.add_argument(
        "--api-key-file", help=f"a file holding the API key (default: ${API_KEY_ENV} if set, else none)"
    )
    g.add_argument("--max-batch", type=int, default=8, help="requests answered together in one batch")
    g.add_argument("--queue-size", type=int, default=64, help="requests waiting at most; more get 429")
    lim = parser.add_argument_group("limits")
    lim.add_argument(
        "--allow-path",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder whose images a request may name by path (repeatable)",
    )
    lim.add_argument(
        "--allow-remote-images", action="store_true", help="fetch http(s) image URLs (off: refused)"
    )
    lim.add_argument(
        "--max-body-mb",
        type=float,
        default=32.0,
        help="largest request body (a base64 image is 4/3 of its file)",
    )
    lim.add_argument("--max-image-mb", type=float, default=20.0, help="largest image file")
    lim.add_argument(
        "--max-image-megapixels", type=float, default=40.0, help="largest image, in millions of pixels"
    )
    lim.add_argument(
        "--max-tokens-limit", type=int, default=1024, help="the largest max_tokens a request may ask for"
    )
    lim.add_argument("--max-prompt-tokens", type=int, help="longest prompt, in tokens (default: the context)")
    return parser


def _model_name(source: ModelSource, given: str | None) -> str:
    if given:
        return given
    if source.checkpoint:
        return os.path.basename(os.path.normpath(os.path.abspath(source.checkpoint)))
    return source.preset or "mgpt4"


def _api_key(path: str | None) -> str | None:
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                key = f.read().strip()
        except OSError as e:
            raise SystemExit(f"--api-key-file {path}: cannot read it ({e.strerror or e})") from None
        if not key:
            raise SystemExit(f"--api-key-file {path}: the file is empty")
        return key
    return os.environ.get(API_KEY_ENV) or None


def _load(source: ModelSource) -> MiniGPT4:
    try:
        model = load_model(source, announce=True)
    except LLMFolderMismatch as e:
        raise SystemExit(
            f"error: {e.folder}: the LLM does not match the model config: " + "; ".join(e.problems)
        ) from None
    except (WeightsError, ConfigError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if model.tokenizer is None:
        raise SystemExit("error: the model has no tokenizer (give --llm or --set weights.tokenizer=DIR)")
    return model


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser, defaults: GenerationSettings) -> None:
    if defaults.num_beams != 1:
        parser.error("--num-beams: the server decodes one beam per request (streaming needs it); use 1")
    for flag in ("max_batch", "queue_size", "max_tokens_limit"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if defaults.max_new_tokens > args.max_tokens_limit:
        parser.error(
            f"--max-new-tokens {defaults.max_new_tokens} (the default max_tokens) is above "
            f"--max-tokens-limit {args.max_tokens_limit}"
        )
    for root in args.allow_path:
        if not os.path.isdir(root):
            parser.error(f"--allow-path {root}: not a folder")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    source, defaults = source_from_args(args), settings_from_args(args)
    _check(args, parser, defaults)
    check_source(source)  # flags that cannot load a model end here, before the port is taken
    api_key = _api_key(args.api_key_file)
    # Bind before the slow load: a port in use is said at once, and --port 0 gets its port.
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        # Listening now: a client that connects before uvicorn runs waits in the backlog, not refused.
        sock.listen(2048)
    except OSError as e:
        raise SystemExit(f"--host {args.host} --port {args.port}: cannot bind ({e.strerror or e})") from None
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning(f"serving on {args.host} to the network without an API key (set {API_KEY_ENV})")

    model = _load(source)
    context = defaults.max_context
    positions = getattr(model.llm.config, "max_position_embeddings", None)
    if positions and context > positions:
        log.warning(
            f"--max-context {context} is above the LLM's {positions} positions: the context is {positions}"
        )
        context = positions

    import uvicorn

    from mgpt4.serve.app import Limits, Service, create_app
    from mgpt4.serve.batcher import Batcher

    name = _model_name(source, args.served_model_name)
    service = Service(
        model=model,
        name=name,
        batcher=Batcher(model, defaults, max_batch=args.max_batch, queue_size=args.queue_size),
        defaults=defaults,
        policy=ImagePolicy(
            max_bytes=int(args.max_image_mb * 2**20),
            max_pixels=int(args.max_image_megapixels * 1e6),
            allow_paths=tuple(os.path.realpath(p) for p in args.allow_path),
            allow_remote=args.allow_remote_images,
        ),
        limits=Limits(
            max_body_bytes=int(args.max_body_mb * 2**20),
            max_tokens=min(args.max_tokens_limit, context - 1),
            max_prompt_tokens=args.max_prompt_tokens,
            context=context,
        ),
        api_key=api_key,
        created=int(time.time()),
    )
    config = uvicorn.Config(create_app(service), log_level="warning", timeout_graceful_shutdown=None)
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"Serving {name} at http://{shown}:{port}/v1", flush=True)
    # On SIGTERM uvicorn stops accepting, waits for the requests in flight, closes the batcher (the
    # app's shutdown), then ends the process by the signal it caught.
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
