"""One exception type for every user-facing error.

Messages are one line: what is wrong, then how to fix it. The CLI prints ``error: <message>`` and
exits with status 2; library users can catch ``ProjLensError`` (a ``ValueError``).
"""


class ProjLensError(ValueError):
    """A problem with the user's input (path, config, model, data), with the fix in the message."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
