"""The SQLite store on the real clock: accept/idempotency, state moves, inbox dedupe, events."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from claudemesh.daemon.store import Store, now_ms


def row(cmid: str, fp: str = "f1", **kw: Any) -> dict[str, Any]:
    r = {
        "client_message_id": cmid,
        "fingerprint": fp,
        "state": "pending",
        "target": "bob",
        "target_spec": "ab" * 32,
        "kind": "direct",
        "topic": None,
        "body": "hi",
        "priority": "next",
        "reply_to": None,
        "meta": None,
        "session_id": None,
        "created_at": now_ms(),
        "recipients": json.dumps([{"pubkey": "ab" * 32, "display_name": "bob"}]),
    }
    r.update(kw)
    return r


async def test_accept_duplicate_and_conflict(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.db")
    assert (await s.accept(row("m1")))[0] == "new"
    out, stored = await s.accept(row("m1"))
    assert out == "duplicate"
    assert stored["state"] == "pending"
    out, stored = await s.accept(row("m1", fp="other"))
    assert out == "conflict"
    assert stored["fingerprint"] == "f1"
    assert len(await s.list_outbox(None)) == 1
    s.close()


async def test_accepted_row_survives_reopen_and_inflight_resets(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.db")
    await s.accept(row("m1"))
    taken = await s.take_due(now_ms())
    assert [r["client_message_id"] for r in taken] == ["m1"]
    assert (await s.get_outbox("m1"))["state"] == "inflight"  # type: ignore[index]
    s.close()
    s = Store(tmp_path / "s.db")
    assert await s.reset_inflight() == 1
    r = await s.get_outbox("m1")
    assert r is not None
    assert r["state"] == "pending"
    assert r["attempts"] == 1
    s.close()


async def test_sent_then_receipts_advance_only_forward(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.db")
    await s.accept(row("m1"))
    await s.take_due(now_ms())
    assert await s.mark_sent([("m1", "b1")], now_ms()) == 1
    rec = await s.get_receipts("m1")
    assert [r["state"] for r in rec] == ["sent"]
    assert await s.record_receipt("m1", "ab" * 32, "surfaced", now_ms(), None)
    assert not await s.record_receipt("m1", "ab" * 32, "delivered", now_ms(), None)
    assert [r["state"] for r in await s.get_receipts("m1")] == ["surfaced"]
    kinds = [e["kind"] for e in await s.events_after(0)]
    assert kinds == ["receipt", "receipt"]
    s.close()


async def test_retry_and_dead(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.db")
    await s.accept(row("m1"))
    await s.take_due(now_ms())
    later = now_ms() + 60_000
    await s.mark_retry("m1", "rate_limited", later)
    assert await s.take_due(now_ms()) == []
    assert await s.next_due_at() == later
    await s.take_due(later)
    await s.mark_dead("m1", "unknown_target: no such key", now_ms())
    r = await s.get_outbox("m1")
    assert r is not None
    assert r["state"] == "dead"
    assert "unknown_target" in r["last_error"]
    assert [x["state"] for x in await s.get_receipts("m1")] == ["failed"]
    s.close()


async def test_requeue_keeps_old_row_for_audit(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.db")
    await s.accept(row("m1"))
    assert await s.requeue("m1", row("m2")) == "ok"
    old = await s.get_outbox("m1")
    assert old is not None
    assert old["state"] == "aborted"
    assert old["requeued_as"] == "m2"
    assert (await s.get_outbox("m2")) is not None
    assert await s.requeue("m1", row("m3")) == "aborted"
    assert await s.requeue("nope", row("m4")) == "not_found"
    # The old id stays taken forever.
    assert (await s.accept(row("m1", fp="x")))[0] == "conflict"
    s.close()


def inbox_row(bid: str) -> dict[str, Any]:
    return {
        "broker_message_id": bid,
        "client_message_id": "c",
        "from_pubkey": "cd" * 32,
        "from_member_pubkey": "cd" * 32,
        "from_name": "carol",
        "to_key": "ab" * 32,
        "target_spec": "ab" * 32,
        "priority": "next",
        "body": "hello",
        "topic": None,
        "reply_to": None,
        "created_at": now_ms(),
        "received_at": now_ms(),
    }


async def test_inbox_unique_on_broker_id_and_event_in_same_tx(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.db")
    first = await s.inbox_insert(inbox_row("b1"), None)
    assert first is not None
    assert await s.inbox_insert(inbox_row("b1"), None) is None
    events = await s.events_after(0)
    assert len(events) == 1
    assert json.loads(events[0]["data"])["inbox_id"] == first[0]
    assert events[0]["cursor"] == first[1]
    rows = await s.inbox_list(unread=True, limit=10, before=None, after=None, mark_seen=False)
    assert len(rows) == 1
    unsurf = await s.take_unsurfaced([rows[0]["id"]])
    assert [r["broker_message_id"] for r in unsurf] == ["b1"]
    await s.mark_surfaced_sent([rows[0]["id"]])
    assert await s.take_unsurfaced() == []
    assert (await s.counts())["inbox_unread"] == 0
    s.close()


async def test_files_are_private(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.db")
    assert (tmp_path / "s.db").stat().st_mode & 0o777 == 0o600
    s.close()


async def test_inflight_without_ack_returns_after_its_lease(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.db")
    await s.accept(row("m1"))
    t0 = now_ms()
    assert len(await s.take_due(t0, lease_ms=1000)) == 1
    assert await s.take_due(t0 + 999, lease_ms=1000) == []
    assert await s.next_due_at() == t0 + 1000
    again = await s.take_due(t0 + 1000, lease_ms=1000)
    assert [r["attempts"] for r in again] == [1]  # counted when taken: now 2 in the store
    r = await s.get_outbox("m1")
    assert r is not None
    assert r["attempts"] == 2
    s.close()


async def test_concurrent_accepts_group_commit_with_per_caller_answers(tmp_path: Path) -> None:
    import trio

    s = Store(tmp_path / "s.db")
    results: dict[str, str] = {}

    async def one(cmid: str, fp: str) -> None:
        results[f"{cmid}/{fp}"] = (await s.accept(row(cmid, fp=fp)))[0]

    async with trio.open_nursery() as n:
        for i in range(20):
            n.start_soon(one, f"m{i}", "a")
        n.start_soon(one, "m0", "b")  # same id, other request, in the same burst
    assert sum(v == "new" for v in results.values()) == 20
    assert results["m0/b"] in ("conflict", "new")
    if results["m0/b"] == "new":
        assert results["m0/a"] == "conflict"
    assert len(await s.list_outbox(None)) == 20
    s.close()


async def test_aclose_waits_for_a_running_job_and_later_jobs_fail_cleanly(
    tmp_path: Path,
) -> None:
    s = Store(tmp_path / "s.db")
    release = threading.Event()
    order: list[str] = []

    def slow(db: sqlite3.Connection) -> int:
        release.wait(10)
        n = int(db.execute("SELECT COUNT(*) FROM events").fetchone()[0])
        order.append("job")
        return n

    async with trio.open_nursery() as n:
        n.start_soon(s.run, slow)
        await trio.testing.wait_all_tasks_blocked()

        async def close() -> None:
            await s.aclose()
            order.append("closed")

        n.start_soon(close)
        await trio.testing.wait_all_tasks_blocked()
        assert order == []  # the close waits for the job
        release.set()
    assert order == ["job", "closed"]
    with pytest.raises(sqlite3.ProgrammingError):
        await s.head()


async def test_recipient_failed_outranks_delivered_in_either_order(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.db")
    for cmid, order in (("m1", ("delivered", "failed")), ("m2", ("failed", "delivered"))):
        await s.accept(row(cmid))
        for i, state in enumerate(order):
            reason = "undecryptable" if state == "failed" else None
            await s.record_receipt(cmid, "ab" * 32, state, now_ms() + i, reason)
        got = [(x["state"], x["reason"]) for x in await s.get_receipts(cmid)]
        assert got == [("failed", "undecryptable")], cmid
    # `surfaced` happened, so a later `failed` cannot undo it.
    await s.accept(row("m3"))
    await s.record_receipt("m3", "ab" * 32, "surfaced", now_ms(), None)
    assert not await s.record_receipt("m3", "ab" * 32, "failed", now_ms(), "x")
    s.close()


async def test_quarantine_owes_one_failed_receipt_until_sent(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.db")
    assert await s.quarantine("b1", "message failed authentication", "{}", "undecryptable")
    assert not await s.quarantine("b1", "message failed authentication", "{}", "undecryptable")
    s.close()
    s = Store(tmp_path / "s.db")  # survives a restart
    assert await s.take_failed_out() == [("b1", "undecryptable")]
    await s.mark_failed_sent(["b1"])
    assert await s.take_failed_out() == []
    assert len(await s.list_quarantine()) == 1
    s.close()
