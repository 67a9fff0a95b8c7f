"""How a problem is worded for people: one line (for stderr, a CSV cell, a table row), naming
what went wrong and where. Free of torch: the commands use it before it loads."""
from __future__ import annotations

import math


def first_few(names, n: int = 3) -> str:
    """'a, b, c, ...': the first ``n`` of ``names``, and '...' where more follow."""
    names = list(names)
    return ", ".join(map(str, names[:n])) + (", ..." if len(names) > n else "")


def megapixels(pixels: float) -> str:
    """'16.8 Mpx', '0.0041 Mpx', '0.00005 Mpx', '4000 Mpx': a pixel count in millions, up to
    three significant digits below 100 Mpx, whole millions above; plain decimals throughout
    (never '0 Mpx' for a few pixels, never an exponent)."""
    mpx = pixels / 1e6
    if mpx >= 100:
        return f"{mpx:.0f} Mpx"
    if mpx >= 0.01 or mpx <= 0:
        return f"{mpx:.3g} Mpx"
    return f"{mpx:.{2 - math.floor(math.log10(mpx))}f}".rstrip("0").rstrip(".") + " Mpx"


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


def first_line(exc: BaseException) -> str:
    """'Type: the first line of its message' (at most 300 characters), for exceptions whose
    message runs to pages (torch's from export and compilation print the whole traced graph)."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
