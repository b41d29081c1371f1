"""A web page to chat with a trained MiniGPT-4 about an uploaded image (Gradio), served on localhost.

    python -m mgpt4.chat.web --checkpoint runs/stage2 [--host 127.0.0.1 --port 7860 --concurrency 1]

Every browser tab has its own conversation; requests wait in one queue, and at most
`--concurrency` of them use the model at a time.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket

import torch

from mgpt4.chat.flags import add_session_args, limits_from_args, load_model_or_exit
from mgpt4.chat.session import ChatError, ChatSession, ImageLimits, ImageRejected
from mgpt4.dataclass_flags import OneLineErrors
from mgpt4.inference import check_source
from mgpt4.inference.flags import add_decoding_args, add_model_args, settings_from_args, source_from_args
from mgpt4.model.generation import GenerationSettings
from mgpt4.model.minigpt4 import MiniGPT4
from mgpt4.model.prompts import displayable

log = logging.getLogger("mgpt4.chat.web")

# Element ids: stable handles for the browser test and for anyone styling the page.
IDS = {
    "upload": "mgpt4-upload",
    "preview": "mgpt4-preview",
    "chatbot": "mgpt4-chatbot",
    "question": "mgpt4-question",
    "send": "mgpt4-send",
    "reset": "mgpt4-reset",
}
INTRO = (
    "Upload an image, then ask about it. The model sees one image at a time; "
    "a new upload starts a new conversation."
)


def size_text(n: float) -> str:
    """Bytes as Gradio's upload check counts them (1024-based, one decimal): 20.0 MB."""
    units = ("B", "KB", "MB", "GB", "TB")
    k = 0
    while n >= 1024 and k < len(units) - 1:
        n /= 1024
        k += 1
    return f"{n:.1f} {units[k]}"


def upload_label(limits: ImageLimits) -> str:
    """The upload box's label, with the limits. The byte limit is Gradio's too (`max_file_size`), so a
    larger file is refused in the browser, before it is sent, and there is no second limit."""
    return (
        f"Upload an image (PNG, JPEG, WebP, …; up to {size_text(limits.max_bytes)} and "
        f"{limits.max_pixels / 1e6:g} megapixels)"
    )


