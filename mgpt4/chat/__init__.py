"""Inference: talk with a trained model about an image, in the terminal or in a web page.

    python -m mgpt4.chat --image photo.jpg --checkpoint outputs/tiny_stage1   # terminal (terminal.py)
    python -m mgpt4.chat.web --checkpoint outputs/tiny_stage1                 # web page (web.py)

`session.py` holds one person's conversation (shared by both; `streaming.py` streams its replies in
whole characters), `flags.py` the command-line flags shared with curation and evaluation, and
`placement.py` builds the model the flags describe and puts its parts on devices.
"""
