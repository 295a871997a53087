"""The broker's durable state: meshes, members, queue rows, receipts, invites.

Rules of this module:

- :class:`Store` is the interface the server uses; :class:`SqliteStore` is the
  embedded implementation.  A PostgreSQL store can satisfy the same Protocol.
- :class:`SqliteDB` is the synchronous core (stdlib ``sqlite3``, one
  connection).  The admin CLI uses it directly; the server goes through
  :class:`SqliteStore`, which runs each job in a worker thread behind a
  ``trio.CapacityLimiter(1)``.  Jobs return plain values, never cursors.
- Accept paths (``accept_sends``, ``claim_invite``, ...) run in one
  ``BEGIN IMMEDIATE`` transaction, committed (``synchronous=FULL``) before
  the server answers, so an acked row survives ``kill -9``.
- The schema is versioned by ``PRAGMA user_version`` and migrated forward at
  open; a database newer than this code is refused.
- Bodies are opaque strings: nothing here decodes a ciphertext.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TypeVar

import trio

from claudemesh.shared.protocol import errors, ids

T = TypeVar("T")

DAY_MS: Final = 86_400_000
#: A device that has not said hello for this long no longer gets its own row.
DEVICE_ACTIVE_MS: Final = 30 * DAY_MS

MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE meshes (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE members (
        id TEXT PRIMARY KEY,
        mesh_id TEXT NOT NULL REFERENCES meshes(id),
        pubkey TEXT NOT NULL,
        display_name TEXT NOT NULL,
        role TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        revoked_at INTEGER,
        last_seen_at INTEGER,
        UNIQUE (mesh_id, pubkey)
    );
    CREATE TABLE member_groups (
        member_id TEXT NOT NULL REFERENCES members(id),
        name TEXT NOT NULL,
        role TEXT,
        PRIMARY KEY (member_id, name)
    );
    CREATE TABLE devices (
        member_id TEXT NOT NULL REFERENCES members(id),
        device_id TEXT NOT NULL,
        last_seen_at INTEGER NOT NULL,
        PRIMARY KEY (member_id, device_id)
    );
    CREATE TABLE sessions (
        mesh_id TEXT NOT NULL,
        session_pubkey TEXT NOT NULL,
        member_id TEXT NOT NULL REFERENCES members(id),
        device_id TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        last_seen_at INTEGER NOT NULL,
        PRIMARY KEY (mesh_id, session_pubkey)
    );
    CREATE TABLE messages (
        id TEXT PRIMARY KEY,
        mesh_id TEXT NOT NULL,
        sender_member_id TEXT NOT NULL,
        sender_device_id TEXT NOT NULL,
        sender_pubkey TEXT NOT NULL,
        client_message_id TEXT,
        request_fingerprint TEXT,
        target_spec TEXT NOT NULL,
        priority TEXT NOT NULL,
        nonce TEXT NOT NULL,
        ciphertext TEXT NOT NULL,
        topic TEXT,
        epoch INTEGER,
        reply_to_id TEXT,
        created_at INTEGER NOT NULL,
        keep_until INTEGER NOT NULL,
        recipients INTEGER NOT NULL,
        UNIQUE (mesh_id, sender_member_id, client_message_id)
    );
    CREATE TABLE queue (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id TEXT NOT NULL REFERENCES messages(id),
        member_id TEXT NOT NULL,
        device_id TEXT,
        session_pubkey TEXT,
        target_pubkey TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        expires_at INTEGER NOT NULL,
        done_at INTEGER,
        surfaced_at INTEGER
    );
    CREATE INDEX queue_member ON queue (member_id, device_id, seq) WHERE state = 'pending';
    CREATE INDEX queue_session ON queue (session_pubkey, seq)
        WHERE state = 'pending' AND session_pubkey IS NOT NULL;
    CREATE INDEX queue_expiry ON queue (expires_at) WHERE state = 'pending';
    CREATE INDEX queue_message ON queue (message_id);
    CREATE TABLE receipts (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        mesh_id TEXT NOT NULL,
        member_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        message_id TEXT NOT NULL,
        client_message_id TEXT,
        recipient_pubkey TEXT NOT NULL,
        state TEXT NOT NULL,
        at INTEGER NOT NULL,
        acked_at INTEGER,
        keep_until INTEGER NOT NULL
    );
    CREATE INDEX receipts_pending ON receipts (member_id, device_id, seq) WHERE acked_at IS NULL;
    CREATE TABLE invites (
        mesh_id TEXT NOT NULL REFERENCES meshes(id),
        invite_id TEXT NOT NULL,
        role TEXT NOT NULL,
        uses INTEGER NOT NULL,
        uses_left INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        claim_pubkey TEXT NOT NULL,
        sealed TEXT NOT NULL,
        admin_pubkey TEXT NOT NULL,
        admin_signature TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        revoked_at INTEGER,
        PRIMARY KEY (mesh_id, invite_id)
    );
    """,
    # 2: a recipient's `failed` receipt (a push it could not decrypt) and its reason.
    """
    ALTER TABLE queue ADD COLUMN failed_at INTEGER;
    ALTER TABLE receipts ADD COLUMN reason TEXT;
    """,
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


#: Queue rows to write for one send: (member id, device id, session key, target key).
_Targets = list[tuple[str, str | None, str | None, str]]


