"""One exception type for every user-facing error.

Messages are one line: what is wrong, then how to fix it. The CLI prints ``error: <message>`` and
exits with status 2; library users can catch ``ProjLensError`` (a ``ValueError``).
"""


class ProjLensError(ValueError):
    """A problem with the user's input (path, config, model, data), with the fix in the message."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def printable(text: object) -> str:
    """``text`` on one terminal line: newlines and tabs as spaces, other control characters escaped
    (``\\x1b``), so an error that quotes a data file or a model cannot move the cursor or recolour it."""
    return "".join(c if c.isprintable() else " " if c in "\n\r\t" else ascii(c)[1:-1] for c in str(text))
