"""How a problem is worded for people: one line (for stderr, a CSV cell, a table row), naming
what went wrong and where. Free of torch: the commands use it before it loads."""
from __future__ import annotations


def first_few(names, n: int = 3) -> str:
    """'a, b, c, ...': the first ``n`` of ``names``, and '...' where more follow."""
    names = list(names)
    return ", ".join(map(str, names[:n])) + (", ..." if len(names) > n else "")


def megapixels(pixels: float) -> str:
    """'16.8 Mpx', '0.0041 Mpx', '4000 Mpx': a pixel count in millions, three significant
    digits below 100 Mpx, whole millions above (never '0 Mpx' for a few pixels)."""
    mpx = pixels / 1e6
    return f"{mpx:.0f} Mpx" if mpx >= 100 else f"{mpx:.3g} Mpx"


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line: its lines stripped and joined with '; ' (spaces
    inside a line, e.g. in a path, kept), or with a space after a line that ends in ':' (a
    heading and its first item: 'X does not fit: missing keys ...'); the class name where the
    message is empty. (An OSError that knows its file names it in its message already.)"""
    text = str(exc).strip() or type(exc).__name__
    out = ""
    for part in (p.strip() for p in text.splitlines()):
        if part:
            out += ("" if not out else " " if out.endswith(":") else "; ") + part
    return out