class StoreError(Exception):
    """Root of store errors; ``code`` is a stable wire code where one applies."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class MeshIdTaken(StoreError):
    """A creator proposed a mesh id that already exists."""

    def __init__(self, mesh_id: str) -> None:
        super().__init__(errors.INVALID_FIELD, f"mesh id {mesh_id!r} is already taken")


# ------------------------------------------------------------------ values


@dataclass(frozen=True, slots=True)
class Mesh:
    id: str
    name: str
    created_at: int


@dataclass(frozen=True, slots=True)
class Member:
    id: str
    mesh_id: str
    pubkey: str
    display_name: str
    role: str
    created_at: int
    revoked_at: int | None
    last_seen_at: int | None
    groups: tuple[tuple[str, str | None], ...] = ()


@dataclass(frozen=True, slots=True)
class SendItem:
    """One accepted-to-be ``send``: who sent it and what, already validated."""

    mesh_id: str
    sender_member_id: str
    sender_device_id: str
    sender_pubkey: str
    client_message_id: str | None
    request_fingerprint: str | None
    target_spec: str
    priority: str
    nonce: str
    ciphertext: str
    topic: str | None
    epoch: int | None
    reply_to_id: str | None
    now: int
    ttl_ms: int


@dataclass(frozen=True, slots=True)
class HelloItem:
    """A hello whose signature checked out; the store checks membership."""

    member_id: str
    mesh_id: str
    pubkey: str
    device_id: str
    groups: tuple[tuple[str, str | None], ...] | None
    now: int


@dataclass(frozen=True, slots=True)
class HelloResult:
    member: Member | None = None
    seen_before: bool = False
    receipts: tuple[ReceiptRow, ...] = ()
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """A queue row joined with its message: everything a ``push`` needs."""

    seq: int
    message_id: str
    mesh_id: str
    member_id: str
    device_id: str | None
    session_pubkey: str | None
    target_pubkey: str
    sender_pubkey: str
    sender_member_id: str
    sender_member_pubkey: str
    sender_name: str
    client_message_id: str | None
    target_spec: str
    priority: str
    nonce: str
    ciphertext: str
    topic: str | None
    epoch: int | None
    reply_to_id: str | None
    created_at: int


@dataclass(frozen=True, slots=True)
class SendOutcome:
    message_id: str = ""
    duplicate: bool = False
    recipients: int = 0
    deliveries: tuple[Delivery, ...] = ()
    error: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class ReceiptRow:
    seq: int
    id: str
    mesh_id: str
    member_id: str
    device_id: str
    message_id: str
    client_message_id: str | None
    recipient_pubkey: str
    state: str
    at: int
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class InviteClaimResult:
    mesh_id: str
    member_id: str
    invite_id: str
    role: str
    uses: int
    expires_at: int
    claim_pubkey: str
    sealed: str
    admin_pubkey: str
    admin_signature: str


@dataclass(frozen=True, slots=True)
class Invite:
    mesh_id: str
    invite_id: str
    role: str
    uses: int
    uses_left: int
    expires_at: int
    claim_pubkey: str
    revoked_at: int | None


@dataclass(slots=True)
class SweepResult:
    receipts: list[ReceiptRow] = field(default_factory=list)
    purged_messages: int = 0


# --------------------------------------------------------------- interface


class Store(Protocol):
    """What the server needs from durable storage (async, trio)."""

    async def aclose(self) -> None: ...
    async def create_mesh(
        self,
        name: str,
        *,
        now: int,
        admin_pubkey: str | None = None,
        admin_name: str = "",
        mesh_id: str | None = None,
    ) -> tuple[Mesh, Member | None]: ...
    async def get_member(self, member_id: str) -> Member | None: ...
    async def revoked_among(self, member_ids: Sequence[str]) -> set[str]: ...
    async def member_by_pubkey(self, mesh_id: str, pubkey: str) -> Member | None: ...
    async def list_members(self, mesh_id: str) -> list[Member]: ...
    async def member_hello(
        self,
        member_id: str,
        device_id: str,
        groups: Sequence[tuple[str, str | None]] | None,
        now: int,
    ) -> None: ...
    async def member_seen(self, member_id: str, device_id: str, now: int) -> None: ...
    async def hello_many(self, items: Sequence[HelloItem]) -> list[HelloResult]: ...
    async def seen_many(self, items: Sequence[tuple[str, str]], now: int) -> None: ...
    async def set_groups(
        self, member_id: str, add: Sequence[tuple[str, str | None]], remove: Sequence[str]
    ) -> None: ...
    async def session_hello(
        self,
        mesh_id: str,
        session_pubkey: str,
        member_id: str,
        device_id: str,
        expires_at: int,
        now: int,
    ) -> None: ...
    async def accept_sends(self, items: Sequence[SendItem]) -> list[SendOutcome]: ...
    async def commit_round(
        self,
        sends: Sequence[SendItem],
        acks: Sequence[tuple[str, str, str, str | None, str | None]],
        receipt_acks: Sequence[tuple[str, str]],
        now: int,
    ) -> tuple[list[SendOutcome], list[ReceiptRow]]: ...
    async def pending_member(
        self, member_id: str, device_id: str, after_seq: int, limit: int
    ) -> list[Delivery]: ...
    async def pending_session(
        self, mesh_id: str, session_pubkey: str, after_seq: int, limit: int
    ) -> list[Delivery]: ...
    async def ack_deliveries(
        self, acks: Sequence[tuple[str, str, str, str | None, str | None]], now: int
    ) -> list[ReceiptRow]: ...
    async def surfaced(
        self, member_id: str, device_id: str, message_id: str, now: int
    ) -> list[ReceiptRow]: ...
    async def failed(
        self, member_id: str, device_id: str, message_id: str, reason: str, now: int
    ) -> list[ReceiptRow]: ...
    async def pending_receipts(self, member_id: str, device_id: str) -> list[ReceiptRow]: ...
    async def ack_receipts(self, member_id: str, receipt_ids: Sequence[str], now: int) -> None: ...
    async def put_invite(
        self,
        mesh_id: str,
        invite_id: str,
        role: str,
        uses: int,
        expires_at: int,
        claim_pubkey: str,
        sealed: str,
        admin_pubkey: str,
        admin_signature: str,
        now: int,
    ) -> None: ...
    async def revoke_invite(self, mesh_id: str, invite_id: str, now: int) -> bool: ...
    async def get_invite(self, mesh_id: str, invite_id: str) -> Invite | None: ...
    async def claim_invite(
        self, mesh_id: str, invite_id: str, member_pubkey: str, display_name: str, now: int
    ) -> InviteClaimResult: ...
    async def sweep(self, now: int, retention_ms: int) -> SweepResult: ...


# ------------------------------------------------------------ sqlite core


def _member(row: sqlite3.Row, groups: tuple[tuple[str, str | None], ...] = ()) -> Member:
    return Member(
        id=row["id"],
        mesh_id=row["mesh_id"],
        pubkey=row["pubkey"],
        display_name=row["display_name"],
        role=row["role"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
        last_seen_at=row["last_seen_at"],
        groups=groups,
    )


_DELIVERY_SELECT: Final = """
    SELECT q.seq, q.message_id, m.mesh_id, q.member_id, q.device_id, q.session_pubkey,
           q.target_pubkey, m.sender_pubkey, m.sender_member_id, s.pubkey AS smpk,
           s.display_name AS sname, m.client_message_id, m.target_spec, m.priority,
           m.nonce, m.ciphertext, m.topic, m.epoch, m.reply_to_id, m.created_at
    FROM queue q JOIN messages m ON m.id = q.message_id
    JOIN members s ON s.id = m.sender_member_id
