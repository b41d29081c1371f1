"""`python -m mgpt4.chat`: the terminal chat (see mgpt4/chat/terminal.py)."""

from mgpt4.chat.terminal import main

if __name__ == "__main__":
    main()
