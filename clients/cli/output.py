"""Human and JSON rendering for the verbs.

``--json`` prints exactly one JSON document on stdout and nothing else
there; human output is compact: tables for lists, relative times, online
markers. Pure functions of their inputs (``now_ms`` is a parameter) so the
tests pin them exactly.
"""

from __future__ import annotations

import sys
import time
import unicodedata
from collections.abc import Sequence
from typing import Any

import msgspec

ONLINE = "●"
OFFLINE = "○"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def print_json(doc: Any) -> None:
    """Write one JSON document (and a newline) to stdout."""
    sys.stdout.write(msgspec.json.encode(doc).decode() + "\n")
    sys.stdout.flush()


def say(line: str = "") -> None:
    print(line, flush=True)


def warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def ago(at_ms: int | None, now: int) -> str:
    """``12s ago``, ``5m ago``, ``3h ago``, ``2d ago``; ``-`` when unknown."""
    if at_ms is None:
        return "-"
    seconds = (now - at_ms) // 1000
    if seconds < 0:
        return "in the future" if seconds < -5 else "just now"
    if seconds < 5:
        return "just now"
    if seconds < 60:
        return f"{seconds}s ago"
    if seconds < 3600:
        return f"{seconds // 60}m ago"
    if seconds < 86400:
        return f"{seconds // 3600}h ago"
    if seconds < 86400 * 60:
        return f"{seconds // 86400}d ago"
    return time.strftime("%Y-%m-%d", time.localtime(at_ms / 1000))


def short_key(pubkey: str | None, n: int = 12) -> str:
    return (pubkey or "")[:n]


def _width(text: str) -> int:
    """Display width: east-asian wide characters take two columns."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def clean(text: str) -> str:
    """One line, no control characters: peer content must not drive the terminal."""
    out = []
    for c in text:
        if c in "\n\r\t":
            out.append(" ")
        elif unicodedata.category(c) in ("Cc", "Cf") and c != "\u200d":
            out.append("\N{REPLACEMENT CHARACTER}")
        else:
            out.append(c)
    return "".join(out)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    cells = [[clean(str(c)) for c in row] for row in rows]
    widths = [_width(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], _width(c))
    lines = []
    for row in [list(headers), *cells]:
        parts = []
        for i, c in enumerate(row):
            pad = "" if i == len(row) - 1 else " " * (widths[i] - _width(c))
            parts.append(c + pad)
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def group_digits(safety_number: str) -> str:
    """Safety numbers read in groups of five digits."""
    digits = safety_number.replace(" ", "")
    return " ".join(digits[i : i + 5] for i in range(0, len(digits), 5))
