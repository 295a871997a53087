"""One workspace's durable state in SQLite: outbox, receipts, inbox, quarantine, events.

Rules:

- One ``sqlite3`` connection per workspace (``check_same_thread=False``),
  every job run in a worker thread via :func:`trio.to_thread.run_sync`
  behind a ``CapacityLimiter(1)``, so jobs never overlap.  Jobs return plain
  values, never cursors.
- WAL with ``synchronous=FULL``: a committed accept survives ``kill -9`` and
  power loss.  Accepts use ``BEGIN IMMEDIATE`` and stay tiny.
- A client message id, once in ``outbox``, is never deleted or reused.
- ``events`` is the subscription log; its ``cursor`` is what subscribers
  resume from, so it is appended in the same transaction as the change it
  reports (an inbox row and its event commit together).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar

import trio

T = TypeVar("T")

OUTBOX_STATES: Final = ("pending", "inflight", "done", "dead", "aborted")
#: Recipient states in order of progress; failed/expired are terminal.
RECIPIENT_ORDER: Final = {"accepted": 0, "sent": 1, "delivered": 2, "surfaced": 3}

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS outbox (
  client_message_id TEXT PRIMARY KEY,
  fingerprint TEXT NOT NULL,
  state TEXT NOT NULL,
  target TEXT NOT NULL,
  target_spec TEXT NOT NULL,
  kind TEXT NOT NULL,
  topic TEXT,
  body TEXT NOT NULL,
  priority TEXT NOT NULL,
  reply_to TEXT,
  meta TEXT,
  session_id TEXT,
  created_at INTEGER NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  next_attempt_at INTEGER NOT NULL DEFAULT 0,
  last_error TEXT,
  broker_message_id TEXT,
  requeued_as TEXT,
  recipients TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt_at);
CREATE TABLE IF NOT EXISTS receipts (
  client_message_id TEXT NOT NULL,
  recipient_pubkey TEXT NOT NULL,
  state TEXT NOT NULL,
  at INTEGER NOT NULL,
  reason TEXT,
  PRIMARY KEY (client_message_id, recipient_pubkey)
);
CREATE TABLE IF NOT EXISTS inbox (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  broker_message_id TEXT NOT NULL UNIQUE,
  client_message_id TEXT,
  from_pubkey TEXT NOT NULL,
  from_member_pubkey TEXT NOT NULL,
  from_name TEXT NOT NULL,
  to_key TEXT NOT NULL,
  target_spec TEXT,
  priority TEXT NOT NULL,
  body TEXT NOT NULL,
  topic TEXT,
  reply_to TEXT,
  created_at INTEGER NOT NULL,
  received_at INTEGER NOT NULL,
  seen INTEGER NOT NULL DEFAULT 0,
  surfaced_sent INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS quarantine (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  broker_message_id TEXT UNIQUE,
  reason TEXT NOT NULL,
  frame TEXT NOT NULL,
  received_at INTEGER NOT NULL
);
-- `failed` receipts owed to the broker for quarantined pushes (deleted once sent).
CREATE TABLE IF NOT EXISTS failed_out (
  broker_message_id TEXT PRIMARY KEY,
  reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
  cursor INTEGER PRIMARY KEY AUTOINCREMENT,
  kind TEXT NOT NULL,
  data TEXT NOT NULL,
  session_pubkey TEXT,
  from_pubkey TEXT,
  at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (
  k TEXT PRIMARY KEY,
  v TEXT NOT NULL
);
"""


def now_ms() -> int:
    return int(time.time() * 1000)


