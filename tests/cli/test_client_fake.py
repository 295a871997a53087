"""Client behaviour against a scripted daemon on a real unix socket.

In-process (``app.run``) so each case costs milliseconds; the subprocess
and end-to-end suites cover the installed executable.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from fake_daemon import Fail, FakeDaemon, HangUp

from claudemesh.clients.cli.app import run
from claudemesh.shared.protocol import ids

PEERS = {
    "peers": [
        {
            "pubkey": "b" * 64,
            "display_name": "bob",
            "online": False,
            "status": "idle",
            "summary": "",
            "groups": [],
            "last_seen_at": 1,
            "is_session": False,
            "is_self": False,
        },
        {
            "pubkey": "a" * 64,
            "display_name": "alice",
            "online": True,
            "status": "working",
            "summary": "refactoring",
            "groups": [],
            "is_session": False,
            "is_self": True,
        },
    ]
}


def _out(capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    got = capsys.readouterr()
    return got.out, got.err


def test_peer_list_table_puts_online_first(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.handlers["peer.list"] = lambda p: PEERS
    assert run(["peer", "list"]) == 0
    out, _ = _out(capsys)
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "KEY", "STATUS", "SEEN", "SUMMARY"]
    assert lines[1].startswith("●  alice (you)")
    assert "working" in lines[1]
    assert "now" in lines[1]
    assert "refactoring" in lines[1]
    assert lines[2].startswith("○  bob")
    assert "b" * 12 in lines[2]
    assert fake.hellos[0].client == "cli"


def test_json_is_exactly_one_document(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    fake.handlers["peer.list"] = lambda p: PEERS
    assert run(["peers", "--json", "-w", "team"]) == 0
    out, err = _out(capsys)
    assert json.loads(out) == PEERS
    assert err == ""
    assert fake.requests[-1] == ("peer.list", {"workspace": "team"})


def test_send_passes_params_and_prints_id_and_state(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    def send(p: dict[str, Any]) -> dict[str, Any]:
        return {
            "client_message_id": p.get("client_message_id", "gen-id"),
            "state": "accepted",
            "duplicate": False,
            "recipients": [{"pubkey": "b" * 64, "display_name": "bob"}],
            "target": "b" * 64,
        }

    fake.handlers["message.send"] = send
    assert run(["send", "bob", "hi", "--id", "m-1", "--priority", "now", "--reply-to", "x"]) == 0
    out, _ = _out(capsys)
    assert out == "m-1 accepted to bob\n"
    assert fake.requests[-1] == (
        "message.send",
        {"to": "bob", "body": "hi", "priority": "now", "client_message_id": "m-1", "reply_to": "x"},
    )


def test_send_wait_asks_the_daemon_to_wait(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.handlers["message.send"] = lambda p: {
        "client_message_id": "m-2",
        "state": "accepted",
        "recipients": [],
    }
    fake.handlers["message.wait"] = lambda p: {"client_message_id": "m-2", "state": p["state"]}
    assert (
        run(["message", "send", "bob", "hi", "--wait", "delivered", "--timeout", "3", "--json"])
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["status"]["state"] == "delivered"
    assert fake.requests[-1] == (
        "message.wait",
        {"client_message_id": "m-2", "state": "delivered", "timeout_s": 3.0},
    )


def test_send_wait_timeout_is_a_failure(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.handlers["message.send"] = lambda p: {"client_message_id": "m", "state": "accepted"}

    def wait(p: dict[str, Any]) -> None:
        raise Fail("timeout", "still sent after 1 s", state="sent")

    fake.handlers["message.wait"] = wait
    assert run(["send", "bob", "hi", "--wait", "delivered", "--timeout", "1"]) == 1
    _, err = _out(capsys)
    assert "Still sent after 1 s. Last state: sent" in err


def test_unknown_peer_suggests_close_names(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    def send(p: dict[str, Any]) -> None:
        raise Fail("not_found", "No peer named 'bobb'.", candidates=["bob", "bobby"])

    fake.handlers["message.send"] = send
    assert run(["send", "bobb", "hi"]) == 1
    out, err = _out(capsys)
    assert out == ""
    assert err == "claudemesh: No peer named 'bobb'. Did you mean: bob, bobby?\n"


def test_ambiguous_prefix_lists_candidates_and_json_error_doc(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    cands = [
        {"pubkey": "abcd" + "1" * 60, "display_name": "bob"},
        {"pubkey": "abcd" + "2" * 60, "display_name": "carol"},
    ]

    def send(p: dict[str, Any]) -> None:
        raise Fail("ambiguous", "'abcd' matches 2 peers.", candidates=cands)

    fake.handlers["message.send"] = send
    assert run(["send", "abcd", "hi", "--json"]) == 1
    out, err = _out(capsys)
    doc = json.loads(out)
    assert doc["ok"] is False
    assert doc["error"]["code"] == "ambiguous"
    assert doc["error"]["details"]["candidates"] == cands
    assert "abcd111111111111  bob" in err
    assert "abcd222222222222  carol" in err


def test_invite_errors_are_sentences(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    def join(p: dict[str, Any]) -> None:
        raise Fail("invite_expired", "This invite expired 2 h ago; ask for a new one.")

    fake.handlers["workspace.join"] = join
    assert run(["workspace", "join", "cm://x", "--name", "bob"]) == 1
    _, err = _out(capsys)
    assert "expired 2 h ago" in err
    assert "Traceback" not in err
    assert fake.requests[-1] == ("workspace.join", {"link": "cm://x", "display_name": "bob"})


def test_api_mismatch_offers_restart(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    fake.mismatch = True
    assert run(["peers"]) == 3
    _, err = _out(capsys)
    assert "newer than the running daemon" in err
    assert "claudemesh daemon stop && claudemesh daemon start" in err


def test_no_start_without_daemon_exits_3(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["peers", "--no-start"]) == 3
    _, err = _out(capsys)
    assert "not running" in err
    assert "claudemesh daemon start" in err
    assert not (home / "logs").exists()  # nothing was started


def test_installed_unit_blocks_autostart(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from claudemesh.clients.cli.service import systemd_unit_path

    unit = systemd_unit_path()
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\n")
    assert run(["peers"]) == 3
    _, err = _out(capsys)
    assert "managed by a service unit" in err
    assert "systemctl --user start claudemesh-daemon.service" in err
    assert not (home / "logs").exists()


def test_inbox_and_status_render(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    fake.handlers["message.inbox"] = lambda p: {
        "messages": [
            {
                "from_name": "bob",
                "from_pubkey": "b" * 64,
                "body": "hi\nthere",
                "created_at": 0,
                "seen": False,
            }
        ],
        "cursor": 1,
    }
    fake.handlers["message.status"] = lambda p: {
        "client_message_id": p["client_message_id"],
        "state": "sent",
        "recipients": [
            {"pubkey": "b" * 64, "display_name": "bob", "state": "sent", "at": 0},
        ],
    }
    assert run(["inbox", "--unread"]) == 0
    out, _ = _out(capsys)
    assert out.startswith("*")
    assert "bob: hi there" in out
    assert fake.requests[-1] == ("message.inbox", {"unread": True, "limit": 50})
    assert run(["message", "status", "m-9"]) == 0
    out, _ = _out(capsys)
    assert out.splitlines()[0] == "m-9: sent"
    assert out.splitlines()[1].split() == ["RECIPIENT", "KEY", "STATE", "SINCE", "REASON"]


def test_inbox_follow_streams_events(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    fake.handlers["message.inbox"] = lambda p: {"messages": [], "cursor": 0}
    fake.handlers["subscribe"] = lambda p: {"cursor": 0}
    fake.events = [
        {"from_name": "bob", "body": "one", "created_at": 0},
        {"from_name": "carol", "body": "two", "created_at": 0},
    ]
    # The fake closes after its events: the CLI reports the lost daemon (exit 3).
    assert run(["inbox", "--follow", "--json"]) == 3
    out, err = _out(capsys)
    lines = [json.loads(line) for line in out.splitlines()]
    assert [m["body"] for m in lines[:2]] == ["one", "two"]
    assert "closed the connection" in err
    assert ("subscribe", {"kinds": ["message"], "mark_seen": True}) in fake.requests


def test_workspace_verbs(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    ws = {
        "name": "team",
        "mesh_id": "m1",
        "member_id": "u1",
        "member_pubkey": "c" * 64,
        "broker_url": "ws://127.0.0.1:1/ws",
        "role": "owner",
    }
    fake.handlers["workspace.create"] = lambda p: {"workspace": ws}
    fake.handlers["workspace.list"] = lambda p: {"default": "team", "workspaces": [ws]}
    fake.handlers["invite.create"] = lambda p: {
        "link": "claudemesh://join/abc#secret",
        "invite_id": "i",
        "expires_at": 0,
        "role": p["role"],
        "uses": p["uses"],
    }
    assert run(["workspace", "create", "team", "--broker", "ws://127.0.0.1:1/ws"]) == 0
    assert "Created workspace team" in capsys.readouterr().out
    assert run(["workspace", "create", "team", "--broker", "http://x"]) == 2
    assert "ws:// or wss://" in capsys.readouterr().err
    assert run(["workspace", "list"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("*  team")
    assert run(["invite", "create", "--uses", "3", "--expires", "2h", "--role", "admin"]) == 0
    assert capsys.readouterr().out.startswith("claudemesh://join/abc#secret\n")
    assert fake.requests[-1] == ("invite.create", {"role": "admin", "uses": 3, "expires_s": 7200})
    assert run(["invite", "create", "--expires", "soon"]) == 2


def test_verify_groups_digits(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    fake.handlers["verify"] = lambda p: {
        "safety_number": "123451234512345123451234512345",
        "self_pubkey": "a" * 64,
        "peer_pubkey": "b" * 64,
        "peer_name": "bob",
    }
    assert run(["verify", "bob"]) == 0
    out = capsys.readouterr().out
    assert "12345 12345 12345 12345 12345 12345" in out


def test_daemon_status_and_stop(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["daemon", "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["running"] is True
    assert run(["daemon", "stop"]) == 0
    assert "Daemon stopped" in capsys.readouterr().out
    assert fake.stopped.is_set()
    assert run(["daemon", "status", "--json"]) == 3
    assert json.loads(capsys.readouterr().out)["running"] is False


def test_usage_errors_exit_2(home: Path) -> None:
    assert run(["send", "bob"]) == 2
    assert run(["send", "bob", "hi", "--priority", "urgent"]) == 2
    assert run(["no-such-verb"]) == 2


def test_usage_error_with_json_still_prints_one_document(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["send", "bob", "--json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    assert doc["error"]["code"] == "usage"
    assert "TEXT" in doc["error"]["message"]


def test_send_makes_its_own_id_so_a_lost_answer_can_be_retried(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    def crash(p: dict[str, Any]) -> dict[str, Any]:
        raise HangUp  # the daemon dies with the request (maybe after its commit)

    fake.handlers["message.send"] = crash
    assert run(["send", "bob", "hi"]) == 3
    _, err = _out(capsys)
    sent = fake.requests[-1][1]
    cmid = sent["client_message_id"]
    assert ids.is_uuid(cmid), sent
    assert uuid.UUID(cmid).version == 7
    assert abs(ids.uuid7_time_ms(cmid) - time.time() * 1000) < 60_000
    # The user is told the id, so re-sending cannot make a second message.
    assert f"--id {cmid}" in err


def test_outbox_list_and_requeue(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    fake.handlers["outbox.list"] = lambda p: {
        "rows": [
            {
                "client_message_id": "m-dead",
                "state": "dead",
                "target": "bob",
                "attempts": 1,
                "created_at": 0,
                "last_error": "unknown_target: no member",
            }
        ]
    }
    fake.handlers["outbox.requeue"] = lambda p: {
        "old_client_message_id": p["client_message_id"],
        "client_message_id": "m-new",
    }
    assert run(["outbox", "list", "--state", "dead"]) == 0
    out, _ = _out(capsys)
    assert out.splitlines()[0].split()[:3] == ["ID", "STATE", "TO"]
    assert "m-dead" in out
    assert "unknown_target" in out
    assert fake.requests[-1] == ("outbox.list", {"state": "dead"})
    assert run(["outbox", "requeue", "m-dead"]) == 0
    out, _ = _out(capsys)
    assert out == "m-dead aborted; sent again as m-new\n"
    assert fake.requests[-1] == ("outbox.requeue", {"client_message_id": "m-dead"})
    fake.handlers["outbox.requeue"] = lambda p: (_ for _ in ()).throw(
        Fail("conflict", "m-done is done; only pending, inflight or dead rows can be requeued")
    )
    assert run(["outbox", "requeue", "m-done"]) == 1
    _, err = _out(capsys)
    assert "only pending, inflight or dead" in err
    assert "Traceback" not in err


def test_join_reads_the_link_from_stdin_so_its_secret_stays_out_of_argv(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Other local users can read every process's argv (/proc/PID/cmdline).
    link = "claudemesh://join/m/i?broker=ws%3A%2F%2Fh%2Fws#c2VjcmV0"
    fake.handlers["workspace.join"] = lambda p: {
        "workspace": {"name": "team", "mesh_id": "m", "role": "member", "broker_url": "ws://h/ws"}
    }
    monkeypatch.setattr("sys.stdin", io.StringIO(link + "\n"))
    assert run(["workspace", "join", "-"]) == 0
    assert fake.requests[-1] == ("workspace.join", {"link": link})
    assert "Joined workspace" in _out(capsys)[0]
