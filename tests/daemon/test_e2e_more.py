"""End to end, continued: sessions, subscriptions, broadcast, failures and quarantine."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from cmtest.broker import BrokerProc, run_broker
from cmtest.daemon import DaemonError, IpcClient, call, run_daemon, wait_for
from trio_websocket import open_websocket_url

from claudemesh.shared.protocol import crypto, wire

from .test_e2e import inbox, setup_pair

pytestmark = pytest.mark.slow


@pytest.fixture
def broker(short_tmp: Path) -> Iterator[BrokerProc]:
    with run_broker(short_tmp / "broker") as b:
        yield b


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A real process standing in for a Claude session."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield p
    finally:
        p.kill()
        p.wait(timeout=10)


def test_sessions_route_and_are_forgotten(
    short_tmp: Path, broker: BrokerProc, sleeper: subprocess.Popen[bytes]
) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with run_daemon(short_tmp / "a") as a, run_daemon(short_tmp / "b") as b:
            bob = setup_pair(broker.url, a.home, b.home)
            s1 = call(b.home, "session.register", session_id="s-one", pid=sleeper.pid, cwd="/x")
            again = call(b.home, "session.register", session_id="s-one", pid=sleeper.pid, cwd="/x")
            assert again["session_pubkey"] == s1["session_pubkey"]  # same id, same key
            s2 = call(b.home, "session.register", pid=other.pid, cwd="/y")
            assert s2["session_pubkey"] != s1["session_pubkey"]
            wait_for(
                lambda: any(
                    p["pubkey"] == s1["session_pubkey"] and p["is_session"]
                    for p in call(a.home, "peer.list")["peers"]
                ),
                what="alice sees the session",
            )
            with (
                IpcClient.open(b.home, socket="team", session_id="s-one") as c1,
                IpcClient.open(b.home, socket="team", session_id=s2["session_id"]) as c2,
            ):
                c1.request("subscribe", kinds=["message"])
                c2.request("subscribe", kinds=["message"])
                call(a.home, "message.send", to=s1["session_pubkey"], body="for s1 only")
                call(a.home, "message.send", to=bob["member_pubkey"], body="for all of bob")
                got1 = [c1.next_event(timeout=10).data["body"] for _ in range(2)]
                assert sorted(got1) == ["for all of bob", "for s1 only"]
                assert c2.next_event(timeout=10).data["body"] == "for all of bob"
                with pytest.raises(TimeoutError):
                    c2.next_event(timeout=0.5)
                # A session's send goes out under its own key, on behalf of bob.
                r = c1.request("message.send", to="alice", body="from s1")
                call(
                    b.home,
                    "message.wait",
                    client_message_id=r["client_message_id"],
                    state="delivered",
                )
                wait_for(lambda: inbox(a.home), what="alice inbox")
                m = inbox(a.home)[0]
                assert m["from_pubkey"] == s1["session_pubkey"]
                assert m["from_member_pubkey"] == bob["member_pubkey"]
                with pytest.raises(TimeoutError):
                    c1.next_event(timeout=0.3)  # never echoed back
            # Taken by a session subscriber: surfaced for the sender.
            cmid = inbox_cmid(b.home, "for s1 only")
            st = call(a.home, "message.status", client_message_id=cmid)
            assert st["recipients"][0]["pubkey"] == s1["session_pubkey"]
            # The process ends: the daemon forgets the session.
            other.kill()
            other.wait(timeout=10)
            wait_for(
                lambda: (
                    not any(
                        p["pubkey"] == s2["session_pubkey"]
                        for p in call(a.home, "peer.list")["peers"]
                    )
                ),
                timeout=15,
                what="session gone",
            )
            with pytest.raises(DaemonError) as ei:
                call(b.home, "session.unregister", session_id=s2["session_id"])
            assert ei.value.code == "not_found"
            call(b.home, "session.unregister", session_id="s-one")
    finally:
        other.kill()
        other.wait(timeout=10)


def inbox_cmid(home: Path, body: str) -> str:
    for m in inbox(home):
        if m["body"] == body:
            return str(m["client_message_id"])
    raise AssertionError(body)


def test_surfaced_after_a_session_takes_it(
    short_tmp: Path, broker: BrokerProc, sleeper: subprocess.Popen[bytes]
) -> None:
    with run_daemon(short_tmp / "a") as a, run_daemon(short_tmp / "b") as b:
        setup_pair(broker.url, a.home, b.home)
        call(b.home, "session.register", session_id="s", pid=sleeper.pid, cwd="/")
        with IpcClient.open(b.home, socket="team", session_id="s") as c:
            c.request("subscribe")
            r = call(a.home, "message.send", to="bob", body="see me")
            assert c.next_event(timeout=10).data["body"] == "see me"
            st = call(
                a.home,
                "message.wait",
                client_message_id=r["client_message_id"],
                state="surfaced",
                timeout_s=10,
            )
            assert [x["state"] for x in st["recipients"]] == ["surfaced"]


def test_subscriber_resumes_from_its_cursor(short_tmp: Path, broker: BrokerProc) -> None:
    with run_daemon(short_tmp / "a") as a, run_daemon(short_tmp / "b") as b:
        setup_pair(broker.url, a.home, b.home)
        with IpcClient.open(b.home) as c:
            head = c.request("subscribe", kinds=["message"])["cursor"]
            call(a.home, "message.send", to="bob", body="one")
            first = c.next_event(timeout=10)
            assert first.data["body"] == "one"
        for body in ("two", "three"):
            r = call(a.home, "message.send", to="bob", body=body)
            call(
                a.home, "message.wait", client_message_id=r["client_message_id"], state="delivered"
            )
        with IpcClient.open(b.home) as c:
            c.request("subscribe", cursor=first.cursor, kinds=["message"])
            got = [c.next_event(timeout=10).data["body"] for _ in range(2)]
            assert got == ["two", "three"]
            with pytest.raises(TimeoutError):
                c.next_event(timeout=0.3)
        with IpcClient.open(b.home) as c:  # from the very start
            c.request("subscribe", cursor=head, kinds=["message"])
            assert [c.next_event(timeout=10).data["body"] for _ in range(3)] == [
                "one",
                "two",
                "three",
            ]


def test_broadcast_is_end_to_end_encrypted(short_tmp: Path, broker: BrokerProc) -> None:
    with (
        run_daemon(short_tmp / "a") as a,
        run_daemon(short_tmp / "b") as b,
        run_daemon(short_tmp / "c") as c,
    ):
        setup_pair(broker.url, a.home, b.home)
        peers = IpcClient.open(b.home)
        peers.request("subscribe", kinds=["peer"])
        inv = call(a.home, "invite.create")
        call(c.home, "workspace.join", link=inv["link"], display_name="carol")
        ev = peers.next_event(timeout=15)
        peers.close()
        assert ev.kind == "peer"
        assert ev.data["event"] in ("peer_joined", "peer_returned")
        assert ev.data["name"] == "carol"
        wait_for(lambda: len(call(a.home, "peer.list")["peers"]) >= 3, what="three peers")
        r = call(a.home, "message.send", to="*", body="canary-all-91c2")
        assert sorted(x["display_name"] for x in r["recipients"]) == ["bob", "carol"]
        wait_for(lambda: inbox(b.home) and inbox(c.home), timeout=15, what="both got it")
        for h in (b.home, c.home):
            (m,) = inbox(h)
            assert m["body"] == "canary-all-91c2"
            assert m["topic"] == "all"
        assert inbox(a.home) == []  # never back to the sender
        st = call(
            a.home, "message.wait", client_message_id=r["client_message_id"], state="delivered"
        )
        assert len(st["recipients"]) == 2
        dump = "\n".join(sqlite3.connect(broker.db_path).iterdump())
        assert "canary-all-91c2" not in dump


def test_unknown_target_goes_dead_and_requeue_makes_a_new_id(
    short_tmp: Path, broker: BrokerProc
) -> None:
    with run_daemon(short_tmp / "a") as a, run_daemon(short_tmp / "b") as b:
        setup_pair(broker.url, a.home, b.home)
        with pytest.raises(DaemonError) as ei:
            call(a.home, "message.send", to="ab" * 32, body="not a point")
        assert ei.value.code == "invalid_params"
        ghost = crypto.KeyPair(b"\x07" * 32).public_hex  # a real key, not a member
        call(a.home, "message.send", to=ghost, body="nobody", client_message_id="g1")
        st = call(a.home, "message.wait", client_message_id="g1", state="delivered", timeout_s=10)
        assert st["state"] == "failed"
        assert st["outbox_state"] == "dead"
        assert "unknown_target" in st["last_error"]
        assert [r["state"] for r in call(a.home, "outbox.list", state="dead")["rows"]] == ["dead"]
        rq = call(a.home, "outbox.requeue", client_message_id="g1")
        assert rq["old_client_message_id"] == "g1"
        assert rq["client_message_id"] != "g1"
        old = call(a.home, "message.status", client_message_id="g1")
        assert old["outbox_state"] == "aborted"
        assert old["requeued_as"] == rq["client_message_id"]
        with pytest.raises(DaemonError) as ei:
            call(a.home, "outbox.requeue", client_message_id="g1")
        assert ei.value.code == "conflict"
        with pytest.raises(DaemonError) as ei:
            call(a.home, "message.send", to="nobody-by-that-name", body="x")
        assert ei.value.code == "not_found"


def test_invite_reuse_and_tampering_are_refused(short_tmp: Path, broker: BrokerProc) -> None:
    with (
        run_daemon(short_tmp / "a") as a,
        run_daemon(short_tmp / "b") as b,
        run_daemon(short_tmp / "c") as c,
    ):
        setup_pair(broker.url, a.home, b.home)
        inv = call(a.home, "invite.create", uses=1)
        link = inv["link"]
        # A different secret: the claim key does not match the stored one.
        wrong = link[: link.index("#") + 1] + "B" * 43
        with pytest.raises(DaemonError) as ei:
            call(c.home, "workspace.join", link=wrong)
        assert ei.value.code == "bad_signature"
        call(c.home, "workspace.join", link=link, display_name="carol")
        d_home = short_tmp / "d"
        with run_daemon(d_home) as d:
            with pytest.raises(DaemonError) as ei:
                call(d.home, "workspace.join", link=link)
            assert ei.value.code == "invite_exhausted"
        with pytest.raises(DaemonError) as ei:
            call(b.home, "invite.create")
        assert ei.value.code == "forbidden"


async def test_undecryptable_push_is_quarantined_not_dropped(
    short_tmp: Path, broker: BrokerProc
) -> None:
    with run_daemon(short_tmp / "a") as a, run_daemon(short_tmp / "b") as b:
        bob = setup_pair(broker.url, a.home, b.home)
        # Speak as alice on the wire, with a body bob cannot open.
        cfg = json.loads((a.home / "workspaces" / "team" / "config.json").read_text())
        root = (a.home / "identity" / "root.key").read_bytes()
        kp = crypto.KeyPair(crypto.member_seed(root, cfg["key_id"]))
        ts = time.time_ns() // 1_000_000
        hello = wire.Hello(
            mesh_id=cfg["mesh_id"],
            member_id=cfg["member_id"],
            pubkey=kp.public_hex,
            session_id="raw",
            pid=1,
            cwd="/",
            timestamp=ts,
            signature=kp.sign(
                wire.hello_canonical(cfg["mesh_id"], cfg["member_id"], kp.public_hex, ts)
            ),
            device_id="raw-test-device",
        )
        with trio.fail_after(15):
            async with open_websocket_url(broker.url) as ws:
                await ws.send_message(wire.encode_frame(hello).decode())
                assert isinstance(wire.decode_frame(await ws.get_message()), wire.HelloAck)
                bad = wire.Send(
                    id="q1",
                    target_spec=bob["member_pubkey"],
                    priority="next",
                    nonce=crypto.b64e(b"\0" * 24),
                    ciphertext=crypto.b64e(b"garbage" * 8),
                    client_message_id="q1",
                )
                await ws.send_message(wire.encode_frame(bad).decode())
                while True:
                    f = wire.decode_frame(await ws.get_message())
                    if isinstance(f, wire.Ack):
                        assert f.queued
                        break

        def quarantined() -> int:
            return int(call(b.home, "daemon.status")["workspaces"][0]["quarantined"])

        await trio.to_thread.run_sync(lambda: wait_for(quarantined, what="quarantined"))
        rows = call(b.home, "quarantine.list")["rows"]
        assert len(rows) == 1
        assert "authentication" in rows[0]["reason"]
        assert inbox(b.home) == []


def test_verify_status_summary_and_inbox_filters(short_tmp: Path, broker: BrokerProc) -> None:
    with run_daemon(short_tmp / "a") as a, run_daemon(short_tmp / "b") as b:
        bob = setup_pair(broker.url, a.home, b.home)
        va = call(a.home, "verify", peer="bob")
        vb = call(b.home, "verify", peer="alice")
        assert va["safety_number"] == vb["safety_number"]
        assert len(va["safety_number"].split()) == 6
        assert va["peer_pubkey"] == bob["member_pubkey"]
        assert vb["self_pubkey"] == bob["member_pubkey"]

        call(b.home, "status.set", status="working")
        call(b.home, "summary.set", summary="refactoring the parser")

        def bob_seen() -> dict[str, object] | None:
            for p in call(a.home, "peer.list")["peers"]:
                # Status and summary are two frames: wait for both to be applied.
                if (
                    p["pubkey"] == bob["member_pubkey"]
                    and p["status"] == "working"
                    and p["summary"] == "refactoring the parser"
                ):
                    return dict(p)
            return None

        p = wait_for(bob_seen, what="bob working")
        assert p["summary"] == "refactoring the parser"
        with pytest.raises(DaemonError) as ei:
            call(b.home, "status.set", status="asleep")
        assert ei.value.code == "invalid_params"

        for i in range(3):
            r = call(a.home, "message.send", to="bob", body=f"n{i}")
        call(a.home, "message.wait", client_message_id=r["client_message_id"], state="delivered")
        wait_for(lambda: len(inbox(b.home)) == 3, what="three")
        newest = call(b.home, "message.inbox", limit=1, mark_seen=False)["messages"]
        assert [m["body"] for m in newest] == ["n2"]
        first = call(b.home, "message.inbox", unread=True, limit=2, after_cursor=0)
        assert [m["body"] for m in first["messages"]] == ["n0", "n1"]  # and now seen
        rest = call(b.home, "message.inbox", unread=True)["messages"]
        assert [m["body"] for m in rest] == ["n2"]
        assert call(b.home, "message.inbox", unread=True)["messages"] == []
        assert call(b.home, "daemon.status")["workspaces"][0]["inbox_unread"] == 0
        st = call(
            a.home, "message.wait", client_message_id=r["client_message_id"], state="surfaced"
        )
        assert st["state"] == "surfaced"


def test_rate_limited_sends_back_off_and_all_arrive_once(short_tmp: Path) -> None:
    with (
        run_broker(short_tmp / "broker", args=["--rate", "20", "--burst", "8"]) as broker,
        run_daemon(short_tmp / "a") as a,
        run_daemon(short_tmp / "b") as b,
    ):
        setup_pair(broker.url, a.home, b.home)
        ids = [
            call(a.home, "message.send", to="bob", body=f"r{i}")["client_message_id"]
            for i in range(24)
        ]
        for cmid in ids:
            call(
                a.home,
                "message.wait",
                client_message_id=cmid,
                state="delivered",
                timeout_s=40,
                timeout=40 + 5,
            )
        bodies = sorted(m["body"] for m in call(b.home, "message.inbox", limit=100)["messages"])
        assert bodies == sorted(f"r{i}" for i in range(24))
        rows = call(a.home, "outbox.list")["rows"]
        assert any(r["attempts"] > 1 for r in rows)  # some really were refused and retried


def test_expired_in_the_broker_is_reported_per_recipient(short_tmp: Path) -> None:
    with (
        run_broker(
            short_tmp / "broker", args=["--ttl", "0.5", "--sweep-interval", "0.2"]
        ) as broker,
        run_daemon(short_tmp / "a") as a,
        run_daemon(short_tmp / "b") as b,
    ):
        setup_pair(broker.url, a.home, b.home)
        b.stop()
        call(a.home, "message.send", to="bob", body="too late", client_message_id="e1")
        st = call(
            a.home,
            "message.wait",
            client_message_id="e1",
            state="delivered",
            timeout_s=20,
            timeout=20 + 5,
        )
        assert st["state"] == "expired"
        assert [r["state"] for r in st["recipients"]] == ["expired"]


def test_session_survives_daemon_restart_and_gets_its_queued_mail(
    short_tmp: Path, broker: BrokerProc, sleeper: subprocess.Popen[bytes]
) -> None:
    with run_daemon(short_tmp / "a") as a, run_daemon(short_tmp / "b") as b:
        setup_pair(broker.url, a.home, b.home)
        s = call(b.home, "session.register", session_id="keep", pid=sleeper.pid, cwd="/w")
        wait_for(
            lambda: any(
                p["pubkey"] == s["session_pubkey"] for p in call(a.home, "peer.list")["peers"]
            ),
            what="session visible",
        )
        b.stop()
        r = call(a.home, "message.send", to=s["session_pubkey"], body="while you were out")
        call(a.home, "message.wait", client_message_id=r["client_message_id"], state="sent")
        b.start()  # the session's process still runs: it is restored and presented again
        with IpcClient.open(b.home, socket="team", session_id="keep") as c:
            c.request("subscribe", cursor=0, kinds=["message"])
            ev = c.next_event(timeout=15)
            assert ev.data["body"] == "while you were out"
            assert ev.data["to_key"] == s["session_pubkey"]
        st = call(
            a.home, "message.wait", client_message_id=r["client_message_id"], state="surfaced"
        )
        assert st["state"] == "surfaced"


def test_mail_to_a_session_that_left_waits_for_its_resume(
    short_tmp: Path, broker: BrokerProc, sleeper: subprocess.Popen[bytes]
) -> None:
    with run_daemon(short_tmp / "a") as a, run_daemon(short_tmp / "b") as b:
        setup_pair(broker.url, a.home, b.home)
        s = call(b.home, "session.register", session_id="s-gone", pid=sleeper.pid, cwd="/x")
        wait_for(
            lambda: any(
                p["pubkey"] == s["session_pubkey"] for p in call(a.home, "peer.list")["peers"]
            ),
            what="alice sees the session",
        )
        call(b.home, "session.unregister", session_id="s-gone")
        r = call(a.home, "message.send", to=s["session_pubkey"], body="for a session that left")
        call(a.home, "message.wait", client_message_id=r["client_message_id"], state="sent")
        # A resumed session (same id, same key) gets it; nothing is quarantined.
        call(b.home, "session.register", session_id="s-gone", pid=sleeper.pid, cwd="/x")
        call(a.home, "message.wait", client_message_id=r["client_message_id"], state="delivered")
        got = inbox(b.home)
        assert [m["body"] for m in got] == ["for a session that left"]
        assert got[0]["to_key"] == s["session_pubkey"]
        assert call(b.home, "quarantine.list")["rows"] == []


def test_a_plain_subscriber_sees_mail_for_the_users_sessions_too(
    short_tmp: Path, broker: BrokerProc, sleeper: subprocess.Popen[bytes]
) -> None:
    # docs/ipc.md: only a session's own stream skips mail for another session key;
    # the user's own reader (`inbox --follow`) sees all of the user's mail.
    with run_daemon(short_tmp / "a") as a, run_daemon(short_tmp / "b") as b:
        setup_pair(broker.url, a.home, b.home)
        s = call(b.home, "session.register", session_id="s-x", pid=sleeper.pid, cwd="/x")
        wait_for(
            lambda: any(
                p["pubkey"] == s["session_pubkey"] for p in call(a.home, "peer.list")["peers"]
            ),
            what="alice sees the session",
        )
        with IpcClient.open(b.home, socket="team") as plain:
            plain.request("subscribe", kinds=["message"])
            call(a.home, "message.send", to=s["session_pubkey"], body="for the session")
            ev = plain.next_event(timeout=10)
            assert ev.data["body"] == "for the session"
            assert ev.data["to_key"] == s["session_pubkey"]
