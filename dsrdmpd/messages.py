"""How a problem is worded for people: one line (for stderr, a CSV cell, a table row), naming
what went wrong and where. Free of torch: the commands use it before it loads."""
from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line: its lines stripped and joined with '; ' (spaces
    inside a line, e.g. in a path, kept); the class name where the message is empty. (An
    OSError that knows its file names it in its message already.)"""
    text = str(exc).strip() or type(exc).__name__
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())