def check_port(host: str, port: int) -> None:
    """Exit naming --port when the address is taken, before any minute is spent loading the model."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As the server will bind: a port in TIME_WAIT after a restart is free to it.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise SystemExit(
                    f"--port {port}: {host}:{port} is already in use (another demo?); choose another --port"
                ) from None
            raise SystemExit(
                f"--host {host} --port {port}: cannot listen there ({e.strerror or e})"
            ) from None


def _import_gradio():
    # Gradio calls home on launch unless told not to; a local demo has no reason to.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError:
        raise SystemExit("the web demo needs Gradio: pip install 'gradio>=6,<7'") from None
    return gr


def _note(text: str) -> dict:
    # Every message the page shows (and the API returns) has its control characters escaped.
    return {"role": "assistant", "content": displayable(text)}


def build_demo(
    model: MiniGPT4, defaults: GenerationSettings | None = None, limits: ImageLimits | None = None
):
    """The page as a `gr.Blocks` (not launched): upload, preview, chat, sampling controls, reset."""
    gr = _import_gradio()
    d = defaults or GenerationSettings()
    limits = limits or ImageLimits()

    def session_of(session: ChatSession | None) -> ChatSession:
        # Created on first use: gr.State deep-copies its initial value, and the model must not be copied.
        return session if session is not None else ChatSession(model, limits)

    def on_upload(path: str | None, history, session: ChatSession | None):
        # The upload box empties itself each time (the preview shows the image), so the next
        # upload is one click away and a rejected file does not look accepted.
        session = session_of(session)
        if path is None:
            return session, gr.skip(), gr.skip(), None
        try:
            img = session.set_image(path)
        except ImageRejected as e:
            # The image and the conversation before the bad upload stay as they were.
            kept = " The conversation about the previous image goes on." if session.has_image else ""
            note = _note(f"⚠️ This upload cannot be used: {e}.{kept}")
            return session, [*(history or []), note], gr.skip(), None
        return session, [_note(f"Got the image ({img.width}×{img.height}). Ask me about it.")], img, None

    def on_send(
        question, history, session, max_new_tokens, num_beams, sample, temperature, top_p, rep_penalty
    ):
        session = session_of(session)
        history = list(history or [])
        question = (question or "").strip()
        if not question:
            yield history, "", session
            return
        history.append({"role": "user", "content": displayable(question)})
        if not session.has_image:
            history.append(_note("⚠️ Upload an image first, then ask about it."))
            yield history, "", session
            return
        settings = GenerationSettings(
            max_new_tokens=int(max_new_tokens),
            num_beams=int(num_beams),
            sample=bool(sample),
            temperature=float(temperature),
            top_p=float(top_p),
            repetition_penalty=float(rep_penalty),
            max_context=d.max_context,
        )
        history.append(_note(""))
        yield history, "", session
        try:
            reply = ""
            for reply in session.stream_reply(question, settings):
                history[-1] = _note(reply)
                yield history, "", session
            if not reply:
                history[-1] = _note("_(the model gave an empty reply)_")
            history.extend(_note(f"_{n}_") for n in session.take_notices())
        except ChatError as e:
            history[-1] = _note(f"⚠️ {e}.")
        except Exception as e:  # one failed reply (out of memory, say) must not take the page down
            log.exception("generation failed")
            history[-1] = _note(f"⚠️ Generation failed: {type(e).__name__}: {e}")
        yield history, "", session

    def on_reset(session: ChatSession | None):
        if session is not None:
            session.reset()
        return session, []

    with gr.Blocks(title="MiniGPT-4 (mgpt4)") as demo:
        gr.Markdown(f"## MiniGPT-4\n{INTRO}")
        session = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label=upload_label(limits), type="filepath", elem_id=IDS["upload"])
                preview = gr.Image(
                    label="What the model sees",
                    type="pil",
                    interactive=False,
                    height=220,
                    elem_id=IDS["preview"],
                )
                with gr.Accordion("Generation", open=True):
                    max_new = gr.Slider(1, 1000, value=d.max_new_tokens, step=1, label="Max new tokens")
                    beams = gr.Slider(1, 10, value=d.num_beams, step=1, label="Beams (no streaming above 1)")
                    sample = gr.Checkbox(value=d.sample, label="Sample (off: greedy, deterministic)")
                    temperature = gr.Slider(
                        0.0, 2.0, value=d.temperature, step=0.05, label="Temperature (0: greedy)"
                    )
                    top_p = gr.Slider(0.05, 1.0, value=d.top_p, step=0.05, label="Top-p")
                    rep = gr.Slider(
                        1.0, 2.0, value=d.repetition_penalty, step=0.05, label="Repetition penalty"
                    )
                reset = gr.Button("Reset conversation", elem_id=IDS["reset"])
            with gr.Column(scale=2):
                # Each message its own bubble: a warning or a note after a reply is not more of the reply.
                chatbot = gr.Chatbot(
                    label="Conversation",
                    height=520,
                    buttons=["copy", "copy_all"],
                    elem_id=IDS["chatbot"],
                    group_consecutive_messages=False,
                )
                with gr.Row():
                    question = gr.Textbox(
                        placeholder="Ask about the image and press Enter",
                        show_label=False,
                        scale=5,
                        elem_id=IDS["question"],
                    )
                    send = gr.Button("Send", variant="primary", scale=1, elem_id=IDS["send"])

        upload.upload(on_upload, [upload, chatbot, session], [session, chatbot, preview, upload])
        ask_inputs = [question, chatbot, session, max_new, beams, sample, temperature, top_p, rep]
        asked = [
            send.click(on_send, ask_inputs, [chatbot, question, session]),
            question.submit(on_send, ask_inputs, [chatbot, question, session]),
        ]
        # No model work in a reset: it skips the queue's limit and stops a reply being written.
        reset.click(on_reset, [session], [session, chatbot], cancels=asked, concurrency_limit=None)
        # The chat box's own bin icon must forget the conversation too, not only hide it.
        chatbot.clear(on_reset, [session], [session, chatbot], cancels=asked, concurrency_limit=None)
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(
        prog="python -m mgpt4.chat.web",
        description="Serve a web page to chat with a MiniGPT-4 model about an uploaded image.",
    )
    add_model_args(parser)
    add_decoding_args(parser, GenerationSettings(), "decoding (the sliders' starting values)")
    add_session_args(parser)
    s = parser.add_argument_group("server")
    s.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0 opens it to the network)"
    )
    s.add_argument("--port", type=int, default=7860)
    s.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="requests using the model at once; the rest wait in the queue",
    )
    s.add_argument("--max-queue", type=int, default=64, help="requests allowed to wait; more are turned away")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.concurrency < 1:
        raise SystemExit(f"--concurrency must be at least 1, got {args.concurrency}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up checks, one line each
    settings = settings_from_args(args)
    limits = limits_from_args(args)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    # Fail on what needs no model before minutes of loading: Gradio, the flags, the port.
    _import_gradio()
    source = source_from_args(args)
    check_source(source)
    check_port(args.host, args.port)
    demo = build_demo(load_model_or_exit(source), settings, limits)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.max_queue)
    # One size limit: Gradio refuses a larger file in the browser, before it is sent, with the same
    # number of bytes that the upload label states (and that load_image checks for the terminal).
    demo.launch(server_name=args.host, server_port=args.port, max_file_size=limits.max_bytes, show_error=True)


if __name__ == "__main__":
    main()