"""


def _delivery(r: sqlite3.Row) -> Delivery:
    return Delivery(
        seq=r["seq"],
        message_id=r["message_id"],
        mesh_id=r["mesh_id"],
        member_id=r["member_id"],
        device_id=r["device_id"],
        session_pubkey=r["session_pubkey"],
        target_pubkey=r["target_pubkey"],
        sender_pubkey=r["sender_pubkey"],
        sender_member_id=r["sender_member_id"],
        sender_member_pubkey=r["smpk"],
        sender_name=r["sname"],
        client_message_id=r["client_message_id"],
        target_spec=r["target_spec"],
        priority=r["priority"],
        nonce=r["nonce"],
        ciphertext=r["ciphertext"],
        topic=r["topic"],
        epoch=r["epoch"],
        reply_to_id=r["reply_to_id"],
        created_at=r["created_at"],
    )


def _receipt(r: sqlite3.Row) -> ReceiptRow:
    return ReceiptRow(
        seq=r["seq"],
        id=r["id"],
        mesh_id=r["mesh_id"],
        member_id=r["member_id"],
        device_id=r["device_id"],
        message_id=r["message_id"],
        client_message_id=r["client_message_id"],
        recipient_pubkey=r["recipient_pubkey"],
        state=r["state"],
        at=r["at"],
        reason=r["reason"],
    )


class SqliteDB:
    """Synchronous SQLite core.  Not thread-safe by itself: callers serialise."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self.conn = sqlite3.connect(
            str(self.path), check_same_thread=False, isolation_level=None, timeout=10.0
        )
        self.conn.row_factory = sqlite3.Row
        try:
            self.path.chmod(0o600)
            self.conn.execute("PRAGMA busy_timeout = 10000")
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = FULL")
            self.conn.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except BaseException:
            self.conn.close()
            raise

    def close(self) -> None:
        self.conn.close()

    # -- plumbing

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                "schema_too_new",
                f"database schema version {version} is newer than this broker "
                f"knows ({SCHEMA_VERSION}); upgrade claudemesh",
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self._tx():
                for stmt in MIGRATIONS[target - 1].split(";"):
                    if stmt.strip():
                        self.conn.execute(stmt)
                self.conn.execute(f"PRAGMA user_version = {target}")

    def _tx(self) -> _Tx:
        return _Tx(self.conn)

    def _groups(self, member_id: str) -> tuple[tuple[str, str | None], ...]:
        rows = self.conn.execute(
            "SELECT name, role FROM member_groups WHERE member_id = ? ORDER BY name", (member_id,)
        ).fetchall()
        return tuple((r["name"], r["role"]) for r in rows)

    # -- meshes and members

    def create_mesh(
        self,
        name: str,
        *,
        now: int,
        admin_pubkey: str | None = None,
        admin_name: str = "",
        mesh_id: str | None = None,
    ) -> tuple[Mesh, Member | None]:
        """Create a mesh; ``mesh_id`` is the creator's proposal (MeshIdTaken if used)."""
        mesh = Mesh(id=mesh_id or ids.uuid7(), name=name, created_at=now)
        with self._tx():
            if (
                mesh_id is not None
                and self.conn.execute("SELECT 1 FROM meshes WHERE id = ?", (mesh_id,)).fetchone()
            ):
                raise MeshIdTaken(mesh_id)
            self.conn.execute(
                "INSERT INTO meshes (id, name, created_at) VALUES (?, ?, ?)",
                (mesh.id, name, now),
            )
            member = None
            if admin_pubkey is not None:
                member = self._add_member(mesh.id, admin_pubkey, admin_name, "admin", now)
        return mesh, member

    def list_meshes(self) -> list[Mesh]:
        rows = self.conn.execute("SELECT * FROM meshes ORDER BY created_at, id").fetchall()
        return [Mesh(id=r["id"], name=r["name"], created_at=r["created_at"]) for r in rows]

    def get_mesh(self, mesh_id: str) -> Mesh | None:
        r = self.conn.execute("SELECT * FROM meshes WHERE id = ?", (mesh_id,)).fetchone()
        return None if r is None else Mesh(id=r["id"], name=r["name"], created_at=r["created_at"])

    def _add_member(self, mesh_id: str, pubkey: str, name: str, role: str, now: int) -> Member:
        member_id = ids.uuid7()
        self.conn.execute(
            "INSERT INTO members (id, mesh_id, pubkey, display_name, role, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (member_id, mesh_id, pubkey, name, role, now),
        )
        return Member(member_id, mesh_id, pubkey, name, role, now, None, None)

    def add_member(self, mesh_id: str, pubkey: str, name: str, role: str, now: int) -> Member:
        with self._tx():
            if self.get_mesh(mesh_id) is None:
                raise StoreError("not_found", f"no mesh {mesh_id}")
            existing = self.conn.execute(
                "SELECT id FROM members WHERE mesh_id = ? AND pubkey = ?", (mesh_id, pubkey)
            ).fetchone()
            if existing is not None:
                raise StoreError("exists", f"{pubkey} is already member {existing['id']}")
            return self._add_member(mesh_id, pubkey, name, role, now)

    def revoke_member(self, mesh_id: str, member_ref: str, now: int) -> Member:
        with self._tx():
            r = self.conn.execute(
                "SELECT * FROM members WHERE mesh_id = ? AND (id = ? OR pubkey = ?)",
                (mesh_id, member_ref, member_ref),
            ).fetchone()
            if r is None:
                raise StoreError("not_found", f"no member {member_ref} in mesh {mesh_id}")
            self.conn.execute(
                "UPDATE members SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
                (now, r["id"]),
            )
        member = self.get_member(r["id"])
        assert member is not None
        return member

    def get_member(self, member_id: str) -> Member | None:
        r = self.conn.execute("SELECT * FROM members WHERE id = ?", (member_id,)).fetchone()
        return None if r is None else _member(r, self._groups(member_id))

    def revoked_among(self, member_ids: Sequence[str]) -> set[str]:
        """Which of these members are revoked (the admin CLI writes from another process)."""
        out: set[str] = set()
        ids_ = list(member_ids)
        for i in range(0, len(ids_), 500):
            chunk = ids_[i : i + 500]
            marks = ",".join("?" * len(chunk))
            out.update(
                r[0]
                for r in self.conn.execute(
                    f"SELECT id FROM members WHERE revoked_at IS NOT NULL AND id IN ({marks})",
                    chunk,
                )
            )
        return out

    def member_by_pubkey(self, mesh_id: str, pubkey: str) -> Member | None:
        r = self.conn.execute(
            "SELECT * FROM members WHERE mesh_id = ? AND pubkey = ?", (mesh_id, pubkey)
        ).fetchone()
        return None if r is None else _member(r, self._groups(r["id"]))

    def list_members(self, mesh_id: str) -> list[Member]:
        rows = self.conn.execute(
            "SELECT * FROM members WHERE mesh_id = ? ORDER BY created_at, id", (mesh_id,)
        ).fetchall()
        return [_member(r, self._groups(r["id"])) for r in rows]

    def member_hello(
        self,
        member_id: str,
        device_id: str,
        groups: Sequence[tuple[str, str | None]] | None,
        now: int,
    ) -> None:
        """Record a device's hello; hand it the rows no device has claimed yet."""
        with self._tx():
            self.conn.execute(
                "INSERT INTO devices (member_id, device_id, last_seen_at) VALUES (?, ?, ?)"
                " ON CONFLICT (member_id, device_id)"
                " DO UPDATE SET last_seen_at = excluded.last_seen_at",
                (member_id, device_id, now),
            )
            self.conn.execute("UPDATE members SET last_seen_at = ? WHERE id = ?", (now, member_id))
            self.conn.execute(
                "UPDATE queue SET device_id = ? WHERE member_id = ? AND device_id IS NULL"
                " AND session_pubkey IS NULL AND state = 'pending'",
                (device_id, member_id),
            )
            if groups is not None:
                self.conn.execute("DELETE FROM member_groups WHERE member_id = ?", (member_id,))
                self.conn.executemany(
                    "INSERT OR REPLACE INTO member_groups (member_id, name, role) VALUES (?, ?, ?)",
                    [(member_id, g, r) for g, r in groups],
                )

    def hello_many(self, items: Sequence[HelloItem]) -> list[HelloResult]:
        """Check and register a batch of hellos in one transaction."""
        out: list[HelloResult] = []
        with self._tx():
            for it in items:
                r = self.conn.execute(
                    "SELECT * FROM members WHERE id = ?", (it.member_id,)
                ).fetchone()
                if r is None or r["mesh_id"] != it.mesh_id or r["pubkey"] != it.pubkey:
                    out.append(HelloResult(error=errors.UNAUTHORIZED))
                    continue
                if r["revoked_at"] is not None:
                    out.append(HelloResult(error=errors.REVOKED))
                    continue
                self.member_hello(it.member_id, it.device_id, it.groups, it.now)
                member = self.get_member(it.member_id)
                out.append(
                    HelloResult(
                        member=member,
                        seen_before=r["last_seen_at"] is not None,
                        receipts=tuple(self.pending_receipts(it.member_id, it.device_id)),
                    )
                )
        return out

    def seen_many(self, items: Sequence[tuple[str, str]], now: int) -> None:
        with self._tx():
            for member_id, device_id in items:
                self.member_seen(member_id, device_id, now)

    def member_seen(self, member_id: str, device_id: str, now: int) -> None:
        with self._tx():
            self.conn.execute("UPDATE members SET last_seen_at = ? WHERE id = ?", (now, member_id))
            self.conn.execute(
                "UPDATE devices SET last_seen_at = ? WHERE member_id = ? AND device_id = ?",
                (now, member_id, device_id),
            )

    def set_groups(
        self, member_id: str, add: Sequence[tuple[str, str | None]], remove: Sequence[str]
    ) -> None:
        with self._tx():
            self.conn.executemany(
                "INSERT OR REPLACE INTO member_groups (member_id, name, role) VALUES (?, ?, ?)",
                [(member_id, g, r) for g, r in add],
            )
            self.conn.executemany(
                "DELETE FROM member_groups WHERE member_id = ? AND name = ?",
                [(member_id, g) for g in remove],
            )

    def session_hello(
        self,
        mesh_id: str,
        session_pubkey: str,
        member_id: str,
        device_id: str,
        expires_at: int,
        now: int,
    ) -> None:
        with self._tx():
            self.conn.execute(
                "INSERT INTO sessions (mesh_id, session_pubkey, member_id, device_id, expires_at,"
                " last_seen_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (mesh_id, session_pubkey)"
                " DO UPDATE SET member_id = excluded.member_id, device_id = excluded.device_id,"
                " expires_at = excluded.expires_at, last_seen_at = excluded.last_seen_at",
                (mesh_id, session_pubkey, member_id, device_id, expires_at, now),
            )

    # -- sends

    def accept_sends(self, items: Sequence[SendItem]) -> list[SendOutcome]:
        """Commit a batch of sends in one transaction (group commit)."""
        out: list[SendOutcome] = []
        # Lookups that cannot change inside the transaction, shared by the batch.
        senders: dict[str, sqlite3.Row | None] = {}
        routes: dict[tuple[str, str, str], _Targets | SendOutcome] = {}
        with self._tx():
            for item in items:
                self.conn.execute("SAVEPOINT one")
                try:
                    res = self._accept_one(item, senders, routes)
                except sqlite3.Error as exc:
                    self.conn.execute("ROLLBACK TO one")
                    res = SendOutcome(error=(errors.INTERNAL, f"store error: {exc}"))
                self.conn.execute("RELEASE one")
                out.append(res)
        return out

    def commit_round(
        self,
        sends: Sequence[SendItem],
        acks: Sequence[tuple[str, str, str, str | None, str | None]],
        receipt_acks: Sequence[tuple[str, str]],
        now: int,
    ) -> tuple[list[SendOutcome], list[ReceiptRow]]:
        """Sends, delivery acks and receipt acks of one round: one transaction, one fsync."""
        with self._tx():
            outcomes = self.accept_sends(sends) if sends else []
            receipts = self.ack_deliveries(acks, now) if acks else []
            if receipt_acks:
                self.conn.executemany(
                    "UPDATE receipts SET acked_at = ? WHERE id = ? AND member_id = ?"
                    " AND acked_at IS NULL",
                    [(now, rid, member_id) for member_id, rid in receipt_acks],
                )
        return outcomes, receipts

    def _accept_one(
        self,
        it: SendItem,
        senders: dict[str, sqlite3.Row | None],
        routes: dict[tuple[str, str, str], _Targets | SendOutcome],
    ) -> SendOutcome:
        if it.sender_member_id not in senders:
            senders[it.sender_member_id] = self.conn.execute(
                "SELECT pubkey, display_name, revoked_at FROM members WHERE id = ?",
                (it.sender_member_id,),
            ).fetchone()
        sender = senders[it.sender_member_id]
        if sender is None or sender["revoked_at"] is not None:
            return SendOutcome(error=(errors.REVOKED, "the sending member is revoked"))
        if it.client_message_id is not None:
            prev = self.conn.execute(
                "SELECT id, request_fingerprint, recipients FROM messages"
                " WHERE mesh_id = ? AND sender_member_id = ? AND client_message_id = ?",
                (it.mesh_id, it.sender_member_id, it.client_message_id),
            ).fetchone()
            if prev is not None:
                fp = prev["request_fingerprint"]
                if (
                    fp is not None
                    and it.request_fingerprint is not None
                    and (fp != it.request_fingerprint)
                ):
                    return SendOutcome(
                        message_id=prev["id"],
                        error=(
                            errors.IDEMPOTENCY_CONFLICT,
                            f"client_message_id {it.client_message_id} was used for a different"
                            f" request (broker message {prev['id']})",
                        ),
                    )
                return SendOutcome(
                    message_id=prev["id"], duplicate=True, recipients=prev["recipients"]
                )
        route = (it.mesh_id, it.sender_member_id, it.target_spec)
        if route not in routes:
            routes[route] = self._resolve(it)
        targets = routes[route]
        if isinstance(targets, SendOutcome):
            return targets
        message_id = ids.uuid7()
        expires = it.now + it.ttl_ms
        self.conn.execute(
            "INSERT INTO messages (id, mesh_id, sender_member_id, sender_device_id, sender_pubkey,"
            " client_message_id, request_fingerprint, target_spec, priority, nonce, ciphertext,"
            " topic, epoch, reply_to_id, created_at, keep_until, recipients)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                message_id,
                it.mesh_id,
                it.sender_member_id,
                it.sender_device_id,
                it.sender_pubkey,
                it.client_message_id,
                it.request_fingerprint,
                it.target_spec,
                it.priority,
                it.nonce,
                it.ciphertext,
                it.topic,
                it.epoch,
                it.reply_to_id,
                it.now,
                expires,
                len(targets),
            ),
        )
        deliveries: list[Delivery] = []
        sender_row = sender
        for member_id, device_id, session_pk, target_pk in targets:
            cur = self.conn.execute(
                "INSERT INTO queue (message_id, member_id, device_id, session_pubkey,"
                " target_pubkey, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                (message_id, member_id, device_id, session_pk, target_pk, expires),
            )
            seq = cur.lastrowid
            assert seq is not None
            deliveries.append(
                Delivery(
                    seq=seq,
                    message_id=message_id,
                    mesh_id=it.mesh_id,
                    member_id=member_id,
                    device_id=device_id,
                    session_pubkey=session_pk,
                    target_pubkey=target_pk,
                    sender_pubkey=it.sender_pubkey,
                    sender_member_id=it.sender_member_id,
                    sender_member_pubkey=sender_row["pubkey"],
                    sender_name=sender_row["display_name"],
                    client_message_id=it.client_message_id,
                    target_spec=it.target_spec,
                    priority=it.priority,
                    nonce=it.nonce,
                    ciphertext=it.ciphertext,
                    topic=it.topic,
                    epoch=it.epoch,
                    reply_to_id=it.reply_to_id,
                    created_at=it.now,
                )
            )
        return SendOutcome(
            message_id=message_id, recipients=len(targets), deliveries=tuple(deliveries)
        )

    def _devices(self, member_id: str, now: int) -> list[str]:
        rows = self.conn.execute(
            "SELECT device_id FROM devices WHERE member_id = ? AND last_seen_at >= ?"
            " ORDER BY device_id",
            (member_id, now - DEVICE_ACTIVE_MS),
        ).fetchall()
        return [r["device_id"] for r in rows]

    def _member_targets(
        self, rows: Iterable[sqlite3.Row], now: int
    ) -> list[tuple[str, str | None, str | None, str]]:
        out: list[tuple[str, str | None, str | None, str]] = []
        for r in rows:
            devices = self._devices(r["id"], now)
            if not devices:
                out.append((r["id"], None, None, r["pubkey"]))
            out.extend((r["id"], d, None, r["pubkey"]) for d in devices)
        return out

    def _resolve(self, it: SendItem) -> _Targets | SendOutcome:
        spec = it.target_spec
        if spec in ("*", "@all") or spec.startswith("#"):
            rows = self.conn.execute(
                "SELECT id, pubkey FROM members WHERE mesh_id = ? AND revoked_at IS NULL"
                " AND id != ? ORDER BY created_at, id",
                (it.mesh_id, it.sender_member_id),
            ).fetchall()
            return self._member_targets(rows, it.now)
        if spec.startswith("@"):
            group = spec[1:]
            rows = self.conn.execute(
                "SELECT DISTINCT m.id, m.pubkey, m.created_at FROM members m"
                " JOIN member_groups g ON g.member_id = m.id"
                " WHERE m.mesh_id = ? AND m.revoked_at IS NULL AND m.id != ?"
                " AND (g.name = ? OR substr(g.name, 1, ?) = ?) ORDER BY m.created_at, m.id",
                (it.mesh_id, it.sender_member_id, group, len(group) + 1, group + "/"),
            ).fetchall()
            return self._member_targets(rows, it.now)
        r = self.conn.execute(
            "SELECT id, pubkey FROM members WHERE mesh_id = ? AND pubkey = ?"
            " AND revoked_at IS NULL",
            (it.mesh_id, spec),
        ).fetchone()
        if r is not None:
            return self._member_targets([r], it.now)
        s = self.conn.execute(
            "SELECT s.member_id, s.device_id FROM sessions s JOIN members m ON m.id = s.member_id"
            " WHERE s.mesh_id = ? AND s.session_pubkey = ? AND m.revoked_at IS NULL",
            (it.mesh_id, spec),
        ).fetchone()
        if s is not None:
            return [(s["member_id"], s["device_id"], spec, spec)]
        return SendOutcome(error=(errors.UNKNOWN_TARGET, f"no member or session {spec}"))

    def pending_member(
        self, member_id: str, device_id: str, after_seq: int, limit: int
    ) -> list[Delivery]:
        rows = self.conn.execute(
            _DELIVERY_SELECT + " WHERE q.member_id = ? AND q.device_id = ? AND q.state = 'pending'"
            " AND q.session_pubkey IS NULL AND q.seq > ? ORDER BY q.seq LIMIT ?",
            (member_id, device_id, after_seq, limit),
        ).fetchall()
        return [_delivery(r) for r in rows]

    def pending_session(
        self, mesh_id: str, session_pubkey: str, after_seq: int, limit: int
    ) -> list[Delivery]:
        rows = self.conn.execute(
            _DELIVERY_SELECT + " WHERE q.session_pubkey = ? AND m.mesh_id = ?"
            " AND q.state = 'pending' AND q.seq > ? ORDER BY q.seq LIMIT ?",
            (session_pubkey, mesh_id, after_seq, limit),
        ).fetchall()
        return [_delivery(r) for r in rows]

    def _new_receipt(
        self,
        msg: sqlite3.Row,
        recipient_pubkey: str,
        state: str,
        now: int,
        keep_until: int,
        reason: str | None = None,
    ) -> ReceiptRow:
        rid = ids.uuid7()
        cur = self.conn.execute(
            "INSERT INTO receipts (id, mesh_id, member_id, device_id, message_id,"
            " client_message_id, recipient_pubkey, state, at, keep_until, reason)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                rid,
                msg["mesh_id"],
                msg["sender_member_id"],
                msg["sender_device_id"],
                msg["id"],
                msg["client_message_id"],
                recipient_pubkey,
                state,
                now,
                keep_until,
                reason,
            ),
        )
        seq = cur.lastrowid
        assert seq is not None
        return ReceiptRow(
            seq=seq,
            id=rid,
            mesh_id=msg["mesh_id"],
            member_id=msg["sender_member_id"],
            device_id=msg["sender_device_id"],
            message_id=msg["id"],
            client_message_id=msg["client_message_id"],
            recipient_pubkey=recipient_pubkey,
            state=state,
            at=now,
            reason=reason,
        )

    def ack_deliveries(
        self,
        acks: Sequence[tuple[str, str, str, str | None, str | None]],
        now: int,
    ) -> list[ReceiptRow]:
        """Mark rows delivered; each ack is (mesh, member, device, message id, client id).

        Returns the ``delivered`` receipts queued for the senders.
        """
        out: list[ReceiptRow] = []
        with self._tx():
            for mesh_id, member_id, device_id, message_id, client_id in acks:
                if message_id is not None:
                    rows = self.conn.execute(
                        "UPDATE queue SET state = 'delivered', done_at = ? WHERE message_id = ?"
                        " AND member_id = ? AND device_id = ? AND state = 'pending'"
                        " RETURNING message_id, target_pubkey, expires_at",
                        (now, message_id, member_id, device_id),
                    ).fetchall()
                elif client_id is not None:
                    rows = self.conn.execute(
                        "UPDATE queue SET state = 'delivered', done_at = ? WHERE member_id = ?"
                        " AND device_id = ? AND state = 'pending' AND message_id IN"
                        " (SELECT id FROM messages WHERE mesh_id = ? AND client_message_id = ?)"
                        " RETURNING message_id, target_pubkey, expires_at",
                        (now, member_id, device_id, mesh_id, client_id),
                    ).fetchall()
                else:
                    continue
                for r in rows:
                    msg = self.conn.execute(
                        "SELECT * FROM messages WHERE id = ?", (r["message_id"],)
                    ).fetchone()
                    out.append(
                        self._new_receipt(
                            msg, r["target_pubkey"], "delivered", now, msg["keep_until"]
                        )
                    )
        return out

    def surfaced(
        self, member_id: str, device_id: str, message_id: str, now: int
    ) -> list[ReceiptRow]:
        """A session or the user saw the recipient's copy: one receipt per row, once."""
        return self._recipient_receipt(
            "surfaced_at", "surfaced", member_id, device_id, message_id, now
        )

    def failed(
        self, member_id: str, device_id: str, message_id: str, reason: str, now: int
    ) -> list[ReceiptRow]:
        """The recipient could not read its copy: one ``failed`` receipt per row, once."""
        return self._recipient_receipt(
            "failed_at", "failed", member_id, device_id, message_id, now, reason
        )

    def _recipient_receipt(
        self,
        column: Literal["surfaced_at", "failed_at"],
        state: str,
        member_id: str,
        device_id: str,
        message_id: str,
        now: int,
        reason: str | None = None,
    ) -> list[ReceiptRow]:
        out: list[ReceiptRow] = []
        with self._tx():
            rows = self.conn.execute(
                f"UPDATE queue SET {column} = ? WHERE message_id = ? AND member_id = ?"
                f" AND (device_id = ? OR device_id IS NULL) AND {column} IS NULL"
                " RETURNING target_pubkey",
                (now, message_id, member_id, device_id),
            ).fetchall()
            if rows:
                msg = self.conn.execute(
                    "SELECT * FROM messages WHERE id = ?", (message_id,)
                ).fetchone()
                for r in rows:
                    out.append(
                        self._new_receipt(
                            msg, r["target_pubkey"], state, now, msg["keep_until"], reason
                        )
                    )
        return out

    def pending_receipts(self, member_id: str, device_id: str) -> list[ReceiptRow]:
        rows = self.conn.execute(
            "SELECT * FROM receipts WHERE member_id = ? AND device_id = ? AND acked_at IS NULL"
            " ORDER BY seq",
            (member_id, device_id),
        ).fetchall()
        return [_receipt(r) for r in rows]

    def ack_receipts(self, member_id: str, receipt_ids: Sequence[str], now: int) -> None:
        with self._tx():
            self.conn.executemany(
                "UPDATE receipts SET acked_at = ? WHERE id = ? AND member_id = ?"
                " AND acked_at IS NULL",
                [(now, rid, member_id) for rid in receipt_ids],
            )

    # -- invites

    def put_invite(
        self,
        mesh_id: str,
        invite_id: str,
        role: str,
        uses: int,
        expires_at: int,
        claim_pubkey: str,
        sealed: str,
        admin_pubkey: str,
        admin_signature: str,
        now: int,
    ) -> None:
        with self._tx():
            try:
                self.conn.execute(
                    "INSERT INTO invites (mesh_id, invite_id, role, uses, uses_left, expires_at,"
                    " claim_pubkey, sealed, admin_pubkey, admin_signature, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        mesh_id,
                        invite_id,
                        role,
                        uses,
                        uses,
                        expires_at,
                        claim_pubkey,
                        sealed,
                        admin_pubkey,
                        admin_signature,
                        now,
                    ),
                )
            except sqlite3.IntegrityError:
                raise StoreError(
                    errors.INVALID_FIELD, f"invite {invite_id} already exists"
                ) from None

    def revoke_invite(self, mesh_id: str, invite_id: str, now: int) -> bool:
        with self._tx():
            cur = self.conn.execute(
                "UPDATE invites SET revoked_at = COALESCE(revoked_at, ?)"
                " WHERE mesh_id = ? AND invite_id = ?",
                (now, mesh_id, invite_id),
            )
            return cur.rowcount > 0

    def get_invite(self, mesh_id: str, invite_id: str) -> Invite | None:
        r = self.conn.execute(
            "SELECT * FROM invites WHERE mesh_id = ? AND invite_id = ?", (mesh_id, invite_id)
        ).fetchone()
        if r is None:
            return None
        return Invite(
            mesh_id=r["mesh_id"],
            invite_id=r["invite_id"],
            role=r["role"],
            uses=r["uses"],
            uses_left=r["uses_left"],
            expires_at=r["expires_at"],
            claim_pubkey=r["claim_pubkey"],
            revoked_at=r["revoked_at"],
        )

    def claim_invite(
        self, mesh_id: str, invite_id: str, member_pubkey: str, display_name: str, now: int
    ) -> InviteClaimResult:
        """Check and spend one use atomically; the caller verified the claim signature."""
        with self._tx():
            r = self.conn.execute(
                "SELECT * FROM invites WHERE mesh_id = ? AND invite_id = ?", (mesh_id, invite_id)
            ).fetchone()
            if r is None:
                raise StoreError(errors.INVITE_NOT_FOUND, f"no invite {invite_id}")
            if r["revoked_at"] is not None:
                raise StoreError(errors.INVITE_REVOKED, f"invite {invite_id} was revoked")
            if r["expires_at"] <= now:
                raise StoreError(errors.INVITE_EXPIRED, f"invite {invite_id} has expired")
            existing = self.conn.execute(
                "SELECT id, revoked_at FROM members WHERE mesh_id = ? AND pubkey = ?",
                (mesh_id, member_pubkey),
            ).fetchone()
            if existing is not None:
                if existing["revoked_at"] is not None:
                    raise StoreError(errors.REVOKED, "this key was revoked from the mesh")
                member_id = existing["id"]
            else:
                if r["uses_left"] <= 0:
                    raise StoreError(errors.INVITE_EXHAUSTED, f"invite {invite_id} is used up")
                self.conn.execute(
                    "UPDATE invites SET uses_left = uses_left - 1 WHERE mesh_id = ?"
                    " AND invite_id = ?",
                    (mesh_id, invite_id),
                )
                member_id = self._add_member(
                    mesh_id, member_pubkey, display_name, r["role"], now
                ).id
            return InviteClaimResult(
                mesh_id=mesh_id,
                member_id=member_id,
                invite_id=invite_id,
                role=r["role"],
                uses=r["uses"],
                expires_at=r["expires_at"],
                claim_pubkey=r["claim_pubkey"],
                sealed=r["sealed"],
                admin_pubkey=r["admin_pubkey"],
                admin_signature=r["admin_signature"],
            )

    # -- expiry

    def sweep(self, now: int, retention_ms: int) -> SweepResult:
        """Expire overdue rows (with ``expired`` receipts) and purge old history."""
        res = SweepResult()
        with self._tx():
            rows = self.conn.execute(
                "UPDATE queue SET state = 'expired', done_at = ? WHERE state = 'pending'"
                " AND expires_at <= ? RETURNING message_id, target_pubkey",
                (now, now),
            ).fetchall()
            for r in rows:
                msg = self.conn.execute(
                    "SELECT * FROM messages WHERE id = ?", (r["message_id"],)
                ).fetchone()
                res.receipts.append(
                    self._new_receipt(msg, r["target_pubkey"], "expired", now, now + retention_ms)
                )
            # Dedupe rows (messages) outlive their queue rows by the retention.
            cutoff = now - retention_ms
            self.conn.execute(
                "DELETE FROM queue WHERE state != 'pending' AND done_at < ?", (cutoff,)
            )
            cur = self.conn.execute(
                "DELETE FROM messages WHERE keep_until < ? AND NOT EXISTS"
                " (SELECT 1 FROM queue q WHERE q.message_id = messages.id)",
                (cutoff,),
            )
            res.purged_messages = cur.rowcount
            self.conn.execute(
                "DELETE FROM receipts WHERE (acked_at IS NOT NULL AND acked_at < ?)"
                " OR keep_until < ?",
                (cutoff, cutoff),
            )
        return res

    def counts(self) -> dict[str, int]:
        """Row counts by kind, for statistics and the admin CLI."""
        out: dict[str, int] = {}
        for name, sql in (
            ("meshes", "SELECT count(*) FROM meshes"),
            ("members", "SELECT count(*) FROM members"),
            ("pending", "SELECT count(*) FROM queue WHERE state = 'pending'"),
            ("messages", "SELECT count(*) FROM messages"),
            ("receipts_pending", "SELECT count(*) FROM receipts WHERE acked_at IS NULL"),
        ):
            out[name] = int(self.conn.execute(sql).fetchone()[0])
        return out