class Store:
    """Async facade over one SQLite file; see the module docstring for the rules."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # SQLite gives -wal and -shm the database file's mode, so the file is
        # created 0600 before SQLite opens it (whatever the process umask).
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            with contextlib.suppress(FileNotFoundError):
                p.chmod(0o600)
        self._db = sqlite3.connect(
            str(path), check_same_thread=False, isolation_level=None, timeout=10.0
        )
        self._db.row_factory = sqlite3.Row
        self._limiter = trio.CapacityLimiter(1)
        self._accept_queue: list[tuple[dict[str, Any], _Slot]] = []
        self._accepting = False
        db = self._db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=10000")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(SCHEMA)

    def close(self) -> None:
        """Close at once: only when no job can be running (no task uses the store)."""
        self._db.close()

    async def aclose(self) -> None:
        """Close in the store's thread slot, after any running job.

        Closing a sqlite3 connection while another thread runs a statement on
        it crashes the interpreter (a subscription's read racing a leave did).
        """
        await trio.to_thread.run_sync(self._db.close, limiter=self._limiter)

    async def run(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        """Run ``fn(connection)`` in the store's thread slot.

        ``durable=False`` commits without waiting for fsync (``synchronous=NORMAL``):
        only for changes whose loss on power failure is harmless because they
        are redone (claiming rows, recording broker acks that a resend gets again).
        """
        if durable:
            return await trio.to_thread.run_sync(fn, self._db, limiter=self._limiter)

        def relaxed(db: sqlite3.Connection) -> T:
            db.execute("PRAGMA synchronous=NORMAL")
            try:
                return fn(db)
            finally:
                db.execute("PRAGMA synchronous=FULL")

        return await trio.to_thread.run_sync(relaxed, self._db, limiter=self._limiter)

    # ------------------------------------------------------------ outbox

    async def accept(self, row: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Commit a new outbox row, or report the stored one.

        Returns ``("new", row)``, ``("duplicate", stored)`` (same fingerprint)
        or ``("conflict", stored)``.  Returns only once the row is on disk.

        Group commit: accepts that arrive while a commit is running are
        written together in the next transaction (one fsync for all), so
        concurrent clients do not queue one fsync each.  The committing task
        is shielded: a cancelled caller never strands the others.
        """
        slot = _Slot()
        self._accept_queue.append((row, slot))
        if not self._accepting:
            self._accepting = True
            try:
                with trio.CancelScope(shield=True):
                    while self._accept_queue:
                        batch, self._accept_queue = self._accept_queue, []
                        try:
                            results = await self.run(
                                partial(_accept_job, rows=[r for r, _ in batch])
                            )
                        except Exception as exc:
                            for _, sl in batch:
                                sl.error = exc
                                sl.done.set()
                            continue
                        for (_, sl), res in zip(batch, results, strict=True):
                            sl.result = res
                            sl.done.set()
            finally:
                self._accepting = False
        await slot.done.wait()
        if slot.error is not None:
            raise slot.error
        assert slot.result is not None
        return slot.result

    async def reset_inflight(self) -> int:
        """At start-up (and on link loss) every ``inflight`` row returns to ``pending``."""

        def job(db: sqlite3.Connection) -> int:
            return db.execute(
                "UPDATE outbox SET state='pending', next_attempt_at=0 WHERE state='inflight'"
            ).rowcount

        return await self.run(job)

    async def claim(
        self, now: int, limit: int = 64, lease_ms: int = 30_000
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Claim due ``pending`` rows (mark them ``inflight``); also say when the next is due.

        An ``inflight`` row holds a lease of ``lease_ms`` in ``next_attempt_at``;
        a row whose ack never came is pending again once its lease is over.
        """

        def job(db: sqlite3.Connection) -> tuple[list[dict[str, Any]], int | None]:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "UPDATE outbox SET state='pending', last_error='no ack from the broker' "
                    "WHERE state='inflight' AND next_attempt_at<=?",
                    (now,),
                )
                rows = [
                    dict(r)
                    for r in db.execute(
                        "SELECT * FROM outbox WHERE state='pending' AND next_attempt_at<=? "
                        "ORDER BY created_at, rowid LIMIT ?",
                        (now, limit),
                    )
                ]
                db.executemany(
                    "UPDATE outbox SET state='inflight', attempts=attempts+1, next_attempt_at=? "
                    "WHERE client_message_id=?",
                    [(now + lease_ms, r["client_message_id"]) for r in rows],
                )
                v = db.execute(
                    "SELECT MIN(next_attempt_at) FROM outbox WHERE state IN ('pending','inflight')"
                ).fetchone()[0]
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return rows, (int(v) if v is not None else None)

        return await self.run(job, durable=False)

    async def take_due(
        self, now: int, limit: int = 64, lease_ms: int = 30_000
    ) -> list[dict[str, Any]]:
        return (await self.claim(now, limit, lease_ms))[0]

    async def next_due_at(self) -> int | None:
        def job(db: sqlite3.Connection) -> int | None:
            r = db.execute(
                "SELECT MIN(next_attempt_at) FROM outbox WHERE state IN ('pending','inflight')"
            )
            v = r.fetchone()[0]
            return int(v) if v is not None else None

        return await self.run(job)

    async def mark_sent(self, acks: list[tuple[str, str]], at: int) -> int:
        """The broker acked ``(client id, broker id)`` pairs: rows ``done``, recipients ``sent``.

        Not fsynced: if lost, the row is sent again and the broker's dedupe
        answers with the same broker id.
        """

        def job(db: sqlite3.Connection) -> int:
            db.execute("BEGIN IMMEDIATE")
            done = 0
            try:
                for cmid, bmid in acks:
                    n = db.execute(
                        "UPDATE outbox SET state='done', broker_message_id=?, last_error=NULL "
                        "WHERE client_message_id=? AND state IN ('inflight','pending')",
                        (bmid, cmid),
                    ).rowcount
                    if not n:
                        continue
                    done += 1
                    changed = [
                        r[0]
                        for r in db.execute(
                            "SELECT recipient_pubkey FROM receipts "
                            "WHERE client_message_id=? AND state='accepted'",
                            (cmid,),
                        )
                    ]
                    db.execute(
                        "UPDATE receipts SET state='sent', at=? "
                        "WHERE client_message_id=? AND state='accepted'",
                        (at, cmid),
                    )
                    for pk in changed:
                        _add_event(
                            db,
                            "receipt",
                            {
                                "client_message_id": cmid,
                                "recipient_pubkey": pk,
                                "state": "sent",
                                "at": at,
                            },
                            at=at,
                        )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return done

        return await self.run(job, durable=False)

    async def mark_retry(self, cmid: str, error: str, next_at: int) -> None:
        def job(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE outbox SET state='pending', last_error=?, next_attempt_at=? "
                "WHERE client_message_id=? AND state='inflight'",
                (error, next_at, cmid),
            )

        await self.run(job, durable=False)

    async def mark_dead(self, cmid: str, reason: str, at: int) -> None:
        def job(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "UPDATE outbox SET state='dead', last_error=? "
                    "WHERE client_message_id=? AND state IN ('inflight','pending')",
                    (reason, cmid),
                )
                rows = list(
                    db.execute(
                        "SELECT recipient_pubkey FROM receipts WHERE client_message_id=? "
                        "AND state IN ('accepted','sent')",
                        (cmid,),
                    )
                )
                db.execute(
                    "UPDATE receipts SET state='failed', at=?, reason=? "
                    "WHERE client_message_id=? AND state IN ('accepted','sent')",
                    (at, reason, cmid),
                )
                for r in rows:
                    _add_event(
                        db,
                        "receipt",
                        {
                            "client_message_id": cmid,
                            "recipient_pubkey": r["recipient_pubkey"],
                            "state": "failed",
                            "at": at,
                            "reason": reason,
                        },
                        at=at,
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        await self.run(job)

    async def get_outbox(self, cmid: str) -> dict[str, Any] | None:
        def job(db: sqlite3.Connection) -> dict[str, Any] | None:
            r = db.execute("SELECT * FROM outbox WHERE client_message_id=?", (cmid,)).fetchone()
            return dict(r) if r is not None else None

        return await self.run(job)

    async def get_with_receipts(
        self, cmid: str
    ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """The outbox row and its receipts, read in one transaction (a consistent view)."""

        def job(db: sqlite3.Connection) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
            db.execute("BEGIN")
            try:
                r = db.execute("SELECT * FROM outbox WHERE client_message_id=?", (cmid,))
                row = r.fetchone()
                rec = [
                    dict(x)
                    for x in db.execute(
                        "SELECT recipient_pubkey, state, at, reason FROM receipts "
                        "WHERE client_message_id=? ORDER BY recipient_pubkey",
                        (cmid,),
                    )
                ]
            finally:
                db.execute("COMMIT")
            return (dict(row) if row is not None else None), rec

        return await self.run(job)

    async def get_receipts(self, cmid: str) -> list[dict[str, Any]]:
        def job(db: sqlite3.Connection) -> list[dict[str, Any]]:
            return [
                dict(r)
                for r in db.execute(
                    "SELECT recipient_pubkey, state, at, reason FROM receipts "
                    "WHERE client_message_id=? ORDER BY recipient_pubkey",
                    (cmid,),
                )
            ]

        return await self.run(job)

    async def list_outbox(self, state: str | None, limit: int = 500) -> list[dict[str, Any]]:
        def job(db: sqlite3.Connection) -> list[dict[str, Any]]:
            q = "SELECT * FROM outbox"
            args: tuple[Any, ...] = ()
            if state:
                q += " WHERE state=?"
                args = (state,)
            q += " ORDER BY created_at DESC, rowid DESC LIMIT ?"
            return [dict(r) for r in db.execute(q, (*args, limit))]

        return await self.run(job)

    async def requeue(self, old: str, new_row: dict[str, Any]) -> str:
        """Abort ``old`` (kept for audit) and accept its payload as ``new_row``.

        Returns ``"ok"``, ``"not_found"`` or the old row's state when it may
        not be requeued (``done``/``aborted``).
        """

        def job(db: sqlite3.Connection) -> str:
            db.execute("BEGIN IMMEDIATE")
            try:
                r = db.execute("SELECT state FROM outbox WHERE client_message_id=?", (old,))
                row = r.fetchone()
                if row is None:
                    db.execute("COMMIT")
                    return "not_found"
                if row["state"] in ("done", "aborted"):
                    db.execute("COMMIT")
                    return str(row["state"])
                db.execute(
                    "UPDATE outbox SET state='aborted', requeued_as=? WHERE client_message_id=?",
                    (new_row["client_message_id"], old),
                )
                cols = ",".join(new_row)
                marks = ",".join("?" for _ in new_row)
                db.execute(f"INSERT INTO outbox ({cols}) VALUES ({marks})", tuple(new_row.values()))
                db.executemany(
                    "INSERT OR IGNORE INTO receipts VALUES (?,?,?,?,NULL)",
                    [
                        (
                            new_row["client_message_id"],
                            r["pubkey"],
                            "accepted",
                            new_row["created_at"],
                        )
                        for r in json.loads(new_row["recipients"])
                    ],
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return "ok"

        return await self.run(job)

    async def record_receipts(self, items: list[tuple[str, str, str, int, str | None]]) -> int:
        """Record broker receipts ``(cmid, recipient, state, at, reason)`` in one transaction.

        Only forward moves are kept; returns how many advanced a recipient.
        """

        def job(db: sqlite3.Connection) -> int:
            db.execute("BEGIN IMMEDIATE")
            moved = 0
            try:
                for cmid, recipient, state, at, reason in items:
                    r = db.execute(
                        "SELECT state FROM receipts "
                        "WHERE client_message_id=? AND recipient_pubkey=?",
                        (cmid, recipient),
                    ).fetchone()
                    if r is not None and not _advances(r["state"], state):
                        continue
                    db.execute(
                        "INSERT INTO receipts VALUES (?,?,?,?,?) "
                        "ON CONFLICT(client_message_id, recipient_pubkey) DO UPDATE SET "
                        "state=excluded.state, at=excluded.at, reason=excluded.reason",
                        (cmid, recipient, state, at, reason),
                    )
                    data: dict[str, Any] = {
                        "client_message_id": cmid,
                        "recipient_pubkey": recipient,
                        "state": state,
                        "at": at,
                    }
                    if reason:
                        data["reason"] = reason
                    _add_event(db, "receipt", data, at=at)
                    moved += 1
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return moved

        return await self.run(job)

    async def record_receipt(
        self, cmid: str, recipient: str, state: str, at: int, reason: str | None
    ) -> bool:
        """Record one receipt; True when it advanced the recipient."""
        return await self.record_receipts([(cmid, recipient, state, at, reason)]) == 1

    # ------------------------------------------------------------- inbox

    async def inbox_insert(
        self, msg: dict[str, Any], session_pubkey: str | None
    ) -> tuple[int, int] | None:
        """Commit an inbox row and its ``message`` event; ``None`` if already stored."""

        def job(db: sqlite3.Connection) -> tuple[int, int] | None:
            db.execute("BEGIN IMMEDIATE")
            try:
                cols = ",".join(msg)
                marks = ",".join("?" for _ in msg)
                cur = db.execute(
                    f"INSERT OR IGNORE INTO inbox ({cols}) VALUES ({marks})", tuple(msg.values())
                )
                if cur.rowcount == 0:
                    db.execute("COMMIT")
                    return None
                inbox_id = int(cur.lastrowid or 0)
                cursor = _add_event(
                    db,
                    "message",
                    {"inbox_id": inbox_id},
                    session_pubkey=session_pubkey,
                    from_pubkey=msg["from_pubkey"],
                    at=msg["received_at"],
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return inbox_id, cursor

        return await self.run(job)

    async def quarantine(
        self, broker_message_id: str, reason: str, frame: str, receipt_reason: str | None = None
    ) -> bool:
        """Keep an unreadable push; with ``receipt_reason``, owe the broker a ``failed`` receipt.

        Both rows are written in one transaction, so the receipt is sent (see
        :meth:`take_failed_out`) even if the link drops right after the ack.
        """

        def job(db: sqlite3.Connection) -> bool:
            db.execute("BEGIN IMMEDIATE")
            try:
                cur = db.execute(
                    "INSERT OR IGNORE INTO quarantine "
                    "(broker_message_id, reason, frame, received_at) VALUES (?,?,?,?)",
                    (broker_message_id, reason, frame, now_ms()),
                )
                new = cur.rowcount > 0
                if new and receipt_reason:
                    db.execute(
                        "INSERT OR IGNORE INTO failed_out VALUES (?,?)",
                        (broker_message_id, receipt_reason),
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return new

        return await self.run(job)

    async def take_failed_out(self) -> list[tuple[str, str]]:
        """``failed`` receipts not yet sent: ``(broker message id, reason)``."""

        def job(db: sqlite3.Connection) -> list[tuple[str, str]]:
            return [
                (str(r[0]), str(r[1]))
                for r in db.execute("SELECT broker_message_id, reason FROM failed_out")
            ]

        return await self.run(job)

    async def mark_failed_sent(self, broker_message_ids: list[str]) -> None:
        def job(db: sqlite3.Connection) -> None:
            db.executemany(
                "DELETE FROM failed_out WHERE broker_message_id=?",
                [(i,) for i in broker_message_ids],
            )

        await self.run(job)

    async def list_quarantine(self) -> list[dict[str, Any]]:
        def job(db: sqlite3.Connection) -> list[dict[str, Any]]:
            return [
                dict(r)
                for r in db.execute(
                    "SELECT id, broker_message_id, reason, received_at FROM quarantine"
                )
            ]

        return await self.run(job)

    async def inbox_list(
        self,
        *,
        unread: bool,
        limit: int,
        before: int | None,
        after: int | None,
        mark_seen: bool,
    ) -> list[dict[str, Any]]:
        """Newest first (oldest first with ``after``); marking seen is in the same job."""

        def job(db: sqlite3.Connection) -> list[dict[str, Any]]:
            where = []
            args: list[Any] = []
            if unread:
                where.append("seen=0")
            if before is not None:
                where.append("id<?")
                args.append(before)
            if after is not None:
                where.append("id>?")
                args.append(after)
            q = "SELECT * FROM inbox"
            if where:
                q += " WHERE " + " AND ".join(where)
            q += " ORDER BY id " + ("ASC" if after is not None else "DESC") + " LIMIT ?"
            rows = [dict(r) for r in db.execute(q, (*args, limit))]
            if mark_seen and rows:
                db.executemany("UPDATE inbox SET seen=1 WHERE id=?", [(r["id"],) for r in rows])
            return rows

        return await self.run(job)

    async def take_unsurfaced(self, ids: list[int] | None = None) -> list[dict[str, Any]]:
        """Rows seen but whose ``surfaced`` receipt is not yet sent (``ids``: mark these seen)."""

        def job(db: sqlite3.Connection) -> list[dict[str, Any]]:
            if ids:
                db.executemany("UPDATE inbox SET seen=1 WHERE id=?", [(i,) for i in ids])
            return [
                dict(r)
                for r in db.execute(
                    "SELECT id, broker_message_id FROM inbox WHERE seen=1 AND surfaced_sent=0"
                )
            ]

        return await self.run(job)

    async def mark_surfaced_sent(self, ids: list[int]) -> None:
        def job(db: sqlite3.Connection) -> None:
            db.executemany("UPDATE inbox SET surfaced_sent=1 WHERE id=?", [(i,) for i in ids])

        await self.run(job)

    # ------------------------------------------------------------ events

    async def add_event(
        self, kind: str, data: dict[str, Any], *, from_pubkey: str | None = None
    ) -> int:
        def job(db: sqlite3.Connection) -> int:
            return _add_event(db, kind, data, from_pubkey=from_pubkey, at=now_ms())

        return await self.run(job)

    async def events_after(self, cursor: int, limit: int = 256) -> list[dict[str, Any]]:
        def job(db: sqlite3.Connection) -> list[dict[str, Any]]:
            return [
                dict(r)
                for r in db.execute(
                    "SELECT * FROM events WHERE cursor>? ORDER BY cursor LIMIT ?", (cursor, limit)
                )
            ]

        return await self.run(job)

    async def events_with_messages(
        self, cursor: int, limit: int = 256
    ) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
        """Events after ``cursor``, each ``message`` event with its inbox row (one job)."""

        def job(db: sqlite3.Connection) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
            out: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
            for r in db.execute(
                "SELECT * FROM events WHERE cursor>? ORDER BY cursor LIMIT ?", (cursor, limit)
            ).fetchall():
                ev = dict(r)
                row = None
                if ev["kind"] == "message":
                    inbox_id = json.loads(ev["data"])["inbox_id"]
                    m = db.execute("SELECT * FROM inbox WHERE id=?", (inbox_id,)).fetchone()
                    row = dict(m) if m is not None else None
                out.append((ev, row))
            return out

        return await self.run(job)

    async def head(self) -> int:
        def job(db: sqlite3.Connection) -> int:
            v = db.execute("SELECT MAX(cursor) FROM events").fetchone()[0]
            return int(v or 0)

        return await self.run(job)

    # -------------------------------------------------------------- misc

    async def counts(self) -> dict[str, int]:
        def job(db: sqlite3.Connection) -> dict[str, int]:
            out = {"pending": 0, "inflight": 0, "dead": 0}
            for r in db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state"):
                if r[0] in out:
                    out[r[0]] = int(r[1])
            out["inbox_unread"] = int(
                db.execute("SELECT COUNT(*) FROM inbox WHERE seen=0").fetchone()[0]
            )
            out["quarantined"] = int(db.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0])
            return out

        return await self.run(job)

    async def kv_get(self, key: str) -> Any:
        def job(db: sqlite3.Connection) -> Any:
            r = db.execute("SELECT v FROM kv WHERE k=?", (key,)).fetchone()
            return json.loads(r[0]) if r is not None else None

        return await self.run(job)

    async def kv_set(self, key: str, value: Any) -> None:
        text = json.dumps(value)

        def job(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO kv VALUES (?,?) ON CONFLICT(k) DO UPDATE SET v=excluded.v", (key, text)
            )

        await self.run(job)


class _Slot:
    """One caller's place in a group commit."""

    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: tuple[str, dict[str, Any]] | None = None
        self.error: Exception | None = None


def _accept_job(
    db: sqlite3.Connection, rows: list[dict[str, Any]]
) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    db.execute("BEGIN IMMEDIATE")
    try:
        for row in rows:
            old = db.execute(
                "SELECT * FROM outbox WHERE client_message_id=?", (row["client_message_id"],)
            ).fetchone()
            if old is not None:
                stored = dict(old)
                same = stored["fingerprint"] == row["fingerprint"]
                out.append(("duplicate" if same else "conflict", stored))
                continue
            cols = ",".join(row)
            marks = ",".join("?" for _ in row)
            db.execute(f"INSERT INTO outbox ({cols}) VALUES ({marks})", tuple(row.values()))
            db.executemany(
                "INSERT OR IGNORE INTO receipts VALUES (?,?,?,?,NULL)",
                [
                    (row["client_message_id"], r["pubkey"], "accepted", row["created_at"])
                    for r in json.loads(row["recipients"])
                ],
            )
            out.append(("new", row))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return out


def _advances(old: str, new: str) -> bool:
    if old in ("failed", "expired"):
        return False
    if new == "failed":
        # The recipient's daemon acks an unreadable push (so it is not pushed
        # forever) before reporting it `failed`: that `delivered` gives way.
        return old != "surfaced"
    if new == "expired":
        return old not in ("delivered", "surfaced")
    return RECIPIENT_ORDER.get(new, -1) > RECIPIENT_ORDER.get(old, -1)


def _add_event(
    db: sqlite3.Connection,
    kind: str,
    data: dict[str, Any],
    *,
    session_pubkey: str | None = None,
    from_pubkey: str | None = None,
    at: int,
) -> int:
    cur = db.execute(
        "INSERT INTO events (kind, data, session_pubkey, from_pubkey, at) VALUES (?,?,?,?,?)",
        (kind, json.dumps(data), session_pubkey, from_pubkey, at),
    )
    return int(cur.lastrowid or 0)
