"""One workspace at run time: its store, its broker link, its sessions and subscribers.

The link (:meth:`Workspace.run_link`) keeps one WebSocket to the broker:
signed hello, reconnect with exponential backoff and jitter (1 s up to
30 s), a ping every 30 s.  While connected it pumps due outbox rows,
stores pushes before acking them, and records receipts.  Each workspace
runs its own link task, so one broker being down never delays another.

Bodies: direct messages are ``crypto_box`` from the member key (or the
sending session's key) to the target key.  Everything else is a secretbox
under ``crypto.topic_key(root key, mesh id, topic id, 0)`` with topic id
``all`` for ``*``/``@all``, ``group:<name>`` for ``@<name>``, and the
topic's own id for ``#<topic>``; the topic id rides in the ``topic`` field.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import random
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from claudemesh.shared.protocol import crypto, errors, wire
from claudemesh.shared.protocol.errors import CryptoError, RemoteProtocolError

from .home import WorkspaceConfig
from .store import Store, now_ms

log = logging.getLogger("claudemesh.daemon.link")

BACKOFF_MIN_S: Final = 1.0
BACKOFF_MAX_S: Final = 30.0
PING_EVERY_S: Final = 30.0
PONG_TIMEOUT_S: Final = 45.0
CONNECT_TIMEOUT_S: Final = 10.0
REQUEST_TIMEOUT_S: Final = 10.0
#: Outbox retry delays (seconds) after each failed attempt, capped at the last.
RETRY_DELAYS_S: Final = (1, 2, 4, 8, 16, 30)
#: Broker error codes after which a retry cannot succeed.
PERMANENT_CODES: Final = frozenset(
    {
        errors.UNKNOWN_TARGET,
        errors.FORBIDDEN,
        errors.PAYLOAD_TOO_LARGE,
        errors.INVALID_FIELD,
        errors.IDEMPOTENCY_CONFLICT,
        errors.MALFORMED,
        errors.REVOKED,
    }
)
#: The longest ``retry_after_ms`` hint from the broker that is honoured.
MAX_RETRY_AFTER_MS: Final = 3600_000
NET_ERRORS: Final = (OSError, HandshakeError, ConnectionClosed, trio.TooSlowError)


class LinkDown(Exception):
    """The broker link is not connected (or dropped while waiting)."""


class BrokerRefused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def collapse(eg: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception worth handling in a nursery's group (Cancelled stays a group)."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for x in e.exceptions:
                walk(x)
        else:
            leaves.append(e)

    walk(eg)
    if any(not isinstance(e, Exception) for e in leaves):
        return eg  # cancellation or KeyboardInterrupt: let it propagate as is
    return leaves[0]


def net_reason(exc: BaseException) -> str:
    """Why a connection failed, in words (trio-websocket's HandshakeError has none itself)."""
    for e in (exc, exc.__context__, exc.__cause__):
        if e is not None and str(e):
            return str(e)
    return type(exc).__name__


def topic_id_for(target_spec: str) -> str | None:
    """The topic id whose key encrypts a non-direct message (None: direct)."""
    if target_spec in ("*", "@all"):
        return "all"
    if target_spec.startswith("@"):
        return f"group:{target_spec[1:]}"
    if target_spec.startswith("#"):
        return target_spec[1:]
    return None


def retry_delay_ms(attempts: int) -> int:
    base = RETRY_DELAYS_S[min(max(attempts, 1), len(RETRY_DELAYS_S)) - 1]
    return int(base * 1000 * random.uniform(0.8, 1.2))


def _sane_ms(value: int | None) -> int:
    """A broker-supplied time, or now when it is missing or out of SQLite's range."""
    if value is None or not 0 < value < 2**62:
        return now_ms()
    return value


def iso_to_ms(text: str) -> int:
    try:
        return int(dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return now_ms()


async def broker_call(url: str, frame: wire.Frame, req_id: str) -> wire.Frame:
    """A pre-hello request on a short-lived connection (mesh_create, invite_claim)."""
    try:
        with trio.fail_after(REQUEST_TIMEOUT_S):
            async with open_websocket_url(url) as ws:
                await ws.send_message(wire.encode_frame(frame).decode())
                while True:
                    reply = wire.decode_frame(await ws.get_message())
                    if getattr(reply, "id", None) == req_id or isinstance(reply, wire.Error):
                        return reply
    except NET_ERRORS as exc:
        raise LinkDown(f"cannot reach the broker at {url}: {net_reason(exc)}") from None
    except RemoteProtocolError as exc:
        raise LinkDown(f"the broker at {url} sent a bad frame: {exc.message}") from None


def _failed_reason(exc: BaseException) -> str:
    """The short, stable reason a ``failed`` receipt gives for an unreadable push."""
    if isinstance(exc, UnicodeDecodeError):
        return "not_utf8"
    if isinstance(exc, CryptoError) and exc.code == errors.UNKNOWN_TARGET:
        return "unknown_key"
    return "undecryptable"


@dataclass
class Session:
    session_id: str
    pid: int
    cwd: str
    keypair: crypto.KeyPair
    starttime: str | None
    watch_pid: int
    presented: bool = False

    @property
    def pubkey(self) -> str:
        return self.keypair.public_hex


def proc_starttime(pid: int) -> str | None:
    """Start time of ``pid`` (Linux /proc), so a reused pid is not taken for ours."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def pid_alive(pid: int, starttime: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if starttime is not None and Path("/proc").exists():
        return proc_starttime(pid) == starttime
    return True


@dataclass
class _Waiter:
    event: trio.Event = field(default_factory=trio.Event)
    frame: wire.Frame | None = None


class Workspace:
    """Everything the daemon runs for one workspace."""

    def __init__(
        self, cfg: WorkspaceConfig, store: Store, root_secret: bytes, device_id: str, home: Path
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.root_secret = root_secret
        self.device_id = device_id
        self.home = home
        self.member = crypto.KeyPair(crypto.member_seed(root_secret, cfg.key_id))
        self.link_state = "connecting"
        self.last_error: str | None = None
        self.server_offset_ms: int | None = None
        self.sessions: dict[str, Session] = {}
        self.peers: list[dict[str, Any]] = []
        self.status = "idle"
        self.summary = ""
        self._ws: WebSocketConnection | None = None
        self._send_lock = trio.Lock()
        self._surface_lock = trio.Lock()
        self._failed_lock = trio.Lock()
        self._waiters: dict[str, _Waiter] = {}
        self._wake_outbox = trio.Event()
        self._changed = trio.Event()
        self._connected = trio.Event()
        self._counter = 0
        self._fresh: list[dict[str, Any]] = []
        self._claim_now = False
        self._claim_hint: int | None = None
        self._pending_acks: list[wire.Ack] = []
        self._pending_receipts: list[wire.Receipt] = []
        self._batch_ready = trio.Event()
        self.cancel_scope = trio.CancelScope()
        self.stopped = trio.Event()
        #: Test hook: store pushes but never ack them, to show that a crash
        #: between the inbox commit and the ack still yields one inbox row.
        self.hold_acks = os.environ.get("CLAUDEMESH_TEST_HOLD_ACKS") == "1"

    # --------------------------------------------------------- notifications

    @property
    def name(self) -> str:
        return self.cfg.name

    def notify(self) -> None:
        """Wake subscribers and waiters: something new is in the store."""
        self._changed.set()
        self._changed = trio.Event()

    @property
    def changed(self) -> trio.Event:
        return self._changed

    def wake_outbox(self) -> None:
        """Something in the store became due (a requeue, a pending accept)."""
        self._claim_now = True
        self._wake_outbox.set()

    @property
    def link_up(self) -> bool:
        return self._ws is not None

    def topic_key(self, topic_id: str, epoch: int = 0) -> bytes:
        return crypto.topic_key(self.cfg.root_key_bytes, self.cfg.mesh_id, topic_id, epoch)

    def session_by_pubkey(self, pubkey: str) -> Session | None:
        for s in self.sessions.values():
            if s.pubkey == pubkey:
                return s
        return None

    def next_id(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}-{self._counter}"

    # ----------------------------------------------------------------- start

    async def load(self) -> None:
        """Restore what survives a restart: inflight rows, peers cache, sessions."""
        await self.store.reset_inflight()
        self.peers = (await self.store.kv_get("peers")) or []
        saved = (await self.store.kv_get("sessions")) or {}
        for sid, s in saved.items():
            if pid_alive(s["watch_pid"], s.get("starttime")):
                self.add_session(sid, s["pid"], s["cwd"], s["watch_pid"], s.get("starttime"))
        await self.save_sessions()

    def add_session(
        self, sid: str, pid: int, cwd: str, watch_pid: int, starttime: str | None
    ) -> Session:
        kp = crypto.KeyPair(crypto.session_seed(self.root_secret, self.cfg.key_id, sid))
        s = Session(sid, pid, cwd, kp, starttime, watch_pid)
        self.sessions[sid] = s
        return s

    async def save_sessions(self) -> None:
        await self.store.kv_set(
            "sessions",
            {
                sid: {
                    "pid": s.pid,
                    "cwd": s.cwd,
                    "watch_pid": s.watch_pid,
                    "starttime": s.starttime,
                }
                for sid, s in self.sessions.items()
            },
        )

    # ------------------------------------------------------------ the link

    async def run_link(self) -> None:
        """Keep the broker link up until cancelled."""
        delay = BACKOFF_MIN_S
        while True:
            self.link_state = "connecting"
            try:
                try:
                    await self._connect_once()
                except BaseExceptionGroup as eg:
                    raise collapse(eg) from None
                delay = BACKOFF_MIN_S  # the link was up: start backing off afresh
            except BrokerRefused as exc:
                self.link_state = "refused"
                self.last_error = f"{exc.code}: {exc.message}"
                log.warning("broker refused %s: %s", self.name, self.last_error)
            except (*NET_ERRORS, RemoteProtocolError, LinkDown) as exc:
                self.last_error = net_reason(exc)
                log.info("link %s down: %s", self.name, self.last_error)
            except Exception as exc:  # a bug must not take the daemon down; retry
                self.last_error = f"internal: {type(exc).__name__}"
                log.exception("link %s failed", self.name)
            finally:
                self._ws = None
                self._pending_acks.clear()
                self._pending_receipts.clear()
                self._fresh.clear()
                if self._connected.is_set():
                    self._connected = trio.Event()
                for w in self._waiters.values():
                    w.event.set()
                for s in self.sessions.values():
                    s.presented = False
            with trio.CancelScope(shield=True):
                await self.store.reset_inflight()
            if self.link_state != "refused":
                self.link_state = "backoff"
            await trio.sleep(delay * random.uniform(0.5, 1.0) + 0.05)
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _connect_once(self) -> None:
        async with open_websocket_url(
            self.cfg.broker_url,
            max_message_size=wire.max_frame_bytes() * 2,
            connect_timeout=CONNECT_TIMEOUT_S,
            disconnect_timeout=2,
        ) as ws:
            await self._hello(ws)
            # Nothing is in flight on a new connection; accepts made while the
            # link was down (or racing its drop) are claimed by the pump.
            await self.store.reset_inflight()
            self._ws = ws
            self.link_state = "connected"
            self.last_error = None
            self._connected.set()
            log.info("link %s connected", self.name)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keepalive, ws)
                nursery.start_soon(self._pump_outbox)
                nursery.start_soon(self._commit_batches)
                nursery.start_soon(self._on_connected)
                await self._read_loop(ws)
                nursery.cancel_scope.cancel()

    async def _hello(self, ws: WebSocketConnection) -> None:
        ts = now_ms()
        pub = self.member.public_hex
        hello = wire.Hello(
            mesh_id=self.cfg.mesh_id,
            member_id=self.cfg.member_id,
            pubkey=pub,
            session_id=f"daemon-{self.device_id[:12]}",
            pid=os.getpid(),
            cwd="/",  # the broker has no use for our paths
            timestamp=ts,
            signature=self.member.sign(
                wire.hello_canonical(self.cfg.mesh_id, self.cfg.member_id, pub, ts)
            ),
            display_name=self.cfg.display_name,
            peer_type="human",
            hostname=socket.gethostname(),
            protocol_version=2,
            capabilities=["receipts", "sessions", "topics-e2e"],
            device_id=self.device_id,
        )
        await ws.send_message(wire.encode_frame(hello).decode())
        with trio.fail_after(REQUEST_TIMEOUT_S):
            reply = wire.decode_frame(await ws.get_message())
        if isinstance(reply, wire.Error):
            raise BrokerRefused(reply.code, reply.message)
        if not isinstance(reply, wire.HelloAck):
            raise BrokerRefused(errors.MALFORMED, f"expected hello_ack, got {type(reply).__name__}")
        if reply.server_time:
            self.server_offset_ms = reply.server_time - now_ms()
        if reply.role and reply.role != self.cfg.role:
            self.cfg.role = reply.role

    async def _keepalive(self, ws: WebSocketConnection) -> None:
        while True:
            await trio.sleep(PING_EVERY_S)
            with trio.fail_after(PONG_TIMEOUT_S):
                await ws.ping()

    async def send_frame(self, frame: wire.Frame) -> None:
        ws = self._ws
        if ws is None:
            raise LinkDown(f"not connected to the broker of {self.name}")
        async with self._send_lock:
            await ws.send_message(wire.encode_frame(frame).decode())

    async def request(
        self, frame: wire.Frame, req_id: str, *, wait_link_s: float = 0.0
    ) -> wire.Frame:
        """Send ``frame`` and wait for the frame answering ``req_id``.

        ``wait_link_s``: how long to wait for a link that is (re)connecting,
        so a request right after ``workspace.create`` or a restart succeeds.
        """
        if self._ws is None and wait_link_s > 0:
            with trio.move_on_after(wait_link_s):
                await self._connected.wait()
        w = _Waiter()
        self._waiters[req_id] = w
        try:
            await self.send_frame(frame)
            with trio.fail_after(REQUEST_TIMEOUT_S):
                await w.event.wait()
        except trio.TooSlowError:
            raise LinkDown(f"the broker of {self.name} did not answer in time") from None
        except NET_ERRORS as exc:
            raise LinkDown(f"the link to {self.name} dropped: {exc}") from None
        finally:
            self._waiters.pop(req_id, None)
        if w.frame is None:
            raise LinkDown(f"the link to {self.name} dropped")
        return w.frame

    async def _on_connected(self) -> None:
        for s in list(self.sessions.values()):
            with contextlib.suppress(LinkDown, BrokerRefused, *NET_ERRORS):
                await self.present_session(s)
        with contextlib.suppress(LinkDown, *NET_ERRORS):
            await self.flush_surfaced()
        with contextlib.suppress(LinkDown, *NET_ERRORS):
            await self.flush_failed()
        with contextlib.suppress(LinkDown, *NET_ERRORS):
            if self.status != "idle":
                await self.send_frame(wire.SetStatus(status=self.status))  # type: ignore[arg-type]
            if self.summary:
                await self.send_frame(wire.SetSummary(summary=self.summary))
            await self.refresh_peers()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    # ---------------------------------------------------------- inbound

    async def _read_loop(self, ws: WebSocketConnection) -> None:
        while True:
            text = await ws.get_message()
            try:
                frame = wire.decode_frame(text)
            except RemoteProtocolError as exc:
                log.warning("bad frame from broker of %s: %s", self.name, exc.code)
                continue
            await self._dispatch(frame)

    async def _dispatch(self, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Push):
            if frame.subtype == "system":
                await self._system(frame)
            else:
                await self._receive(frame)
            return
        if isinstance(frame, wire.Ack):
            await self._ack(frame)
            return
        if isinstance(frame, wire.Receipt):
            await self._receipt(frame)
            return
        fid = getattr(frame, "id", None)
        if fid is not None and fid in self._waiters:
            w = self._waiters[fid]
            w.frame = frame
            w.event.set()
            return
        if isinstance(frame, wire.Error):
            if fid is not None and await self.store.get_outbox(fid) is not None:
                await self._send_failed(fid, frame.code, frame.message, frame.retry_after_ms)
            else:
                log.warning("broker error on %s: %s %s", self.name, frame.code, frame.message)

    async def _system(self, frame: wire.Push) -> None:
        data = dict(frame.event_data or {})

        def text(key: str) -> str:
            # eventData is free-form JSON: a mistyped value must not reach
            # the peer cache (names are compared as strings) or subscribers.
            v = data.get(key)
            return v if isinstance(v, str) else ""

        ev: dict[str, Any] = {
            "event": frame.event or "",
            "pubkey": text("pubkey"),
            "name": text("name"),
        }
        if data.get("isSession") is True:
            ev["is_session"] = True
        await self.store.add_event("peer", ev)
        if not wire.is_pubkey_hex(ev["pubkey"]):
            self.notify()
            return
        for p in self.peers:
            if p["pubkey"] == ev["pubkey"]:
                p["online"] = frame.event in ("peer_joined", "peer_returned")
        if frame.event == "peer_joined" and not any(
            p["pubkey"] == ev["pubkey"] for p in self.peers
        ):
            self.peers.append(
                {
                    "pubkey": ev["pubkey"],
                    "display_name": ev["name"],
                    "member_pubkey": text("memberPubkey") or ev["pubkey"],
                    "is_session": data.get("isSession") is True,
                    "online": True,
                    "groups": [],
                    "status": "idle",
                    "summary": "",
                }
            )
        self.notify()

    def _recipient_keypair(self, target: str | None) -> crypto.KeyPair | None:
        if not target or target == self.member.public_hex:
            return self.member
        s = self.session_by_pubkey(target)
        return s.keypair if s is not None else None

    async def _receive(self, frame: wire.Push) -> None:
        try:
            if frame.topic:
                body = crypto.secretbox_decrypt(
                    self.topic_key(frame.topic, frame.epoch or 0), frame.nonce, frame.ciphertext
                )
            else:
                kp = self._recipient_keypair(frame.target_pubkey)
                if kp is None:
                    raise CryptoError(
                        errors.UNKNOWN_TARGET,
                        f"addressed to {frame.target_pubkey}, a key this daemon does not hold",
                    )
                body = crypto.box_decrypt(
                    frame.nonce,
                    frame.ciphertext,
                    recipient=kp,
                    sender_pubkey_hex=frame.sender_pubkey,
                )
            text = body.decode("utf-8")
        except (CryptoError, UnicodeDecodeError) as exc:
            reason = exc.message if isinstance(exc, CryptoError) else "body is not UTF-8"
            log.warning("quarantined %s on %s: %s", frame.message_id, self.name, reason)
            await self.store.quarantine(
                frame.message_id,
                reason,
                wire.encode_frame(frame).decode(),
                receipt_reason=_failed_reason(exc),
            )
            # Ack first (or the broker pushes it forever), then tell the sender
            # it was not readable: its `failed` outranks the `delivered` the ack makes.
            await self._client_ack(broker_message_id=frame.message_id)
            self.notify()
            with contextlib.suppress(LinkDown, *NET_ERRORS):
                await self.flush_failed()
            return
        session_target = (
            frame.target_pubkey
            if frame.target_pubkey and self.session_by_pubkey(frame.target_pubkey)
            else None
        )
        msg = {
            "broker_message_id": frame.message_id,
            "client_message_id": frame.client_message_id,
            "from_pubkey": frame.sender_pubkey,
            "from_member_pubkey": frame.sender_member_pubkey or frame.sender_pubkey,
            "from_name": frame.sender_name or "",
            "to_key": frame.target_pubkey or self.member.public_hex,
            "target_spec": frame.target_spec,
            "priority": frame.priority,
            "body": text,
            "topic": frame.topic,
            "reply_to": frame.reply_to_id,
            "created_at": iso_to_ms(frame.created_at) if frame.created_at else now_ms(),
            "received_at": now_ms(),
        }
        await self.store.inbox_insert(msg, session_target)
        self.notify()
        # Stored (or already stored): only now may the broker forget it.
        await self._client_ack(broker_message_id=frame.message_id)

    async def _client_ack(self, **kw: str) -> None:
        if self.hold_acks and "broker_message_id" in kw:
            return
        with contextlib.suppress(LinkDown, *NET_ERRORS):
            await self.send_frame(wire.ClientAck(**kw))

    async def _receipt(self, frame: wire.Receipt) -> None:
        self._pending_receipts.append(frame)
        self._batch_ready.set()

    async def _commit_batches(self) -> None:
        """Record broker acks and receipts in batches: one transaction for many frames.

        Anything not yet committed when the link drops is redone: unrecorded
        acks leave rows inflight (resent, deduped by the broker), unrecorded
        receipts were never acked (the broker sends them again).
        """
        while True:
            await self._batch_ready.wait()
            self._batch_ready = trio.Event()
            acks, self._pending_acks = self._pending_acks, []
            receipts, self._pending_receipts = self._pending_receipts, []
            ok = [
                (f.client_message_id or f.id, f.message_id)
                for f in acks
                if f.queued and f.message_id
            ]
            if ok:
                await self.store.mark_sent(ok, now_ms())
            for f in acks:
                if not (f.queued and f.message_id):
                    err = f.error or wire.ErrorInfo(code=errors.INTERNAL, message="not queued")
                    await self._send_failed(
                        f.client_message_id or f.id, err.code, err.message, err.retry_after_ms
                    )
            items: list[tuple[str, str, str, int, str | None]] = []
            for r in receipts:
                cmid = r.client_message_id or await self._cmid_for(r.message_id)
                if cmid and r.recipient_pubkey:
                    items.append((cmid, r.recipient_pubkey, r.state, _sane_ms(r.at), r.reason))
            if items:
                await self.store.record_receipts(items)
            self.notify()
            for r in receipts:
                if r.receipt_id:
                    await self._client_ack(receipt_id=r.receipt_id)

    async def _cmid_for(self, broker_message_id: str) -> str | None:
        def job(db: Any) -> str | None:
            r = db.execute(
                "SELECT client_message_id FROM outbox WHERE broker_message_id=?",
                (broker_message_id,),
            ).fetchone()
            return str(r[0]) if r else None

        return await self.store.run(job)

    # --------------------------------------------------------- outbound

    async def _pump_outbox(self) -> None:
        """Send outbox rows: fresh accepts at once, everything else when due.

        A row accepted while the link is up is committed already ``inflight``
        (with a lease) and handed over in memory, so the common path needs no
        extra store job.  Rows that are pending, retrying or whose lease ran
        out are claimed from the store when due.
        """
        claim_at = 0
        while True:
            self._wake_outbox = trio.Event()
            fresh, self._fresh = self._fresh, []
            for row in fresh:
                await self._send_row(row)
            if now_ms() >= claim_at or self._claim_now:
                self._claim_now = False
                rows, due = await self.store.claim(now_ms(), limit=64)
                for row in rows:
                    await self._send_row(row)
                if len(rows) == 64:
                    continue
                claim_at = due if due is not None else now_ms() + 30_000
            if self._claim_hint is not None:
                claim_at = min(claim_at, self._claim_hint)
                self._claim_hint = None
            if self._fresh or self._claim_now:
                continue
            wait_s = min(30.0, max(0.0, (claim_at - now_ms()) / 1000))
            with trio.move_on_after(wait_s):
                await self._wake_outbox.wait()

    async def _send_row(self, row: dict[str, Any]) -> None:
        try:
            frame = self._encrypt(row)
        except CryptoError as exc:
            await self.store.mark_dead(row["client_message_id"], exc.message, now_ms())
            self.notify()
            return
        await self.send_frame(frame)

    def hand_over(self, row: dict[str, Any]) -> None:
        """A row just committed as ``inflight`` on a live link: send it now."""
        self._fresh.append(row)
        self._wake_outbox.set()

    def _encrypt(self, row: dict[str, Any]) -> wire.Send:
        body = row["body"].encode()
        sender = self.member
        from_session = None
        if row["session_id"] and row["session_id"] in self.sessions:
            s = self.sessions[row["session_id"]]
            sender, from_session = s.keypair, s.pubkey
        topic = row["topic"]
        if topic is None:
            nonce, ct = crypto.box_encrypt(
                body, sender=sender, recipient_pubkey_hex=row["target_spec"]
            )
            epoch = None
        else:
            nonce, ct = crypto.secretbox_encrypt(self.topic_key(topic), body)
            epoch = 0
        return wire.Send(
            id=row["client_message_id"],
            target_spec=row["target_spec"],
            priority=row["priority"],
            nonce=nonce,
            ciphertext=ct,
            client_message_id=row["client_message_id"],
            request_fingerprint=row["fingerprint"],
            reply_to_id=row["reply_to"],
            topic=topic,
            epoch=epoch,
            from_session=from_session,
        )

    async def _ack(self, frame: wire.Ack) -> None:
        self._pending_acks.append(frame)
        self._batch_ready.set()

    async def _send_failed(
        self, cmid: str, code: str, message: str, retry_after_ms: int | None = None
    ) -> None:
        reason = f"{code}: {message}" if message else code
        if code in PERMANENT_CODES:
            await self.store.mark_dead(cmid, reason, now_ms())
        else:
            row = await self.store.get_outbox(cmid)
            attempts = int(row["attempts"]) if row else 1
            # The broker's hint is capped: a huge value must not overflow SQLite.
            hint = min(max(retry_after_ms or 0, 0), MAX_RETRY_AFTER_MS)
            next_at = now_ms() + max(retry_delay_ms(attempts), hint)
            await self.store.mark_retry(cmid, reason, next_at)
            self._claim_hint = min(self._claim_hint or next_at, next_at)
            self._wake_outbox.set()
        self.notify()

    # ------------------------------------------------------- surfaced

    async def surface(self, inbox_ids: list[int]) -> None:
        """Mark rows seen and send each one's ``surfaced`` receipt once."""
        await self.store.take_unsurfaced(inbox_ids)
        with contextlib.suppress(LinkDown, *NET_ERRORS):
            await self.flush_surfaced()

    async def flush_surfaced(self) -> None:
        # One flush at a time: two readers taking the same rows would each
        # read them as unsent and send every surfaced receipt twice.
        async with self._surface_lock:
            rows = await self.store.take_unsurfaced()
            done = []
            try:
                for r in rows:
                    await self.send_frame(
                        wire.Receipt(message_id=r["broker_message_id"], state="surfaced")
                    )
                    done.append(r["id"])
            finally:
                if done:
                    with trio.CancelScope(shield=True):
                        await self.store.mark_surfaced_sent(done)

    async def flush_failed(self) -> None:
        """Send each owed ``failed`` receipt (quarantined pushes); forget those sent."""
        async with self._failed_lock:
            rows = await self.store.take_failed_out()
            done: list[str] = []
            try:
                for bmid, reason in rows:
                    await self.send_frame(
                        wire.Receipt(message_id=bmid, state="failed", reason=reason)
                    )
                    done.append(bmid)
            finally:
                if done:
                    with trio.CancelScope(shield=True):
                        await self.store.mark_failed_sent(done)

    # ---------------------------------------------------------- peers

    async def refresh_peers(self) -> list[dict[str, Any]]:
        rid = self.next_id("peers")
        reply = await self.request(wire.ListPeers(id=rid), rid)
        if isinstance(reply, wire.Error):
            raise BrokerRefused(reply.code, reply.message)
        if not isinstance(reply, wire.PeersList):
            raise LinkDown(f"unexpected {type(reply).__name__} to list_peers")
        peers = []
        for p in reply.peers:
            peers.append(
                {
                    "pubkey": p.pubkey,
                    "display_name": p.display_name,
                    "member_id": p.member_id,
                    "member_pubkey": p.member_pubkey or p.pubkey,
                    "online": p.online,
                    "status": p.status,
                    "summary": p.summary,
                    "groups": [g.name for g in p.groups],
                    "last_seen_at": iso_to_ms(p.last_seen_at) if p.last_seen_at else None,
                    "is_session": p.is_session,
                    "session_id": p.session_id or None,
                    "hostname": p.hostname,
                }
            )
        self.peers = peers
        await self.store.kv_set("peers", peers)
        return peers

    # -------------------------------------------------------- sessions

    async def present_session(self, s: Session) -> None:
        ts = now_ms()
        parent = self.member.public_hex
        expires = ts + 23 * 3600 * 1000
        rid = self.next_id("session")
        frame = wire.SessionHello(
            id=rid,
            session_pubkey=s.pubkey,
            session_id=s.session_id,
            timestamp=ts,
            signature=s.keypair.sign(
                wire.session_hello_canonical(self.cfg.mesh_id, parent, s.pubkey, ts)
            ),
            attestation=wire.SessionAttestation(
                parent_pk=parent,
                session_pk=s.pubkey,
                expires_at=expires,
                signature=self.member.sign(
                    wire.session_attest_canonical(parent, s.pubkey, expires)
                ),
            ),
            pid=s.pid,
            cwd=s.cwd,
            display_name=f"{self.cfg.display_name}/{s.session_id[:8]}",
            peer_type="ai",
        )
        reply = await self.request(frame, rid)
        if isinstance(reply, wire.Error):
            raise BrokerRefused(reply.code, reply.message)
        s.presented = True

    async def drop_session(self, sid: str) -> None:
        s = self.sessions.pop(sid, None)
        await self.save_sessions()
        if s is not None:
            with contextlib.suppress(LinkDown, *NET_ERRORS):
                await self.send_frame(wire.SessionBye(session_pubkey=s.pubkey))

    async def watch_sessions(self) -> None:
        """Forget sessions whose process has exited (checking pid reuse)."""
        while True:
            await trio.sleep(2.0)
            for sid, s in list(self.sessions.items()):
                if not pid_alive(s.watch_pid, s.starttime):
                    log.info("session %s of %s ended", sid, self.name)
                    await self.drop_session(sid)

    # ---------------------------------------------------------- status

    async def describe(self) -> dict[str, Any]:
        c = await self.store.counts()
        d: dict[str, Any] = {
            **self.cfg.public(),
            "member_pubkey": self.member.public_hex,
            "link": self.link_state,
            "outbox": {"pending": c["pending"], "inflight": c["inflight"], "dead": c["dead"]},
            "inbox_unread": c["inbox_unread"],
            "quarantined": c["quarantined"],
        }
        if self.last_error:
            d["last_error"] = self.last_error
        if self.server_offset_ms is not None:
            d["server_time_offset_ms"] = self.server_offset_ms
        return d


def message_view(row: dict[str, Any], workspace: Workspace, cursor: int) -> dict[str, Any]:
    """An inbox row as the ``Message`` of docs/ipc.md."""
    m: dict[str, Any] = {
        "cursor": cursor,
        "inbox_id": row["id"],
        "broker_message_id": row["broker_message_id"],
        "from_pubkey": row["from_pubkey"],
        "from_member_pubkey": row["from_member_pubkey"],
        "from_name": row["from_name"],
        "workspace": workspace.name,
        "mesh_id": workspace.cfg.mesh_id,
        "to": row["target_spec"] or row["to_key"],
        "to_key": row["to_key"],
        "priority": row["priority"],
        "body": row["body"],
        "created_at": row["created_at"],
        "received_at": row["received_at"],
        "seen": bool(row["seen"]),
    }
    for k in ("client_message_id", "topic", "reply_to"):
        if row.get(k):
            m[k] = row[k]
    return m
