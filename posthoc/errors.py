"""The one exception type users see.

Every problem a user can fix (a wrong path, a model name typo, data that does not match the model)
is raised as :class:`PosthocError` with a single line that names the problem and the fix. The CLI
prints that line and exits with status 2; library callers can catch it like any exception.
"""

from __future__ import annotations


class PosthocError(Exception):
    """A user-facing error: one line naming the problem and how to fix it."""

    exit_code = 2

    def __init__(self, message: str):
        # raised in a DataLoader worker, it comes back wrapped with the worker's traceback: keep our line
        if message.startswith("Caught ") and "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(" ".join(message.split()))


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
