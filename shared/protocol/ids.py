"""Sortable unique ids (UUIDv7, RFC 9562) for client message ids.

Ids made in one process sort in creation order even within one millisecond
(a 12-bit counter fills ``rand_a``), so outbox rows and logs read in order.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from typing import Final

_lock: Final = threading.Lock()
_last_ms = 0
_counter = 0

_UUID_RE: Final = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def uuid7(now_ms: int | None = None) -> str:
    """A new UUIDv7 as a lowercase canonical string."""
    global _last_ms, _counter
    with _lock:
        ms = int(time.time() * 1000) if now_ms is None else now_ms
        if ms <= _last_ms:
            _counter += 1
            if _counter > 0xFFF:  # counter exhausted: borrow the next millisecond
                _last_ms += 1
                _counter = 0
            ms = _last_ms
        else:
            _last_ms = ms
            _counter = int.from_bytes(os.urandom(2), "big") & 0x3FF
        counter = _counter
    rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | rand_b
    return str(uuid.UUID(int=value))


def new_message_id() -> str:
    """Client message id the CLI and daemon make when the user gives none."""
    return uuid7()


def uuid7_time_ms(value: str) -> int:
    """Millisecond timestamp embedded in a UUIDv7."""
    return uuid.UUID(value).int >> 80


def is_client_message_id(value: str) -> bool:
    """Client ids are free-form but bounded: 1-128 printable ASCII, no spaces."""
    return 0 < len(value) <= 128 and value.isascii() and value.isprintable() and " " not in value


def is_uuid(value: str) -> bool:
    return _UUID_RE.match(value) is not None