class _Tx:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or ``ROLLBACK``); nests as a no-op."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.outer = False

    def __enter__(self) -> None:
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN IMMEDIATE")
            self.outer = True

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self.outer:
            return
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
            except BaseException:
                # A failed COMMIT leaves the transaction open: every later
                # _tx() would nest in it and never commit.  Roll it back.
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        elif self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


# ------------------------------------------------------------ async facade


class SqliteStore:
    """:class:`Store` over :class:`SqliteDB`: each job in a worker thread, one at a time."""

    def __init__(self, db: SqliteDB) -> None:
        self.db = db
        self._limiter = trio.CapacityLimiter(1)

    @classmethod
    def open(cls, path: str | Path) -> SqliteStore:
        return cls(SqliteDB(path))

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def aclose(self) -> None:
        await self._run(self.db.close)

    async def create_mesh(
        self,
        name: str,
        *,
        now: int,
        admin_pubkey: str | None = None,
        admin_name: str = "",
        mesh_id: str | None = None,
    ) -> tuple[Mesh, Member | None]:
        def job() -> tuple[Mesh, Member | None]:
            return self.db.create_mesh(
                name, now=now, admin_pubkey=admin_pubkey, admin_name=admin_name, mesh_id=mesh_id
            )

        return await self._run(job)

    async def get_member(self, member_id: str) -> Member | None:
        return await self._run(self.db.get_member, member_id)

    async def revoked_among(self, member_ids: Sequence[str]) -> set[str]:
        return await self._run(self.db.revoked_among, member_ids)

    async def member_by_pubkey(self, mesh_id: str, pubkey: str) -> Member | None:
        return await self._run(self.db.member_by_pubkey, mesh_id, pubkey)

    async def list_members(self, mesh_id: str) -> list[Member]:
        return await self._run(self.db.list_members, mesh_id)

    async def member_hello(
        self,
        member_id: str,
        device_id: str,
        groups: Sequence[tuple[str, str | None]] | None,
        now: int,
    ) -> None:
        await self._run(self.db.member_hello, member_id, device_id, groups, now)

    async def member_seen(self, member_id: str, device_id: str, now: int) -> None:
        await self._run(self.db.member_seen, member_id, device_id, now)

    async def hello_many(self, items: Sequence[HelloItem]) -> list[HelloResult]:
        return await self._run(self.db.hello_many, items)

    async def seen_many(self, items: Sequence[tuple[str, str]], now: int) -> None:
        await self._run(self.db.seen_many, items, now)

    async def set_groups(
        self, member_id: str, add: Sequence[tuple[str, str | None]], remove: Sequence[str]
    ) -> None:
        await self._run(self.db.set_groups, member_id, add, remove)

    async def session_hello(
        self,
        mesh_id: str,
        session_pubkey: str,
        member_id: str,
        device_id: str,
        expires_at: int,
        now: int,
    ) -> None:
        await self._run(
            self.db.session_hello, mesh_id, session_pubkey, member_id, device_id, expires_at, now
        )

    async def accept_sends(self, items: Sequence[SendItem]) -> list[SendOutcome]:
        return await self._run(self.db.accept_sends, items)

    async def commit_round(
        self,
        sends: Sequence[SendItem],
        acks: Sequence[tuple[str, str, str, str | None, str | None]],
        receipt_acks: Sequence[tuple[str, str]],
        now: int,
    ) -> tuple[list[SendOutcome], list[ReceiptRow]]:
        return await self._run(self.db.commit_round, sends, acks, receipt_acks, now)

    async def pending_member(
        self, member_id: str, device_id: str, after_seq: int, limit: int
    ) -> list[Delivery]:
        return await self._run(self.db.pending_member, member_id, device_id, after_seq, limit)

    async def pending_session(
        self, mesh_id: str, session_pubkey: str, after_seq: int, limit: int
    ) -> list[Delivery]:
        return await self._run(self.db.pending_session, mesh_id, session_pubkey, after_seq, limit)

    async def ack_deliveries(
        self, acks: Sequence[tuple[str, str, str, str | None, str | None]], now: int
    ) -> list[ReceiptRow]:
        return await self._run(self.db.ack_deliveries, acks, now)

    async def surfaced(
        self, member_id: str, device_id: str, message_id: str, now: int
    ) -> list[ReceiptRow]:
        return await self._run(self.db.surfaced, member_id, device_id, message_id, now)

    async def failed(
        self, member_id: str, device_id: str, message_id: str, reason: str, now: int
    ) -> list[ReceiptRow]:
        return await self._run(self.db.failed, member_id, device_id, message_id, reason, now)

    async def pending_receipts(self, member_id: str, device_id: str) -> list[ReceiptRow]:
        return await self._run(self.db.pending_receipts, member_id, device_id)

    async def ack_receipts(self, member_id: str, receipt_ids: Sequence[str], now: int) -> None:
        await self._run(self.db.ack_receipts, member_id, receipt_ids, now)

    async def put_invite(
        self,
        mesh_id: str,
        invite_id: str,
        role: str,
        uses: int,
        expires_at: int,
        claim_pubkey: str,
        sealed: str,
        admin_pubkey: str,
        admin_signature: str,
        now: int,
    ) -> None:
        await self._run(
            self.db.put_invite,
            mesh_id,
            invite_id,
            role,
            uses,
            expires_at,
            claim_pubkey,
            sealed,
            admin_pubkey,
            admin_signature,
            now,
        )

    async def revoke_invite(self, mesh_id: str, invite_id: str, now: int) -> bool:
        return await self._run(self.db.revoke_invite, mesh_id, invite_id, now)

    async def get_invite(self, mesh_id: str, invite_id: str) -> Invite | None:
        return await self._run(self.db.get_invite, mesh_id, invite_id)

    async def claim_invite(
        self, mesh_id: str, invite_id: str, member_pubkey: str, display_name: str, now: int
    ) -> InviteClaimResult:
        return await self._run(
            self.db.claim_invite, mesh_id, invite_id, member_pubkey, display_name, now
        )

    async def sweep(self, now: int, retention_ms: int) -> SweepResult:
        return await self._run(self.db.sweep, now, retention_ms)
