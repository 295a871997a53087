"""The real ``claudemesh-broker`` subprocess: durability across kill -9, signals,
admin commands beside a running server, schema guard, and no plaintext on disk."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from cmtest.broker import (
    BrokerError,
    Identity,
    add_member,
    admin,
    create_mesh,
    new_key,
    open_peer,
    revoke_member,
    run_broker,
)

from claudemesh.shared.protocol import wire


def enroll(db: Path, mesh: str, name: str, role: str = "member") -> Identity:
    key = new_key()
    member_id = add_member(db, mesh, key.public_hex, name, role)
    return Identity(mesh_id=mesh, member_id=member_id, key=key, name=name)


@pytest.mark.slow
async def test_rows_survive_kill_9_and_restart(tmp_path: Path) -> None:
    with run_broker(tmp_path) as broker:
        mesh = create_mesh(broker.db_path, "durable")
        alice = enroll(broker.db_path, mesh, "alice")
        bob = enroll(broker.db_path, mesh, "bob")
        async with open_peer(broker.url, alice) as a:
            acks = [await a.dm(bob.pubkey, f"m{i}".encode(), cmid=f"k{i}") for i in range(25)]
        assert all(x.queued for x in acks)
        port = broker.port
        assert broker.kill() == -signal.SIGKILL
        broker.start()
        assert broker.port == port
        async with open_peer(broker.url, alice) as a:
            retry = await a.dm(bob.pubkey, b"m0", cmid="k0")
            assert retry.duplicate
            assert retry.message_id == acks[0].message_id
        async with open_peer(broker.url, bob) as bb:
            got = [(await bb.message()).message_id for _ in range(25)]
        assert got == [x.message_id for x in acks]


@pytest.mark.slow
async def test_sigterm_is_a_clean_shutdown(tmp_path: Path) -> None:
    with run_broker(tmp_path) as broker:
        assert broker.stop(signal.SIGTERM) == 0
        assert '"event": "stopped"' in broker.logs()
        broker.start()
        assert broker.stop(signal.SIGINT) == 0
    events = [line for line in broker.logs().splitlines() if '"listening"' in line]
    assert len(events) == 2
    assert f'"url": "ws://127.0.0.1:{broker.port}/ws"' in events[0]


@pytest.mark.slow
async def test_admin_cli_while_serving(tmp_path: Path) -> None:
    with run_broker(tmp_path) as broker:
        db = broker.db_path
        mesh = create_mesh(db, "ops")
        assert len(mesh) == 36
        listing = admin(db, "mesh", "list")
        assert mesh in listing
        assert "ops" in listing
        alice = enroll(db, mesh, "alice", "admin")
        bob = enroll(db, mesh, "bob")
        members = admin(db, "member", "list", mesh)
        assert "alice" in members
        assert "admin" in members
        assert bob.pubkey in members
        with pytest.raises(BrokerError, match="already"):
            add_member(db, mesh, bob.pubkey, "bob again")
        with pytest.raises(BrokerError, match="64 lowercase hex"):
            add_member(db, mesh, "xyz", "bad")
        async with open_peer(broker.url, alice) as a:
            assert a.hello_ack is not None
            assert a.hello_ack.role == "admin"
        assert revoke_member(db, mesh, bob.member_id) == bob.member_id
        assert "revoked" in admin(db, "member", "list", mesh)
        async with open_peer(broker.url) as p:
            from cmtest.broker import signed_hello

            await p.send(signed_hello(bob))
            err = await p.expect(wire.Error)
            assert err.code == "revoked"
            assert await p.closed() == 4002


def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    db = tmp_path / "future.db"
    create_mesh(db, "x")
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 999")
    res = subprocess.run(
        [sys.executable, "-m", "claudemesh.broker", "serve", "--port", "0", "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 2
    assert "newer than this broker" in res.stderr
    with pytest.raises(BrokerError, match="newer"):
        admin(db, "mesh", "list")


@pytest.mark.slow
async def test_database_holds_no_plaintext(tmp_path: Path) -> None:
    """Security property 1: canaries encrypted as a real client would never hit the disk."""
    canaries = [f"CANARY-{i}-plaintext-must-not-leak" for i in range(5)]
    with run_broker(tmp_path) as broker:
        mesh = create_mesh(broker.db_path, "secure")
        alice = enroll(broker.db_path, mesh, "alice")
        bob = enroll(broker.db_path, mesh, "bob")
        async with open_peer(broker.url, alice) as a:
            for c in canaries:
                assert (await a.dm(bob.pubkey, c.encode())).queued
        async with open_peer(broker.url, bob) as bb:
            p = await bb.message()
            await bb.send(wire.ClientAck(broker_message_id=p.message_id))
            await a_roundtrip(bb)
        broker.stop()
    raw = b"".join(
        f.read_bytes() for f in broker.db_path.parent.iterdir() if f.name.startswith("broker.db")
    )
    dump = "\n".join(sqlite3.connect(broker.db_path).iterdump())
    assert "CANARY" not in dump
    assert b"CANARY" not in raw
    for secret in (alice.key.seed, bob.key.seed, alice.key.x25519_secret, bob.key.x25519_secret):
        assert secret not in raw
        assert secret.hex() not in dump
    assert broker.db_path.stat().st_mode & 0o077 == 0


async def a_roundtrip(p: object) -> None:
    """Wait until everything sent before has been processed by the broker."""
    reply = await p.request(wire.ListPeers(id="sync"))  # type: ignore[attr-defined]
    assert isinstance(reply, wire.PeersList)


def test_serve_reports_a_port_in_use(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "claudemesh.broker",
                "serve",
                "--port",
                str(port),
                "--db",
                str(tmp_path / "b.db"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert res.returncode == 3
    assert "cannot listen" in res.stderr


def test_admin_errors_are_clear(tmp_path: Path) -> None:
    db = tmp_path / "admin.db"
    with pytest.raises(BrokerError, match="no mesh"):
        admin(db, "member", "list", "nope")
    mesh = create_mesh(db, "m")
    key = new_key()
    member_id = add_member(db, mesh, key.public_hex, "k")
    # revoke by public key as well as by id
    assert revoke_member(db, mesh, key.public_hex) == member_id
    with pytest.raises(BrokerError, match="no member"):
        revoke_member(db, mesh, "missing")
    assert oct(db.stat().st_mode & 0o777) == oct(0o600)


@pytest.mark.slow
async def test_every_acked_send_survives_kill_9_mid_burst(tmp_path: Path) -> None:
    import trio

    from claudemesh.shared.protocol import crypto

    with run_broker(tmp_path) as broker:
        mesh = create_mesh(broker.db_path, "burst")
        alice = enroll(broker.db_path, mesh, "alice")
        bob = enroll(broker.db_path, mesh, "bob")
        acked: list[str] = []
        async with open_peer(broker.url, alice) as a:
            for i in range(300):
                nonce, ct = crypto.box_encrypt(
                    b"x", sender=alice.key, recipient_pubkey_hex=bob.pubkey
                )
                await a.send(
                    wire.Send(
                        id=str(i),
                        target_spec=bob.pubkey,
                        priority="now",
                        nonce=nonce,
                        ciphertext=ct,
                        client_message_id=f"b{i}",
                    )
                )
            with trio.fail_after(10):
                while len(acked) < 60:
                    ack = await a.expect(wire.Ack)
                    assert ack.queued
                    acked.append(ack.message_id)
            broker.kill()  # mid-burst: some sends are acked, some in flight, some unread
            with contextlib.suppress(Exception):
                while True:  # acks that were already on the wire count as acked too
                    ack = await a.expect(wire.Ack, within=1)
                    acked.append(ack.message_id)
        broker.start()
        got: set[str] = set()
        async with open_peer(broker.url, bob) as bb:
            with trio.move_on_after(10):
                while not set(acked) <= got:
                    got.add((await bb.message()).message_id)
        missing = set(acked) - got
        assert not missing, f"{len(missing)} acked sends lost"
