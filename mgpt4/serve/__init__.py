"""`python -m mgpt4.serve`: an OpenAI-compatible server for a trained model (chat completions with images).

    python -m mgpt4.serve --checkpoint outputs/tiny_stage1 --port 8000

`__main__.py` holds the flags and starts uvicorn; `app.py` the FastAPI routes; `protocol.py` OpenAI's
request and reply format; `conversation.py` turns messages into the model's prompt as the chat builds
it; `images.py` the safe image intake; `batcher.py` the model thread that answers waiting requests in
batches. The model loads through `mgpt4.inference.load_model`, as for chat, curation and evaluation.
"""
