"""Pure pieces: invite links, retry delays, pid-reuse check, topic ids."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from claudemesh.daemon import invites
from claudemesh.daemon.workspace import (
    RETRY_DELAYS_S,
    pid_alive,
    proc_starttime,
    retry_delay_ms,
    topic_id_for,
)


def test_link_round_trip_keeps_the_secret_in_the_fragment() -> None:
    link = invites.InviteLink("ws://127.0.0.1:9/ws", "mesh-1", "inv-1", b"\x01" * 32)
    text = str(link)
    before, _, frag = text.partition("#")
    assert "AQEB" not in before
    assert frag
    assert invites.parse_link(text) == link


def test_payload_opens_only_with_its_secret() -> None:
    sealed = invites.seal_payload(b"\x02" * 32, "inv", {"rootKey": "k"})
    assert invites.open_payload(b"\x02" * 32, "inv", sealed) == {"rootKey": "k"}
    with pytest.raises(ValueError, match="does not open"):
        invites.open_payload(b"\x03" * 32, "inv", sealed)
    with pytest.raises(ValueError, match="does not open"):
        invites.open_payload(b"\x02" * 32, "other-invite", sealed)


def test_retry_delays_back_off_with_jitter_and_cap() -> None:
    for attempt, base in enumerate(RETRY_DELAYS_S, start=1):
        for _ in range(20):
            assert 0.8 * base * 1000 <= retry_delay_ms(attempt) <= 1.2 * base * 1000
    assert retry_delay_ms(50) <= 36_000


def test_topic_ids() -> None:
    assert topic_id_for("*") == "all"
    assert topic_id_for("@all") == "all"
    assert topic_id_for("@ops/oncall") == "group:ops/oncall"
    assert topic_id_for("#release") == "release"
    assert topic_id_for("ab" * 32) is None


def test_pid_reuse_is_not_mistaken_for_the_session() -> None:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        start = proc_starttime(p.pid)
        assert start is not None
        assert pid_alive(p.pid, start)
        assert not pid_alive(p.pid, str(int(start) + 1))  # same pid, other process
    finally:
        p.kill()
        p.wait(timeout=10)
    assert not pid_alive(p.pid, start)
    assert pid_alive(os.getpid(), proc_starttime(os.getpid()))


def test_link_with_key_id_round_trips_and_bad_key_part_is_named() -> None:
    link = invites.InviteLink(
        "wss://b.example/ws", "mesh-1", "inv-1", b"\x05" * 32, key_id="k-1", key_pubkey="ab" * 32
    )
    assert invites.parse_link(str(link)) == link
    bad = str(link).replace("kpk=" + "ab" * 32, "kpk=zz")
    with pytest.raises(invites.InviteLinkError, match="key id part"):
        invites.parse_link(bad)
