"""End to end: a real broker subprocess and real daemon subprocesses in temporary homes."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cmtest.broker import BrokerProc, run_broker
from cmtest.daemon import DaemonError, DaemonProc, IpcClient, call, run_daemon, wait_for

pytestmark = pytest.mark.slow


def link_state(home: Path, ws: str = "team") -> str:
    for w in call(home, "daemon.status")["workspaces"]:
        if w["name"] == ws:
            return str(w["link"])
    return "absent"


def wait_connected(home: Path, ws: str = "team") -> None:
    wait_for(lambda: link_state(home, ws) == "connected", timeout=15, what=f"{home.name} link")


def setup_pair(url: str, a: Path, b: Path, *, name: str = "team") -> dict[str, Any]:
    """A creates ``name``, invites, B joins; both linked. Returns B's workspace."""
    call(a, "workspace.create", name=name, broker_url=url, display_name="alice")
    inv = call(a, "invite.create", workspace=name)
    ws = call(b, "workspace.join", link=inv["link"], display_name="bob")["workspace"]
    wait_connected(b, name)
    wait_for(
        lambda: any(
            p["display_name"] == "bob" for p in call(a, "peer.list", workspace=name)["peers"]
        ),
        what="alice sees bob",
    )
    return dict(ws)


def inbox(home: Path, **kw: Any) -> list[dict[str, Any]]:
    return list(call(home, "message.inbox", mark_seen=False, **kw)["messages"])


@pytest.fixture
def broker(short_tmp: Path) -> Iterator[BrokerProc]:
    with run_broker(short_tmp / "broker") as b:
        yield b


def test_offline_recipient_gets_it_exactly_once_and_secrets_stay_home(
    short_tmp: Path, broker: BrokerProc
) -> None:
    with run_daemon(short_tmp / "a") as a, run_daemon(short_tmp / "b") as b:
        bob = setup_pair(broker.url, a.home, b.home)
        secret = call(a.home, "invite.create")["link"].split("#", 1)[1]
        b.stop()
        sent = call(
            a.home, "message.send", to="bob", body="canary-body-7f3a", client_message_id="m-1"
        )
        assert sent["state"] == "accepted"
        assert sent["recipients"][0]["pubkey"] == bob["member_pubkey"]
        st = call(a.home, "message.wait", client_message_id="m-1", state="sent", timeout_s=10)
        assert st["state"] == "sent"
        b.start()
        with IpcClient.open(b.home, socket="team") as sub:
            sub.request("subscribe", cursor=0)
            ev = sub.next_event(timeout=15)
            assert ev.kind == "message"
            assert ev.data["body"] == "canary-body-7f3a"
            assert ev.data["from_name"] == "alice"
            st = call(
                a.home, "message.wait", client_message_id="m-1", state="delivered", timeout_s=10
            )
            assert st["recipients"][0]["state"] in ("delivered", "surfaced")
            with pytest.raises(TimeoutError):
                sub.next_event(timeout=0.5)  # exactly one
        assert [m["body"] for m in inbox(b.home)] == ["canary-body-7f3a"]
        # The broker never held the body, the workspace root key or an invite secret.
        cfg = (b.home / "workspaces" / "team" / "config.json").read_text()
        root_key = json.loads(cfg)["root_key"]
        dump = "\n".join(sqlite3.connect(broker.db_path).iterdump())
        assert "canary-body-7f3a" not in dump
        assert root_key not in dump
        assert secret not in dump
        # ...and the daemons never logged a secret either.
        for h in (a.home, b.home):
            logs = "".join(p.read_text() for p in (h / "logs").glob("daemon.log*"))
            assert root_key not in logs
            assert secret not in logs
            assert "canary-body-7f3a" not in logs


def test_idempotency_over_the_socket(short_tmp: Path, broker: BrokerProc) -> None:
    with run_daemon(short_tmp / "a") as a, run_daemon(short_tmp / "b") as b:
        setup_pair(broker.url, a.home, b.home)
        r1 = call(a.home, "message.send", to="bob", body="once", client_message_id="same")
        r2 = call(a.home, "message.send", to="bob", body="once", client_message_id="same")
        assert r1["duplicate"] is False
        assert r2["duplicate"] is True
        assert r2["client_message_id"] == "same"
        with pytest.raises(DaemonError) as ei:
            call(a.home, "message.send", to="bob", body="different", client_message_id="same")
        assert ei.value.code == "conflict"
        assert ei.value.details["state"] in ("pending", "inflight", "done")
        call(a.home, "message.wait", client_message_id="same", state="delivered", timeout_s=10)
        wait_for(lambda: len(inbox(b.home)) == 1, what="one row")
        rows = call(a.home, "outbox.list")["rows"]
        assert [r["client_message_id"] for r in rows] == ["same"]
        # Still a conflict after delivery: an id is never freed.
        with pytest.raises(DaemonError):
            call(a.home, "message.send", to="bob", body="different", client_message_id="same")
        assert [m["body"] for m in inbox(b.home)] == ["once"]
        # Meta would be dropped on the wire, so it is refused, not accepted.
        with pytest.raises(DaemonError) as ei:
            call(a.home, "message.send", to="bob", body="m", meta={"k": "v"})
        assert ei.value.code == "invalid_params"
        assert "meta" in str(ei.value)


