"""The one exception type users see, and how untrusted text is made safe to print.

Every problem a user can fix (a wrong path, a model name typo, data that does not match the model)
is raised as :class:`PosthocError` with a single line that names the problem and the fix. The CLI
prints that line and exits with status 2; library callers can catch it like any exception.

Messages quote things posthoc did not write: file and class names, config values, Hub ids. A name
can hold a newline, a terminal escape sequence or a bidirectional override; :func:`printable` escapes
every such character (``\\n``, ``\\x1b``, ``\\u202e``), so a message stays one line and shows what is
really there. :class:`PosthocError` applies it to its message; :mod:`posthoc.cli_tables` to every
line and table cell it prints.
"""

from __future__ import annotations

import unicodedata

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: object) -> str:
    """``text`` with every control, format or line/paragraph-separator character escaped (``\\n``,
    ``\\x1b``, ``\\u202e``); everything else, non-ASCII letters included, as it is."""
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch == " " or ch.isprintable() or unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            out.append(ch)
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


class PosthocError(Exception):
    """A user-facing error: one line naming the problem and how to fix it (untrusted text escaped)."""

    exit_code = 2

    def __init__(self, message: str):
        # raised in a DataLoader worker, it comes back wrapped with the worker's traceback: keep our line
        if message.startswith("Caught ") and "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(printable(message.strip()))


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
