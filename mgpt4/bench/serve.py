"""Server benchmark: requests/s and generated tokens/s at concurrency 1, 8 and 32, batched (dynamic
batching, up to 32 requests per batch) against one request at a time (`--max-batch 1`).

    python -m mgpt4.bench.serve                                   # the tiny preset, random weights (CPU)
    python -m mgpt4.bench.serve --checkpoint runs/stage2 --device cuda --max-tokens 64

The server runs in this process (uvicorn on a free port of 127.0.0.1, `mgpt4.serve.app`) and is driven
over HTTP by the official `openai` client from `concurrency` threads, each sending greedy requests with
an image (a data: URL) and a question, `--requests` in all per setting. Without model flags the model
is the tiny preset with random weights and a tokenizer trained on the spot; its output head is cut
off from EOS and `#` pieces, so every reply is `--max-tokens` long and each request is the same work.
Printed: one line per setting, then `speedup at 32: X.XX` (batched over one at a time, tokens/s).
"""

from __future__ import annotations

import base64
import io
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from mgpt4.dataclass_flags import OneLineErrors
from mgpt4.inference import ModelSource, load_model
from mgpt4.inference.flags import add_model_args, source_from_args
from mgpt4.model.generation import GenerationSettings
from mgpt4.model.minigpt4 import MiniGPT4

QUESTIONS = [
    "What is in the picture?",
    "Describe this image in detail.",
    "Which colours do you see at the top left of the picture?",
    "Is there a circle?",
]


def tiny_model(device: str) -> MiniGPT4:
    """The tiny preset with random weights, a freshly trained tokenizer, and no way to end early."""
    from mgpt4.model.prompts import STAGE2_INSTRUCTIONS, VICUNA_V0_SYSTEM
    from mgpt4.tokenizer import train_tiny_tokenizer

    folder = tempfile.mkdtemp(prefix="mgpt4-bench-serve-")
    corpus = [*QUESTIONS, VICUNA_V0_SYSTEM, *STAGE2_INSTRUCTIONS, "a red circle on a blue background"] * 20
    train_tiny_tokenizer(corpus, folder, vocab_size=400)
    source = ModelSource(
        preset="tiny", allow_random_weights=True, overrides=[f"weights.tokenizer={folder}"], device=device
    )
    torch.manual_seed(0)
    model = load_model(source)
    pieces = model.tokenizer.convert_ids_to_tokens(list(range(model.cfg.llm.vocab_size)))
    special = set(model.tokenizer.all_special_ids)
    with torch.no_grad():
        for i, piece in enumerate(pieces):
            if i in special or "#" in (piece or ""):
                model.llm.lm_head.weight[i] = 0  # logit 0: below the best of the random logits
    return model


def image_url() -> str:
    img = Image.new("RGB", (96, 64), (200, 40, 40))
    img.paste((30, 60, 200), (0, 0, 48, 32))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class InProcessServer:
    """uvicorn serving the app in a thread on a free port; `close` shuts it down as SIGTERM would."""

    def __init__(self, model: MiniGPT4, max_batch: int, queue_size: int, max_tokens: int):
        import uvicorn

        from mgpt4.serve.app import Limits, Service, create_app
        from mgpt4.serve.batcher import Batcher

        defaults = GenerationSettings(max_new_tokens=max_tokens, sample=False)
        context = min(defaults.max_context, model.llm.config.max_position_embeddings or defaults.max_context)
        service = Service(
            model=model,
            name="bench",
            batcher=Batcher(model, defaults, max_batch=max_batch, queue_size=queue_size),
            defaults=defaults,
            limits=Limits(max_tokens=max_tokens, context=context),
        )
        self.service = service
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(2048)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join()


def run(url: str, concurrency: int, requests: int, max_tokens: int) -> tuple[float, float, float]:
    """(requests/s, generated tokens/s, median seconds per request) for `requests` requests sent by
    `concurrency` threads."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    picture = image_url()

    def one(k: int) -> tuple[int, float]:
        start = time.perf_counter()
        r = client.chat.completions.create(
            model="bench",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": picture}},
                        {"type": "text", "text": QUESTIONS[k % len(QUESTIONS)]},
                    ],
                }
            ],
            max_tokens=max_tokens,
            temperature=0,
        )
        return r.usage.completion_tokens, time.perf_counter() - start

    one(0)  # warm-up: the first request pays for lazy initialisation
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    tokens = sum(t for t, _ in results)
    return requests / wall, tokens / wall, statistics.median(s for _, s in results)


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrors(prog="python -m mgpt4.bench.serve", description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64, help="requests per setting")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per reply")
    parser.add_argument("--max-batch", type=int, default=32, help="the batched server's largest batch")
    args = parser.parse_args(argv)
    source = source_from_args(args)
    model = load_model(source) if source.checkpoint or source.preset else tiny_model(source.device)
    print(
        f"model: {'tiny preset, random weights' if not (source.checkpoint or source.preset) else source.checkpoint or source.preset}"
        f" on {source.device}; {args.requests} requests per setting, {args.max_tokens} tokens each, greedy"
    )
    print(f"{'mode':<14}{'concurrency':>12}{'requests/s':>12}{'tokens/s':>11}{'median s':>10}{'batches':>9}")
    rates: dict[tuple[str, int], float] = {}
    for mode, max_batch in (("one at a time", 1), ("batched", args.max_batch)):
        server = InProcessServer(model, max_batch, max(args.concurrency) * 2, args.max_tokens)
        try:
            for c in args.concurrency:
                before = server.service.batcher.batches
                rps, tps, median = run(server.url, c, args.requests, args.max_tokens)
                rates[mode, c] = tps
                batches = server.service.batcher.batches - before - 1  # less the warm-up's
                print(f"{mode:<14}{c:>12}{rps:>12.2f}{tps:>11.1f}{median:>10.3f}{batches:>9}", flush=True)
        finally:
            server.close()
    top = max(args.concurrency)
    print(f"speedup at {top}: {rates['batched', top] / rates['one at a time', top]:.2f}")


if __name__ == "__main__":
    main()