def test_kill9_sender_after_accept_still_delivers_once(short_tmp: Path, broker: BrokerProc) -> None:
    with run_daemon(short_tmp / "a") as a, run_daemon(short_tmp / "b") as b:
        setup_pair(broker.url, a.home, b.home)
        broker.stop()  # the sender cannot forward before it dies
        wait_for(lambda: link_state(a.home) != "connected", what="A notices")
        call(a.home, "message.send", to="bob", body="survives", client_message_id="k9")
        a.kill(signal.SIGKILL)
        a.start()  # while the broker is still down: it must connect and drain later
        assert call(a.home, "message.status", client_message_id="k9")["state"] == "accepted"
        broker.start()
        call(
            a.home,
            "message.wait",
            client_message_id="k9",
            state="delivered",
            timeout_s=20,
            timeout=20 + 5,
        )
        wait_for(lambda: inbox(b.home), timeout=10, what="bob inbox")
        assert [m["body"] for m in inbox(b.home)] == ["survives"]


def test_kill9_receiver_before_ack_yields_one_row(short_tmp: Path, broker: BrokerProc) -> None:
    with run_daemon(short_tmp / "a") as a:
        b = DaemonProc(short_tmp / "b", env={"CLAUDEMESH_TEST_HOLD_ACKS": "1"})
        try:
            b.start()
            setup_pair(broker.url, a.home, b.home)
            call(a.home, "message.send", to="bob", body="ack-me", client_message_id="r9")
            wait_for(lambda: inbox(b.home), what="stored, not acked")
            b.kill(signal.SIGKILL)
            b.extra_env.pop("CLAUDEMESH_TEST_HOLD_ACKS")
            b.start()
            call(
                a.home,
                "message.wait",
                client_message_id="r9",
                state="delivered",
                timeout_s=20,
                timeout=20 + 5,
            )
            assert [m["body"] for m in inbox(b.home)] == ["ack-me"]
        finally:
            b.kill()


def test_same_root_on_two_machines_both_store(short_tmp: Path, broker: BrokerProc) -> None:
    with run_daemon(short_tmp / "a") as a, run_daemon(short_tmp / "b") as b:
        bob = setup_pair(broker.url, a.home, b.home)
        b2_home = short_tmp / "b2"
        (b2_home / "identity").mkdir(parents=True, mode=0o700)
        shutil.copy(b.home / "identity" / "root.key", b2_home / "identity" / "root.key")
        with run_daemon(b2_home) as b2:
            inv = call(a.home, "invite.create")
            ws2 = call(b2.home, "workspace.join", link=inv["link"], display_name="bob")["workspace"]
            assert ws2["member_pubkey"] == bob["member_pubkey"]
            assert ws2["member_id"] == bob["member_id"]
            wait_connected(b2.home)
            assert (
                call(b2.home, "daemon.status")["device_id"]
                != call(b.home, "daemon.status")["device_id"]
            )
            call(
                a.home, "message.send", to=bob["member_pubkey"], body="both", client_message_id="d2"
            )
            wait_for(lambda: inbox(b.home) and inbox(b2.home), timeout=15, what="both devices")
            assert [m["body"] for m in inbox(b.home)] == ["both"]
            assert [m["body"] for m in inbox(b2.home)] == ["both"]


def test_one_broker_down_does_not_hold_back_another(short_tmp: Path) -> None:
    (short_tmp / "b1").mkdir()
    (short_tmp / "b2").mkdir()
    with (
        run_broker(short_tmp / "b1") as br1,
        run_broker(short_tmp / "b2") as br2,
        run_daemon(short_tmp / "a") as a,
        run_daemon(short_tmp / "b") as b,
    ):
        setup_pair(br1.url, a.home, b.home, name="one")
        setup_pair(br2.url, a.home, b.home, name="two")
        br1.stop()
        wait_for(lambda: link_state(a.home, "one") != "connected", what="one down")
        call(
            a.home, "message.send", workspace="one", to="bob", body="later", client_message_id="w1"
        )
        call(a.home, "message.send", workspace="two", to="bob", body="now", client_message_id="w2")
        call(
            a.home,
            "message.wait",
            workspace="two",
            client_message_id="w2",
            state="delivered",
            timeout_s=10,
        )
        assert [m["body"] for m in inbox(b.home, workspace="two")] == ["now"]
        assert (
            call(a.home, "message.status", workspace="one", client_message_id="w1")["state"]
            == "accepted"
        )
        br1.start()  # same port: the link comes back and drains without a restart
        call(
            a.home,
            "message.wait",
            workspace="one",
            client_message_id="w1",
            state="delivered",
            timeout_s=40,
            timeout=45,
        )
        assert [m["body"] for m in inbox(b.home, workspace="one")] == ["later"]


