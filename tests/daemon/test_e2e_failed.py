"""End to end: a push the recipient cannot read is reported `failed`, never `delivered`.

A real broker subprocess and two real daemons.  While bob is offline, alice's
daemon sends him a message; the ciphertext is then damaged in the broker's
own database (a hostile or broken broker), so bob's daemon receives a push it
cannot open.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from cmtest.broker import BrokerProc, run_broker
from cmtest.daemon import call, run_daemon, wait_for

from claudemesh.shared.protocol import crypto

from .test_e2e import setup_pair

pytestmark = pytest.mark.slow


@pytest.fixture
def broker(short_tmp: Path) -> Iterator[BrokerProc]:
    with run_broker(short_tmp / "broker") as b:
        yield b


def test_unreadable_push_is_failed_with_reason_on_the_sender(
    short_tmp: Path, broker: BrokerProc
) -> None:
    with run_daemon(short_tmp / "a") as a, run_daemon(short_tmp / "b") as b:
        bob = setup_pair(broker.url, a.home, b.home)
        b.stop()
        call(
            a.home, "message.send", to="bob", body="you will not read this", client_message_id="f-1"
        )
        st = call(a.home, "message.wait", client_message_id="f-1", state="sent", timeout_s=10)
        assert st["state"] == "sent"
        db = sqlite3.connect(broker.db_path, timeout=10)
        try:
            with db:
                n = db.execute(
                    "UPDATE messages SET ciphertext=? WHERE client_message_id='f-1'",
                    (crypto.b64e(b"garbage" * 8),),
                ).rowcount
            assert n == 1
        finally:
            db.close()
        b.start()

        wait_for(
            lambda: len(call(b.home, "quarantine.list")["rows"]) == 1, what="bob quarantines it"
        )
        # Waiting for `surfaced` ends at `failed`, as it does at `expired`.
        st = call(a.home, "message.wait", client_message_id="f-1", state="surfaced", timeout_s=15)
        assert st["state"] == "failed"
        [r] = st["recipients"]
        assert r["pubkey"] == bob["member_pubkey"]
        assert (r["state"], r["reason"]) == ("failed", "undecryptable")
        # The broker's `delivered` (made by bob's ack) never overwrites it.
        st = call(a.home, "message.status", client_message_id="f-1")
        assert st["state"] == "failed"
        assert [(x["state"], x["reason"]) for x in st["recipients"]] == [
            ("failed", "undecryptable")
        ]
        assert call(b.home, "message.inbox", mark_seen=False)["messages"] == []
        # After a restart of both daemons nothing changes and nothing is redone.
        a.restart()
        b.restart()
        wait_for(
            lambda: any(
                w["link"] == "connected" for w in call(b.home, "daemon.status")["workspaces"]
            ),
            what="bob reconnected",
        )
        st = call(a.home, "message.status", client_message_id="f-1")
        assert [(x["state"], x["reason"]) for x in st["recipients"]] == [
            ("failed", "undecryptable")
        ]
        assert len(call(b.home, "quarantine.list")["rows"]) == 1
