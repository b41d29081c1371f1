"""Inference: talk with a trained model about an image, in the terminal or in a web page.

    python -m mgpt4.chat --image photo.jpg --checkpoint outputs/tiny_stage1   # terminal (terminal.py)
    python -m mgpt4.chat.web --checkpoint outputs/tiny_stage1                 # web page (web.py)

`session.py` holds one person's conversation (shared by both; `streaming.py` streams its replies in
whole characters) and `flags.py` chat's own flags (image limits, a seed). The model is loaded, and
its flags derived, by `mgpt4.inference`, as for curation and evaluation.
"""