def test_workspace_list_use_leave(short_tmp: Path, broker: BrokerProc) -> None:
    with run_daemon(short_tmp / "a") as a:
        call(a.home, "workspace.create", name="one", broker_url=broker.url)
        call(a.home, "workspace.create", name="two", broker_url=broker.url)
        with pytest.raises(DaemonError) as ei:
            call(a.home, "workspace.create", name="two", broker_url=broker.url)
        assert ei.value.code == "conflict"
        listed = call(a.home, "workspace.list")
        assert listed["default"] == "one"
        assert sorted(w["name"] for w in listed["workspaces"]) == ["one", "two"]
        assert call(a.home, "workspace.use", name="two") == {"default": "two"}
        assert call(a.home, "daemon.status")["default_workspace"] == "two"
        assert (a.home / "sockets" / "two.sock").exists()
        call(a.home, "workspace.leave", name="two")
        assert [w["name"] for w in call(a.home, "workspace.list")["workspaces"]] == ["one"]
        assert not (a.home / "workspaces" / "two").exists()
        (archived,) = (a.home / "archive").iterdir()  # kept, not deleted
        assert archived.name.startswith("two-")
        assert (archived / "store.db").exists()
        assert (a.home / "archive").stat().st_mode & 0o777 == 0o700
        wait_for(lambda: not (a.home / "sockets" / "two.sock").exists(), what="socket gone")
        # The only one left is the default again for scoped calls.
        assert call(a.home, "outbox.list") == {"rows": []}
        with pytest.raises(DaemonError) as ei:
            call(a.home, "workspace.use", name="two")
        assert ei.value.code == "not_found"
        # Survives a restart.
        a.restart()
        assert [w["name"] for w in call(a.home, "workspace.list")["workspaces"]] == ["one"]


def test_the_creator_on_a_second_machine_is_the_same_member(
    short_tmp: Path, broker: BrokerProc
) -> None:
    with run_daemon(short_tmp / "a") as a, run_daemon(short_tmp / "b") as b:
        setup_pair(broker.url, a.home, b.home)
        alice = call(a.home, "workspace.list")["workspaces"][0]
        a2_home = short_tmp / "a2"
        (a2_home / "identity").mkdir(parents=True, mode=0o700)
        shutil.copy(a.home / "identity" / "root.key", a2_home / "identity" / "root.key")
        with run_daemon(a2_home) as a2:
            link = call(a.home, "invite.create")["link"]
            ws = call(a2.home, "workspace.join", link=link, display_name="alice")["workspace"]
            assert ws["member_pubkey"] == alice["member_pubkey"]
            assert ws["member_id"] == alice["member_id"]
            wait_connected(a2.home)
            r = call(b.home, "message.send", to=alice["member_pubkey"], body="to both of me")
            call(
                b.home, "message.wait", client_message_id=r["client_message_id"], state="delivered"
            )
            wait_for(lambda: inbox(a.home) and inbox(a2.home), timeout=15, what="both machines")
            assert [m["body"] for m in inbox(a2.home)] == ["to both of me"]
        # Someone else with the same link-shape joins as themselves.
        with run_daemon(short_tmp / "c") as c:
            link = call(a.home, "invite.create")["link"]
            carol = call(c.home, "workspace.join", link=link, display_name="carol")["workspace"]
            assert carol["member_pubkey"] != alice["member_pubkey"]


def test_leave_with_unsent_mail_needs_force_and_keeps_it(short_tmp: Path) -> None:
    """Leaving never silently drops accepted mail: it refuses, then archives."""
    (short_tmp / "br").mkdir()
    with (
        run_broker(short_tmp / "br") as br,
        run_daemon(short_tmp / "a") as a,
        run_daemon(short_tmp / "b") as b,
    ):
        setup_pair(br.url, a.home, b.home)
        br.stop()
        wait_for(lambda: link_state(a.home) != "connected", what="link down")
        call(a.home, "message.send", to="bob", body="unsent", client_message_id="u1")
        with pytest.raises(DaemonError) as ei:
            call(a.home, "workspace.leave", name="team")
        assert ei.value.code == "conflict"
        assert "1 message" in str(ei.value)
        assert [w["name"] for w in call(a.home, "workspace.list")["workspaces"]] == ["team"]
        assert call(a.home, "message.status", client_message_id="u1")["state"] == "accepted"
        left = call(a.home, "workspace.leave", name="team", force=True)
        db = Path(left["archived"]) / "store.db"
        con = sqlite3.connect(db)
        try:
            rows = con.execute("SELECT client_message_id FROM outbox").fetchall()
        finally:
            con.close()
        assert rows == [("u1",)]
