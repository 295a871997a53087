"""The routing-only broker: WebSocket I/O, presence, routing, leases.

Rules of this module:

- Bytes are parsed only by :func:`claudemesh.shared.protocol.wire.decode_frame`;
  this module pumps messages, checks state and calls the :class:`Store`.
- Every frame a connection sends is written by that connection's writer task
  from one ordered channel, so an ``ack`` or ``push`` is never interleaved and
  per (sender, recipient) order is send order.
- A ``send`` is answered only after its queue rows are committed.  Sends from
  all connections are group-committed: one transaction per batch.
- A delivery *stream* is a recipient endpoint: a member's device or a
  presented session.  Live pushes go straight to the stream's connection;
  a stream that is catching up from the database (``flushing``) ignores live
  pushes and re-reads until it is level, so backlog and live rows stay in
  order.
- Presence is in memory.  A dropped connection lingers for the grace period;
  a reconnect within it is silent.
- Bad input never closes the connection (except a broken handshake or a
  WebSocket message over the frame cap), and never raises out of a handler.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import sys
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final, Generic, TypeVar, cast

import trio

from claudemesh.shared.protocol import crypto, errors, ids, wire
from claudemesh.shared.protocol.errors import RemoteProtocolError

from . import __version__
from .store import (
    DAY_MS,
    Delivery,
    HelloItem,
    HelloResult,
    Member,
    MeshIdTaken,
    ReceiptRow,
    SendItem,
    SendOutcome,
    Store,
    StoreError,
)
from .ws import ConnectionClosed, WebSocket, accept

#: Mesh ids a creator may propose: URL- and path-safe, bounded.
_MESH_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{8,64}")

I = TypeVar("I")  # noqa: E741

LOOPBACK: Final = frozenset({"127.0.0.1", "::1", "localhost"})
CLOSE_POLICY: Final = 1008
CLOSE_REVOKED: Final = 4002
CLOSE_TRY_LATER: Final = 1013
#: Pre-hello requests (mesh_create, invite_claim, errors) one connection may make.
MAX_PREHELLO_FRAMES: Final = 32
#: Longest ``reason`` a recipient may give in a ``failed`` receipt.
MAX_RECEIPT_REASON: Final = 200
#: Sessions one connection may present (each is a stream, a row and a peer).
MAX_SESSIONS_PER_CONN: Final = 256
#: Groups one connection may be in (each is a stored row and peers_list text).
MAX_GROUPS_PER_CONN: Final = 256
#: Longest text field of a presented session (``cwd``, names).
MAX_SESSION_TEXT: Final = 4096
#: Receipt ids remembered per connection so their acks skip the rate limit.
MAX_TRACKED_RECEIPTS: Final = 100_000
FEATURES: Final = [
    "offline_queue",
    "dedupe",
    "receipts",
    "sessions",
    "devices",
    "invites",
    "mesh_create",
]


def now_ms() -> int:
    return int(time.time() * 1000)


def iso(ms: int) -> str:
    return (
        datetime.fromtimestamp(ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def log(event: str, **fields: Any) -> None:
    """One JSON line on stderr.  Never pass secrets or bodies here."""
    fields = {"ts": iso(now_ms()), "event": event, **fields}
    sys.stderr.write(json.dumps(fields, default=str) + "\n")
    sys.stderr.flush()


@dataclass(slots=True)
class BrokerConfig:
    """Every knob of a running broker; intervals are seconds of trio time."""

    host: str = "127.0.0.1"
    port: int = 7900
    create_token: str | None = None
    ping_interval: float = 30.0
    silence_timeout: float = 75.0
    grace: float = 90.0
    lease: float = 30.0
    hello_timeout: float = 30.0
    sweep_interval: float = 60.0
    #: How often live connections are checked against revocations made by the
    #: admin CLI (another process writing the same database).
    revocation_interval: float = 5.0
    ttl_ms: int = 7 * DAY_MS
    retention_ms: int = 7 * DAY_MS
    skew_ms: int = 60_000
    max_ciphertext: int = wire.MAX_CIPHERTEXT
    rate_per_second: float = 500.0
    rate_burst: int = 2000
    max_conns_per_mesh: int = 2000
    max_conns_total: int = 20000
    #: Connections that have not said hello yet (they count in no other cap).
    max_handshaking: int = 4096
    max_inflight_sends: int = 64
    outgoing_buffer: int = 20000
    #: Bytes of frames queued for one connection before it is dropped as a
    #: slow consumer (the frame count alone lets one silent peer pin gigabytes).
    outgoing_bytes: int = 32 * 1024 * 1024

    @property
    def max_frame(self) -> int:
        return wire.max_frame_bytes(self.max_ciphertext)


class _Close:
    """Sentinel on a connection's outgoing channel: close with this code."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


Outgoing = str | _Close


@dataclass(slots=True)
class TokenBucket:
    rate: float
    burst: float
    tokens: float
    stamp: float

    def take(self, now: float) -> float:
        """Spend one token; return 0 on success or seconds until one is free."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate if self.rate > 0 else 1.0


@dataclass(eq=False, slots=True)
class SessionPresence:
    pubkey: str
    session_id: str
    conn: Conn
    display_name: str | None
    pid: int | None
    cwd: str | None
    peer_type: str | None
    expires_at: int
    connected_at: int
    status: wire.PeerStatus = "idle"
    summary: str = ""


@dataclass(slots=True)
class _Inflight:
    message_id: str
    text: str
    pushed_at: float
    expires_ms: int
    client_message_id: str | None = None


@dataclass(eq=False, slots=True)
class Conn:
    """One WebSocket connection and the presence it carries after hello."""

    ws: WebSocket
    out: trio.MemorySendChannel[Outgoing]
    cancel: trio.CancelScope
    remote: str
    member: Member | None = None
    mesh_id: str = ""
    device_id: str = ""
    presence_id: str = ""
    hello: wire.Hello | None = None
    status: wire.PeerStatus = "idle"
    summary: str = ""
    groups: list[wire.GroupRef] = field(default_factory=list)
    connected_at: int = 0
    last_heard: float = 0.0
    sessions: dict[str, SessionPresence] = field(default_factory=dict)
    inflight: dict[int, _Inflight] = field(default_factory=dict)
    by_message: dict[str, set[int]] = field(default_factory=dict)
    stream_keys: set[tuple[str, str, str]] = field(default_factory=set)
    bucket: TokenBucket | None = None
    send_slots: trio.Semaphore | None = None
    closed: bool = False
    #: Counted in ``Broker.handshaking`` until its hello is accepted.
    in_handshake: bool = True
    #: Bytes queued on ``out`` and not yet written to the socket.
    out_bytes: int = 0
    #: Receipt ids pushed on this connection and not acked yet (bounded).
    receipts_out: set[str] = field(default_factory=set)


@dataclass(eq=False, slots=True)
class Stream:
    """A recipient endpoint (member device or session) bound to one connection."""

    key: tuple[str, str, str]
    conn: Conn
    cursor: int = 0
    flushing: bool = True
    dirty: bool = False


@dataclass(eq=False, slots=True)
class _Linger:
    info: wire.PeerInfo
    mesh_id: str
    event_data: dict[str, Any]


@dataclass(slots=True)
class _AckJob:
    """A ``client_ack``: of a delivery (message id) or of a receipt (``other``)."""

    conn: Conn
    message_id: str | None
    other: str | None


@dataclass(slots=True)
class _PendingSend:
    conn: Conn
    frame_id: str
    item: SendItem


class _Batcher(Generic[I]):
    """Collects items from many tasks; one worker hands each batch to ``fn``."""

    def __init__(self, fn: Callable[[list[I]], Awaitable[None]], max_batch: int = 512) -> None:
        self._fn = fn
        self._max = max_batch
        self._send, self._recv = trio.open_memory_channel[I](math.inf)

    def put(self, item: I) -> None:
        self._send.send_nowait(item)

    async def run(self) -> None:
        while True:
            batch = [await self._recv.receive()]
            while len(batch) < self._max:
                try:
                    batch.append(self._recv.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                await self._fn(batch)
            except Exception as exc:  # keep batching; one bad batch must not stop the broker
                log("internal_error", error=repr(exc), trace=_trace(exc))


R = TypeVar("R")


class _CallBatcher(Generic[I, R]):
    """Like :class:`_Batcher`, but each caller awaits its own result."""

    def __init__(self, fn: Callable[[list[I]], Awaitable[list[R]]], max_batch: int = 256) -> None:
        self._fn = fn
        self._batcher: _Batcher[tuple[I, list[R | BaseException], trio.Event]] = _Batcher(
            self._run_batch, max_batch
        )

    async def call(self, item: I) -> R:
        slot: list[R | BaseException] = []
        done = trio.Event()
        self._batcher.put((item, slot, done))
        await done.wait()
        value = slot[0]
        if isinstance(value, BaseException):
            raise value
        return value

    async def _run_batch(self, batch: list[tuple[I, list[R | BaseException], trio.Event]]) -> None:
        try:
            results: list[R | BaseException] = list(await self._fn([b[0] for b in batch]))
        except Exception as exc:
            log("store_error", error=repr(exc))
            results = [StoreError(errors.INTERNAL, "the broker could not store this")] * len(batch)
        for (_, slot, done), value in zip(batch, results, strict=True):
            slot.append(value)
            done.set()

    async def run(self) -> None:
        await self._batcher.run()


class Broker:
    """State and behaviour of one broker process over a :class:`Store`."""

    def __init__(self, store: Store, config: BrokerConfig) -> None:
        self.store = store
        self.config = config
        self.mesh_conns: dict[str, set[Conn]] = {}
        self.member_conns: dict[str, set[Conn]] = {}
        self.session_conn: dict[tuple[str, str], Conn] = {}
        self._pending_hellos: dict[str, int] = {}
        self._hello_expiry: deque[tuple[int, str]] = deque()
        self.streams: dict[tuple[str, str, str], Stream] = {}
        self.lingering: dict[tuple[str, str, str], _Linger] = {}
        self.seen_hellos: dict[str, int] = {}
        self.total_conns = 0
        self.handshaking = 0
        self.port = 0
        self._nursery: trio.Nursery | None = None
        # Sends and acks share one batcher, so a round is one transaction.
        self._writes: _Batcher[_PendingSend | _AckJob] = _Batcher(self._commit_round)
        self._hellos: _CallBatcher[HelloItem, HelloResult] = _CallBatcher(self.store.hello_many)
        self._seen: _Batcher[tuple[str, str]] = _Batcher(self._commit_seen)
        self.stats: dict[str, int] = {
            "sends": 0,
            "duplicates": 0,
            "pushes": 0,
            "redeliveries": 0,
            "acks": 0,
            "errors": 0,
            "batches": 0,
            "batched_sends": 0,
            "ack_batches": 0,
        }

    def statistics(self) -> dict[str, int]:
        return {
            **self.stats,
            "connections": self.total_conns,
            "streams": len(self.streams),
            "lingering": len(self.lingering),
        }

    @property
    def loopback(self) -> bool:
        return self.config.host in LOOPBACK

    # ----------------------------------------------------------- serving

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; ``task_status.started(port)`` once bound."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._writes.run)
            nursery.start_soon(self._hellos.run)
            nursery.start_soon(self._seen.run)
            nursery.start_soon(self._lease_loop)
            nursery.start_soon(self._sweep_loop)
            nursery.start_soon(self._revocation_loop)
            listeners = await nursery.start(
                partial(
                    trio.serve_tcp,
                    self._handle,
                    self.config.port,
                    host=self.config.host,
                    handler_nursery=nursery,
                )
            )
            self.port = listeners[0].socket.getsockname()[1]
            log(
                "listening",
                host=self.config.host,
                port=self.port,
                url=f"ws://{self.config.host}:{self.port}/ws",
            )
            task_status.started(self.port)

    async def _handle(self, stream: trio.SocketStream) -> None:
        # Runs in the server's nursery: anything escaping here would stop the
        # whole broker, so one connection's failure is logged and contained.
        if self.handshaking >= self.config.max_handshaking:
            log("refused", code=errors.TOO_MANY_CONNECTIONS, stage="before hello")
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()
            return
        self.handshaking += 1
        handed_over = False
        try:
            async with stream:
                ws: WebSocket | None = None
                with trio.move_on_after(self.config.hello_timeout):
                    ws = await accept(stream, path="/ws", max_message=self.config.max_frame)
                if ws is None:
                    return
                handed_over = True  # _serve_ws gives the handshake slot back
                await self._serve_ws(ws)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception as exc:
            log("connection_error", error=type(exc).__name__, detail=str(exc)[:200])
        finally:
            if not handed_over:
                self.handshaking -= 1

    async def _serve_ws(self, ws: WebSocket) -> None:
        send, recv = trio.open_memory_channel[Outgoing](self.config.outgoing_buffer)
        remote = ws.remote
        conn = Conn(ws=ws, out=send, cancel=trio.CancelScope(), remote=remote)
        try:
            async with trio.open_nursery() as nursery:
                conn.cancel = nursery.cancel_scope
                conn.last_heard = trio.current_time()
                nursery.start_soon(self._writer, conn, recv)
                try:
                    await self._reader(conn, nursery)
                except ConnectionClosed:
                    pass
                finally:
                    conn.closed = True
                    nursery.cancel_scope.cancel()
        except Exception as exc:  # a bug must cost one connection, never the broker
            log("internal_error", remote=remote, error=repr(exc), trace=_trace(exc))
        finally:
            self._end_handshake(conn)
            with trio.CancelScope(shield=True):
                with trio.move_on_after(5):
                    await self._disconnected(conn)
                with trio.move_on_after(1):
                    await ws.aclose()

    def _end_handshake(self, conn: Conn) -> None:
        if conn.in_handshake:
            conn.in_handshake = False
            self.handshaking -= 1

    async def _writer(self, conn: Conn, recv: trio.MemoryReceiveChannel[Outgoing]) -> None:
        """Write queued frames in order, many per socket write when they pile up."""
        try:
            async for item in recv:
                texts: list[str] = []
                while not isinstance(item, _Close):
                    texts.append(item)
                    if len(texts) >= 256:
                        break
                    try:
                        item = recv.receive_nowait()
                    except trio.WouldBlock:
                        break
                if texts:
                    await conn.ws.send_texts(texts)
                    conn.out_bytes -= sum(len(t) for t in texts)
                if isinstance(item, _Close):
                    await conn.ws.send_close(item.code, item.reason)
                    # The reading task ends the connection when the peer answers.
                    await trio.sleep(2)
                    break
        except ConnectionClosed:
            pass
        conn.cancel.cancel()

    def _emit(self, conn: Conn, frame: wire.Frame) -> None:
        self._emit_text(conn, wire.encode_frame(frame).decode())

    def _emit_text(self, conn: Conn, text: str) -> None:
        if conn.closed:
            return
        try:
            if conn.out_bytes + len(text) > self.config.outgoing_bytes:
                raise trio.WouldBlock
            conn.out.send_nowait(text)
            conn.out_bytes += len(text)
        except trio.WouldBlock:
            log("slow_consumer", remote=conn.remote, member=conn.member and conn.member.id)
            conn.closed = True
            conn.cancel.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            conn.closed = True

    def _error(self, conn: Conn, code: str, message: str, id: str | None = None) -> None:
        self.stats["errors"] += 1
        self._emit(conn, wire.Error(code=code, message=message, id=id))

    async def _refuse(self, conn: Conn, code: str, message: str, close: int) -> None:
        """Handshake refusal: an error frame, then close."""
        self.stats["errors"] += 1
        log("refused", remote=conn.remote, code=code)
        # Through the writer, so the frames queued before this one go first.
        self._emit(conn, wire.Error(code=code, message=message))
        try:
            conn.out.send_nowait(_Close(close, code))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        with trio.move_on_after(2):
            await conn.ws.drain()

    # ----------------------------------------------------------- reading

    async def _reader(self, conn: Conn, nursery: trio.Nursery) -> None:
        # Before hello: pre-hello requests, within the hello timeout.
        with trio.move_on_after(self.config.hello_timeout) as cs:
            frames = 0
            while True:
                msg = await conn.ws.get_message()
                frames += 1
                if frames > MAX_PREHELLO_FRAMES:
                    await self._refuse(
                        conn, errors.RATE_LIMITED, "too many frames before hello", CLOSE_POLICY
                    )
                    return
                try:
                    frame = wire.decode_frame(msg)
                except RemoteProtocolError as exc:
                    self._error(conn, exc.code, exc.message)
                    continue
                if isinstance(frame, wire.Hello):
                    if not await self._hello(conn, frame):
                        return
                    self._end_handshake(conn)
                    break
                if isinstance(frame, wire.MeshCreate):
                    await self._mesh_create(conn, frame)
                elif isinstance(frame, wire.InviteClaim):
                    await self._invite_claim(conn, frame)
                else:
                    self._error(conn, errors.NO_HELLO, "send hello first", _frame_id(frame))
        if cs.cancelled_caught:
            await self._refuse(conn, errors.NO_HELLO, "no hello in time", CLOSE_POLICY)
            return
        nursery.start_soon(self._keepalive, conn)
        while True:
            msg = await conn.ws.get_message()
            conn.last_heard = trio.current_time()
            try:
                frame = wire.decode_frame(msg)
            except RemoteProtocolError as exc:
                self._error(conn, exc.code, exc.message)
                continue
            assert conn.bucket is not None
            # Acks answer our own pushes: limiting them would only cause
            # redelivery.  Acks of nothing we pushed here pay like any frame.
            wait = (
                0.0
                if isinstance(frame, wire.ClientAck) and _answers_push(conn, frame)
                else conn.bucket.take(trio.current_time())
            )
            if wait:
                self._rate_limited(conn, frame, wait)
                continue
            try:
                await self._dispatch(conn, frame)
            except StoreError as exc:
                self._error(conn, exc.code, exc.message, _frame_id(frame))

    def _rate_limited(self, conn: Conn, frame: wire.Frame, wait: float) -> None:
        retry = max(1, math.ceil(wait * 1000))
        text = f"too many frames; retry after {retry} ms"
        self.stats["errors"] += 1
        if isinstance(frame, wire.Send):
            self._emit(
                conn,
                wire.Ack(
                    id=frame.id,
                    queued=False,
                    client_message_id=frame.client_message_id,
                    error=wire.ErrorInfo(
                        code=errors.RATE_LIMITED, message=text, retry_after_ms=retry
                    ),
                ),
            )
        else:
            self._emit(
                conn,
                wire.Error(
                    code=errors.RATE_LIMITED,
                    message=text,
                    id=_frame_id(frame),
                    retry_after_ms=retry,
                ),
            )

    async def _dispatch(self, conn: Conn, frame: wire.Frame) -> None:
        match frame:
            case wire.Send():
                await self._send(conn, frame)
            case wire.ClientAck():
                self._client_ack(conn, frame)
            case wire.Receipt():
                await self._receipt(conn, frame)
            case wire.ListPeers():
                await self._list_peers(conn, frame)
            case wire.SetStatus():
                self._set_status(conn, frame)
            case wire.SetSummary():
                self._set_summary(conn, frame)
            case wire.JoinGroup() | wire.LeaveGroup():
                await self._group(conn, frame)
            case wire.SessionHello():
                await self._session_hello(conn, frame)
            case wire.SessionBye():
                await self._session_bye(conn, frame)
            case wire.InvitePut():
                await self._invite_put(conn, frame)
            case wire.InviteRevoke():
                await self._invite_revoke(conn, frame)
            case wire.Hello():
                self._error(conn, errors.INVALID_FIELD, "already said hello")
            case wire.MeshCreate():
                await self._mesh_create(conn, frame)
            case wire.InviteClaim():
                await self._invite_claim(conn, frame)
            case _:
                self._error(
                    conn,
                    errors.UNKNOWN_TYPE,
                    f"{type(frame).__name__} is not a frame a peer sends",
                    _frame_id(frame),
                )

    async def _keepalive(self, conn: Conn) -> None:
        cfg = self.config
        while True:
            await trio.sleep(cfg.ping_interval)
            with trio.move_on_after(cfg.silence_timeout):
                try:
                    await conn.ws.ping()
                except ConnectionClosed:
                    return
                conn.last_heard = trio.current_time()
            if trio.current_time() - conn.last_heard >= cfg.silence_timeout:
                log("silent_drop", remote=conn.remote, member=conn.member and conn.member.id)
                conn.cancel.cancel()
                return

    # --------------------------------------------------------- handshake

    def _skewed(self, ts: int) -> bool:
        return abs(now_ms() - ts) > self.config.skew_ms

    async def _hello(self, conn: Conn, h: wire.Hello) -> bool:
        cfg = self.config
        if self._skewed(h.timestamp):
            await self._refuse(
                conn, errors.TIMESTAMP_SKEW, "hello timestamp is more than 60 s off", CLOSE_POLICY
            )
            return False
        canonical = wire.hello_canonical(h.mesh_id, h.member_id, h.pubkey, h.timestamp)
        if not wire.is_pubkey_hex(h.pubkey) or not crypto.verify(h.pubkey, canonical, h.signature):
            await self._refuse(conn, errors.BAD_SIGNATURE, "hello signature fails", CLOSE_POLICY)
            return False
        now = now_ms()
        while self._hello_expiry and self._hello_expiry[0][0] < now:
            self.seen_hellos.pop(self._hello_expiry.popleft()[1], None)
        # The replay key is the signature's bytes: hex accepts upper case and
        # spaces, so the string as sent would let a respelled replay through.
        sig_key = bytes.fromhex(h.signature).hex()
        if sig_key in self.seen_hellos:
            await self._refuse(
                conn, errors.BAD_SIGNATURE, "this hello was already used (replay)", CLOSE_POLICY
            )
            return False
        # Hellos still in the store count too, so concurrent ones cannot overshoot a cap.
        pending_here = self._pending_hellos.get(h.mesh_id, 0)
        if (
            len(self.mesh_conns.get(h.mesh_id, ())) + pending_here >= cfg.max_conns_per_mesh
            or self.total_conns + sum(self._pending_hellos.values()) >= cfg.max_conns_total
        ):
            await self._refuse(
                conn, errors.TOO_MANY_CONNECTIONS, "connection cap reached", CLOSE_TRY_LATER
            )
            return False
        device_id = h.device_id or ""
        if len(device_id) > 128:
            await self._refuse(
                conn, errors.INVALID_FIELD, "hello: field `deviceId` too long", CLOSE_POLICY
            )
            return False
        self.seen_hellos[sig_key] = now + 2 * cfg.skew_ms
        self._hello_expiry.append((now + 2 * cfg.skew_ms, sig_key))
        groups = tuple((g.name, g.role) for g in h.groups) if h.groups is not None else None
        self._pending_hellos[h.mesh_id] = pending_here + 1
        try:
            res = await self._hellos.call(
                HelloItem(h.member_id, h.mesh_id, h.pubkey, device_id, groups, now)
            )
        finally:
            left = self._pending_hellos[h.mesh_id] - 1
            if left:
                self._pending_hellos[h.mesh_id] = left
            else:
                del self._pending_hellos[h.mesh_id]
        if res.error == errors.REVOKED:
            await self._refuse(conn, errors.REVOKED, "this member was revoked", CLOSE_REVOKED)
            return False
        if res.member is None:
            await self._refuse(conn, errors.UNAUTHORIZED, "not a member of this mesh", CLOSE_POLICY)
            return False
        member = res.member
        seen_before = res.seen_before
        conn.member = member
        conn.mesh_id = member.mesh_id
        conn.device_id = device_id
        conn.hello = h
        conn.presence_id = ids.uuid7()
        conn.connected_at = now
        conn.groups = (
            list(h.groups)
            if h.groups is not None
            else [wire.GroupRef(name=n, role=r) for n, r in member.groups]
        )
        conn.bucket = TokenBucket(
            cfg.rate_per_second, cfg.rate_burst, cfg.rate_burst, trio.current_time()
        )
        conn.send_slots = trio.Semaphore(cfg.max_inflight_sends)
        self.mesh_conns.setdefault(conn.mesh_id, set()).add(conn)
        self.member_conns.setdefault(member.id, set()).add(conn)
        self.total_conns += 1
        self._emit(
            conn,
            wire.HelloAck(
                presence_id=conn.presence_id,
                member_display_name=member.display_name,
                member_id=member.id,
                mesh_id=member.mesh_id,
                role=member.role,
                server_version=__version__,
                server_time=now_ms(),
                features=FEATURES,
                limits=wire.Limits(
                    max_ciphertext=cfg.max_ciphertext,
                    max_frame=cfg.max_frame,
                    rate_per_second=cfg.rate_per_second,
                    rate_burst=cfg.rate_burst,
                ),
            ),
        )
        log("hello", member=member.id, mesh=member.mesh_id, device=device_id, remote=conn.remote)
        lkey = ("m", member.id, device_id)
        resumed = self.lingering.pop(lkey, None) is not None
        if not resumed:
            others = len(self.member_conns[member.id]) > 1 or any(
                k[0] == "m" and k[1] == member.id for k in self.lingering
            )
            event = "peer_returned" if seen_before and not others else "peer_joined"
            self._system(conn.mesh_id, event, self._member_event(conn), exclude=conn)
        self._open_stream(("m", member.id, device_id), conn)
        for r in res.receipts:
            self._emit_receipt(conn, r)
        return True

    def _member_event(self, conn: Conn) -> dict[str, Any]:
        assert conn.member is not None
        return {
            "pubkey": conn.member.pubkey,
            "name": conn.member.display_name,
            "memberPubkey": conn.member.pubkey,
            "isSession": False,
        }

    async def _mesh_create(self, conn: Conn, f: wire.MeshCreate) -> None:
        if not self.loopback:
            token = self.config.create_token
            if (
                token is None
                or f.create_token is None
                or not hmac.compare_digest(token.encode(), f.create_token.encode())
            ):
                self._error(conn, errors.FORBIDDEN, "mesh creation needs the create token", f.id)
                return
        if not f.name or len(f.name) > 200:
            self._error(conn, errors.INVALID_FIELD, "mesh_create: field `name` empty or long", f.id)
            return
        if len(f.display_name) > 200:
            self._error(conn, errors.INVALID_FIELD, "mesh_create: `displayName` too long", f.id)
            return
        if self._skewed(f.timestamp):
            self._error(conn, errors.TIMESTAMP_SKEW, "timestamp is more than 60 s off", f.id)
            return
        canonical = wire.mesh_create_canonical(f.name, f.pubkey, f.timestamp)
        if not wire.is_pubkey_hex(f.pubkey) or not crypto.verify(f.pubkey, canonical, f.signature):
            self._error(conn, errors.BAD_SIGNATURE, "mesh_create signature fails", f.id)
            return
        # The creator derives its member key from the mesh id, so it proposes
        # one before signing; honouring it keeps "same root, same identity".
        if f.mesh_id is not None and not _MESH_ID_RE.fullmatch(f.mesh_id):
            self._error(conn, errors.INVALID_FIELD, "mesh_create: field `meshId`", f.id)
            return
        try:
            mesh, member = await self.store.create_mesh(
                f.name,
                now=now_ms(),
                admin_pubkey=f.pubkey,
                admin_name=f.display_name or "admin",
                mesh_id=f.mesh_id,
            )
        except MeshIdTaken as exc:
            self._error(conn, exc.code, exc.message, f.id)
            return
        assert member is not None
        log("mesh_created", mesh=mesh.id, member=member.id)
        self._emit(conn, wire.MeshCreated(id=f.id, mesh_id=mesh.id, member_id=member.id))

    async def _invite_claim(self, conn: Conn, f: wire.InviteClaim) -> None:
        if not wire.is_pubkey_hex(f.member_pubkey):
            self._error(conn, errors.INVALID_FIELD, "invite_claim: field `memberPubkey`", f.id)
            return
        if len(f.display_name) > 200:
            self._error(conn, errors.INVALID_FIELD, "invite_claim: `displayName` too long", f.id)
            return
        if self._skewed(f.timestamp):
            self._error(conn, errors.TIMESTAMP_SKEW, "timestamp is more than 60 s off", f.id)
            return
        invite = await self.store.get_invite(f.mesh_id, f.invite_id)
        if invite is None:
            self._error(conn, errors.INVITE_NOT_FOUND, "no such invite", f.id)
            return
        canonical = wire.invite_claim_canonical(
            f.mesh_id, f.invite_id, f.member_pubkey, f.timestamp
        )
        if not crypto.verify(invite.claim_pubkey, canonical, f.signature):
            self._error(conn, errors.BAD_SIGNATURE, "invite_claim signature fails", f.id)
            return
        try:
            res = await self.store.claim_invite(
                f.mesh_id, f.invite_id, f.member_pubkey, f.display_name, now_ms()
            )
        except StoreError as exc:
            self._error(conn, exc.code, exc.message, f.id)
            return
        log("invite_claimed", mesh=f.mesh_id, invite=f.invite_id, member=res.member_id)
        self._emit(
            conn,
            wire.InviteClaimed(
                id=f.id,
                mesh_id=res.mesh_id,
                member_id=res.member_id,
                invite_id=res.invite_id,
                role=cast(wire.Role, res.role),
                uses=res.uses,
                expires_at=res.expires_at,
                claim_pubkey=res.claim_pubkey,
                sealed=res.sealed,
                admin_pubkey=res.admin_pubkey,
                admin_signature=res.admin_signature,
            ),
        )

    async def _invite_put(self, conn: Conn, f: wire.InvitePut) -> None:
        member = conn.member
        assert member is not None
        if member.role != "admin":
            self._error(conn, errors.FORBIDDEN, "only an admin can create invites", f.id)
            return
        if not wire.is_pubkey_hex(f.claim_pubkey):
            self._error(conn, errors.INVALID_FIELD, "invite_put: field `claimPubkey`", f.id)
            return
        if not 1 <= f.uses <= 100_000 or f.expires_at <= now_ms():
            self._error(conn, errors.INVALID_FIELD, "invite_put: `uses` or `expiresAt`", f.id)
            return
        too_big = len(f.sealed) > 4 * self.config.max_ciphertext
        if not f.invite_id or len(f.invite_id) > 128 or too_big:
            self._error(conn, errors.INVALID_FIELD, "invite_put: `inviteId` or `sealed`", f.id)
            return
        digest = hashlib.sha256(f.sealed.encode()).hexdigest()
        canonical = wire.invite_canonical(
            conn.mesh_id, f.invite_id, f.role, f.uses, f.expires_at, f.claim_pubkey, digest
        )
        if not crypto.verify(member.pubkey, canonical, f.signature):
            self._error(conn, errors.BAD_SIGNATURE, "invite signature fails", f.id)
            return
        await self.store.put_invite(
            conn.mesh_id,
            f.invite_id,
            f.role,
            f.uses,
            f.expires_at,
            f.claim_pubkey,
            f.sealed,
            member.pubkey,
            f.signature,
            now_ms(),
        )
        self._emit(conn, wire.Ok(id=f.id))

    async def _invite_revoke(self, conn: Conn, f: wire.InviteRevoke) -> None:
        assert conn.member is not None
        if conn.member.role != "admin":
            self._error(conn, errors.FORBIDDEN, "only an admin can revoke invites", f.id)
            return
        if not await self.store.revoke_invite(conn.mesh_id, f.invite_id, now_ms()):
            self._error(conn, errors.INVITE_NOT_FOUND, "no such invite", f.id)
            return
        self._emit(conn, wire.Ok(id=f.id))

    # ---------------------------------------------------------- sessions

    async def _session_hello(self, conn: Conn, f: wire.SessionHello) -> None:
        member = conn.member
        assert member is not None
        att = f.attestation
        spk = f.session_pubkey
        now = now_ms()
        if not wire.is_pubkey_hex(spk) or att.session_pk != spk or att.parent_pk != member.pubkey:
            self._error(
                conn, errors.INVALID_FIELD, "session_hello: attestation keys do not match", f.id
            )
            return
        if any(
            v is not None and len(v) > MAX_SESSION_TEXT
            for v in (f.session_id, f.cwd, f.display_name, f.peer_type)
        ):
            self._error(conn, errors.INVALID_FIELD, "session_hello: a text field is too long", f.id)
            return
        if spk not in conn.sessions and len(conn.sessions) >= MAX_SESSIONS_PER_CONN:
            self._error(
                conn, errors.TOO_MANY_CONNECTIONS, "too many sessions on this connection", f.id
            )
            return
        if self._skewed(f.timestamp):
            self._error(conn, errors.TIMESTAMP_SKEW, "timestamp is more than 60 s off", f.id)
            return
        if att.expires_at <= now or att.expires_at > now + DAY_MS + self.config.skew_ms:
            self._error(
                conn, errors.INVALID_FIELD, "attestation expired or more than 24 h ahead", f.id
            )
            return
        if not crypto.verify(
            member.pubkey,
            wire.session_attest_canonical(member.pubkey, spk, att.expires_at),
            att.signature,
        ) or not crypto.verify(
            spk,
            wire.session_hello_canonical(conn.mesh_id, member.pubkey, spk, f.timestamp),
            f.signature,
        ):
            self._error(conn, errors.BAD_SIGNATURE, "session_hello signature fails", f.id)
            return
        if await self.store.member_by_pubkey(conn.mesh_id, spk) is not None:
            self._error(conn, errors.FORBIDDEN, "a session key cannot be a member key", f.id)
            return
        other = self.session_conn.get((conn.mesh_id, spk))
        if other is not None and other is not conn:
            if other.member is None or other.member.id != member.id:
                self._error(conn, errors.FORBIDDEN, "session key in use", f.id)
                return
            other.sessions.pop(spk, None)
        self.session_conn[(conn.mesh_id, spk)] = conn
        await self.store.session_hello(
            conn.mesh_id, spk, member.id, conn.device_id, att.expires_at, now
        )
        existed = spk in conn.sessions
        conn.sessions[spk] = SessionPresence(
            pubkey=spk,
            session_id=f.session_id,
            conn=conn,
            display_name=f.display_name,
            pid=f.pid,
            cwd=f.cwd,
            peer_type=f.peer_type,
            expires_at=att.expires_at,
            connected_at=now,
        )
        resumed = self.lingering.pop(("s", conn.mesh_id, spk), None) is not None
        if not resumed and not existed:
            self._system(conn.mesh_id, "peer_joined", self._session_event(conn, spk), exclude=conn)
        self._open_stream(("s", conn.mesh_id, spk), conn)
        if f.id is not None:
            self._emit(conn, wire.Ok(id=f.id))

    def _session_event(self, conn: Conn, spk: str) -> dict[str, Any]:
        assert conn.member is not None
        s = conn.sessions.get(spk)
        return {
            "pubkey": spk,
            "name": (s.display_name if s and s.display_name else conn.member.display_name),
            "memberPubkey": conn.member.pubkey,
            "isSession": True,
        }

    async def _session_bye(self, conn: Conn, f: wire.SessionBye) -> None:
        if f.session_pubkey in conn.sessions:
            data = self._session_event(conn, f.session_pubkey)
            del conn.sessions[f.session_pubkey]
            if self.session_conn.get((conn.mesh_id, f.session_pubkey)) is conn:
                del self.session_conn[(conn.mesh_id, f.session_pubkey)]
            key = ("s", conn.mesh_id, f.session_pubkey)
            st = self.streams.get(key)
            if st is not None and st.conn is conn:
                del self.streams[key]
            self._system(conn.mesh_id, "peer_left", data, exclude=conn)
        if f.id is not None:
            self._emit(conn, wire.Ok(id=f.id))

    # ----------------------------------------------------------- presence

    def _set_status(self, conn: Conn, f: wire.SetStatus) -> None:
        if f.session_pubkey is None:
            conn.status = f.status
        elif (s := conn.sessions.get(f.session_pubkey)) is not None:
            s.status = f.status
        else:
            self._error(conn, errors.INVALID_FIELD, "set_status: unknown `sessionPubkey`")

    def _set_summary(self, conn: Conn, f: wire.SetSummary) -> None:
        if len(f.summary) > 1000:
            self._error(conn, errors.INVALID_FIELD, "set_summary: `summary` over 1000 chars")
        elif f.session_pubkey is None:
            conn.summary = f.summary
        elif (s := conn.sessions.get(f.session_pubkey)) is not None:
            s.summary = f.summary
        else:
            self._error(conn, errors.INVALID_FIELD, "set_summary: unknown `sessionPubkey`")

    async def _group(self, conn: Conn, f: wire.JoinGroup | wire.LeaveGroup) -> None:
        assert conn.member is not None
        name = f.name.lstrip("@")
        if not name or len(name) > 128:
            self._error(conn, errors.INVALID_FIELD, f"{f.__struct_config__.tag}: field `name`")
            return
        kept = [g for g in conn.groups if g.name != name]
        if isinstance(f, wire.JoinGroup) and len(kept) >= MAX_GROUPS_PER_CONN:
            self._error(conn, errors.INVALID_FIELD, f"join_group: at most {MAX_GROUPS_PER_CONN}")
            return
        conn.groups = kept
        if isinstance(f, wire.JoinGroup):
            conn.groups.append(wire.GroupRef(name=name, role=f.role))
            await self.store.set_groups(conn.member.id, [(name, f.role)], [])
        else:
            await self.store.set_groups(conn.member.id, [], [name])

    def _conn_info(self, conn: Conn) -> wire.PeerInfo:
        assert conn.member is not None
        assert conn.hello is not None
        h = conn.hello
        return wire.PeerInfo(
            pubkey=conn.member.pubkey,
            display_name=h.display_name or conn.member.display_name,
            status=conn.status,
            summary=conn.summary,
            groups=list(conn.groups),
            session_id=h.session_id,
            connected_at=iso(conn.connected_at),
            cwd=h.cwd,
            peer_type=h.peer_type,
            channel=h.channel,
            model=h.model,
            member_pubkey=conn.member.pubkey,
            member_id=conn.member.id,
            online=True,
            last_seen_at=iso(now_ms()),
            role=conn.member.role,
            hostname=h.hostname,
            device_id=conn.device_id or None,
        )

    def _session_info(self, conn: Conn, s: SessionPresence) -> wire.PeerInfo:
        assert conn.member is not None
        return wire.PeerInfo(
            pubkey=s.pubkey,
            display_name=s.display_name or conn.member.display_name,
            status=s.status,
            summary=s.summary,
            groups=list(conn.groups),
            session_id=s.session_id,
            connected_at=iso(s.connected_at),
            cwd=s.cwd,
            peer_type=s.peer_type,
            member_pubkey=conn.member.pubkey,
            member_id=conn.member.id,
            online=True,
            last_seen_at=iso(now_ms()),
            role=conn.member.role,
            hostname=conn.hello.hostname if conn.hello else None,
            device_id=conn.device_id or None,
            is_session=True,
        )

    async def _list_peers(self, conn: Conn, f: wire.ListPeers) -> None:
        peers: list[wire.PeerInfo] = []
        present: set[str] = set()
        for c in sorted(self.mesh_conns.get(conn.mesh_id, ()), key=lambda c: c.connected_at):
            if c.member is None:
                continue
            present.add(c.member.id)
            peers.append(self._conn_info(c))
            peers.extend(self._session_info(c, s) for s in c.sessions.values())
        for linger in self.lingering.values():
            if linger.mesh_id == conn.mesh_id:
                peers.append(linger.info)
                if linger.info.member_id:
                    present.add(linger.info.member_id)
        for m in await self.store.list_members(conn.mesh_id):
            if m.id in present or m.revoked_at is not None:
                continue
            peers.append(
                wire.PeerInfo(
                    pubkey=m.pubkey,
                    display_name=m.display_name,
                    status="idle",
                    summary="",
                    session_id="",
                    connected_at="",
                    groups=[wire.GroupRef(name=n, role=r) for n, r in m.groups],
                    member_pubkey=m.pubkey,
                    member_id=m.id,
                    online=False,
                    last_seen_at=iso(m.last_seen_at) if m.last_seen_at else None,
                    role=m.role,
                )
            )
        self._emit(conn, wire.PeersList(peers=peers, id=f.id))

    def _system(
        self, mesh_id: str, event: str, data: dict[str, Any], exclude: Conn | None = None
    ) -> None:
        frame = wire.Push(
            message_id=ids.uuid7(),
            mesh_id=mesh_id,
            sender_pubkey=str(data.get("pubkey", "")),
            priority="low",
            nonce="",
            ciphertext="",
            created_at=iso(now_ms()),
            subtype="system",
            event=event,
            event_data=data,
        )
        text = wire.encode_frame(frame).decode()
        for c in list(self.mesh_conns.get(mesh_id, ())):
            if c is not exclude and c.member is not None:
                self._emit_text(c, text)

    async def _disconnected(self, conn: Conn) -> None:
        member = conn.member
        if member is None:
            return
        mesh = self.mesh_conns.get(conn.mesh_id)
        if mesh is not None and conn in mesh:
            mesh.discard(conn)
            self.total_conns -= 1
            if not mesh:
                del self.mesh_conns[conn.mesh_id]
        mine = self.member_conns.get(member.id)
        if mine is not None:
            mine.discard(conn)
            if not mine:
                del self.member_conns[member.id]
        for key in conn.stream_keys:
            st = self.streams.get(key)
            if st is not None and st.conn is conn:
                del self.streams[key]
        for spk in conn.sessions:
            if self.session_conn.get((conn.mesh_id, spk)) is conn:
                del self.session_conn[(conn.mesh_id, spk)]
        log("disconnected", member=member.id, device=conn.device_id, remote=conn.remote)
        replaced = any(c.device_id == conn.device_id for c in mine or ())
        if not replaced:
            self._linger(
                ("m", member.id, conn.device_id),
                conn.mesh_id,
                self._conn_info(conn),
                self._member_event(conn),
            )
        for spk, s in conn.sessions.items():
            self._linger(
                ("s", conn.mesh_id, spk),
                conn.mesh_id,
                self._session_info(conn, s),
                self._session_event(conn, spk),
            )
        self._seen.put((member.id, conn.device_id))

    def _linger(
        self, key: tuple[str, str, str], mesh_id: str, info: wire.PeerInfo, data: dict[str, Any]
    ) -> None:
        entry = _Linger(info=info, mesh_id=mesh_id, event_data=data)
        self.lingering[key] = entry
        if self._nursery is not None:
            self._nursery.start_soon(self._linger_expire, key, entry)

    async def _linger_expire(self, key: tuple[str, str, str], entry: _Linger) -> None:
        await trio.sleep(self.config.grace)
        if self.lingering.get(key) is entry:
            del self.lingering[key]
            self._system(entry.mesh_id, "peer_left", entry.event_data)

    # ------------------------------------------------------------ routing

    async def _send(self, conn: Conn, f: wire.Send) -> None:
        member = conn.member
        assert member is not None
        assert conn.send_slots is not None

        def refuse(code: str, message: str) -> None:
            self.stats["errors"] += 1
            self._emit(
                conn,
                wire.Ack(
                    id=f.id,
                    queued=False,
                    client_message_id=f.client_message_id,
                    error=wire.ErrorInfo(code=code, message=message),
                ),
            )

        try:
            wire.check_send(f, max_ciphertext=self.config.max_ciphertext)
        except RemoteProtocolError as exc:
            refuse(exc.code, exc.message)
            return
        problem = _check_send_fields(f)
        if problem is not None:
            refuse(errors.INVALID_FIELD, problem)
            return
        sender_pubkey = member.pubkey
        if f.from_session is not None and f.from_session != member.pubkey:
            if f.from_session not in conn.sessions:
                refuse(errors.FORBIDDEN, "fromSession is not a session of this connection")
                return
            sender_pubkey = f.from_session
        await conn.send_slots.acquire()
        self._writes.put(
            _PendingSend(
                conn=conn,
                frame_id=f.id,
                item=SendItem(
                    mesh_id=conn.mesh_id,
                    sender_member_id=member.id,
                    sender_device_id=conn.device_id,
                    sender_pubkey=sender_pubkey,
                    client_message_id=f.client_message_id,
                    request_fingerprint=f.request_fingerprint,
                    target_spec=f.target_spec,
                    priority=f.priority,
                    nonce=f.nonce,
                    ciphertext=f.ciphertext,
                    topic=f.topic,
                    epoch=f.epoch,
                    reply_to_id=f.reply_to_id,
                    now=now_ms(),
                    ttl_ms=self.config.ttl_ms,
                ),
            )
        )

    async def _commit_round(self, batch: list[_PendingSend | _AckJob]) -> None:
        sends = [j for j in batch if isinstance(j, _PendingSend)]
        acks = [j for j in batch if isinstance(j, _AckJob)]
        now = now_ms()
        deliveries: list[tuple[str, str, str, str | None, str | None]] = []
        receipt_acks: list[tuple[str, str]] = []
        for job in acks:
            conn = job.conn
            assert conn.member is not None
            if job.message_id is not None:
                deliveries.append(
                    (conn.mesh_id, conn.member.id, conn.device_id, job.message_id, None)
                )
            elif job.other is not None:
                receipt_acks.append((conn.member.id, job.other))
        try:
            outcomes, receipts = await self.store.commit_round(
                [p.item for p in sends], deliveries, receipt_acks, now
            )
        except Exception as exc:  # the store failed: refuse, never crash
            log("store_error", error=repr(exc))
            outcomes = [
                SendOutcome(error=(errors.INTERNAL, "the broker could not store this send"))
            ] * len(sends)
            receipts = []
        if acks:
            self.stats["ack_batches"] += 1
            self.stats["acks"] += len(deliveries)
        if sends:
            self._finish_sends(sends, outcomes)
        for r in receipts:
            self._route_receipt(r)

    def _finish_sends(self, batch: list[_PendingSend], outcomes: list[SendOutcome]) -> None:
        self.stats["batches"] += 1
        self.stats["batched_sends"] += len(batch)
        for p, out in zip(batch, outcomes, strict=True):
            conn = p.conn
            assert conn.send_slots is not None
            conn.send_slots.release()
            if out.error is not None:
                self.stats["errors"] += 1
                self._emit(
                    conn,
                    wire.Ack(
                        id=p.frame_id,
                        message_id=out.message_id,
                        queued=False,
                        client_message_id=p.item.client_message_id,
                        error=wire.ErrorInfo(code=out.error[0], message=out.error[1]),
                    ),
                )
                if out.error[0] == errors.REVOKED:
                    try:
                        conn.out.send_nowait(_Close(CLOSE_REVOKED, "revoked"))
                    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                        conn.cancel.cancel()
                continue
            if out.duplicate:
                self.stats["duplicates"] += 1
            else:
                self.stats["sends"] += 1
            self._emit(
                conn,
                wire.Ack(
                    id=p.frame_id,
                    message_id=out.message_id,
                    queued=True,
                    client_message_id=p.item.client_message_id,
                    duplicate=out.duplicate,
                    recipients=out.recipients,
                ),
            )
            for d in out.deliveries:
                self._offer(d)

    @staticmethod
    def _stream_key(d: Delivery) -> tuple[str, str, str] | None:
        if d.session_pubkey is not None:
            return ("s", d.mesh_id, d.session_pubkey)
        if d.device_id is None:
            return None
        return ("m", d.member_id, d.device_id)

    def _offer(self, d: Delivery) -> None:
        key = self._stream_key(d)
        st = self.streams.get(key) if key is not None else None
        if st is None:
            return
        if st.flushing:
            st.dirty = True
            return
        if d.seq <= st.cursor:
            return
        st.cursor = d.seq
        self._push(st.conn, d)

    def _push(self, conn: Conn, d: Delivery) -> None:
        text = wire.encode_frame(
            wire.Push(
                message_id=d.message_id,
                mesh_id=d.mesh_id,
                sender_pubkey=d.sender_pubkey,
                priority=cast(wire.Priority, d.priority),
                nonce=d.nonce,
                ciphertext=d.ciphertext,
                created_at=iso(d.created_at),
                client_message_id=d.client_message_id,
                sender_member_pubkey=d.sender_member_pubkey,
                sender_name=d.sender_name,
                topic=d.topic,
                epoch=d.epoch,
                reply_to_id=d.reply_to_id,
                target_pubkey=d.target_pubkey,
                target_spec=d.target_spec,
            )
        ).decode()
        conn.inflight[d.seq] = _Inflight(
            d.message_id,
            text,
            trio.current_time(),
            d.created_at + self.config.ttl_ms,
            d.client_message_id,
        )
        conn.by_message.setdefault(d.message_id, set()).add(d.seq)
        self.stats["pushes"] += 1
        self._emit_text(conn, text)

    def _open_stream(self, key: tuple[str, str, str], conn: Conn) -> None:
        st = Stream(key=key, conn=conn)
        self.streams[key] = st
        conn.stream_keys.add(key)
        if self._nursery is not None:
            self._nursery.start_soon(self._flush, st)

    async def _flush(self, st: Stream) -> None:
        """Push a stream's stored backlog, then hand it over to live pushes."""
        kind, a, b = st.key
        out = st.conn.out
        try:
            while True:
                # Backpressure: read no more of a backlog than the peer's
                # outgoing buffer has room for (half of it; live frames need the rest).
                half_bytes = self.config.outgoing_bytes // 2
                while True:
                    room = self.config.outgoing_buffer // 2 - out.statistics().current_buffer_used
                    if room > 0 and st.conn.out_bytes < half_bytes:
                        break
                    await trio.sleep(0.01)
                    if st.conn.closed:
                        return
                st.dirty = False
                limit = min(256, room)
                if kind == "m":
                    rows = await self.store.pending_member(a, b, st.cursor, limit)
                else:
                    rows = await self.store.pending_session(a, b, st.cursor, limit)
                if self.streams.get(st.key) is not st or st.conn.closed:
                    return
                for d in rows:
                    if st.conn.out_bytes >= half_bytes:
                        break  # the rest is read again once the peer drained
                    if d.seq > st.cursor:
                        st.cursor = d.seq
                        self._push(st.conn, d)
                if not rows and not st.dirty:
                    st.flushing = False
                    return
        except Exception as exc:
            log("flush_error", error=repr(exc))
            st.conn.cancel.cancel()

    def _client_ack(self, conn: Conn, f: wire.ClientAck) -> None:
        assert conn.member is not None
        if f.receipt_id is not None:
            self._writes.put(_AckJob(conn, None, f.receipt_id))
        if f.broker_message_id is not None:
            for seq in conn.by_message.pop(f.broker_message_id, ()):
                conn.inflight.pop(seq, None)
            self._writes.put(_AckJob(conn, f.broker_message_id, None))
        elif f.client_message_id is not None:
            # Senders choose client ids, so two senders may share one: the ack
            # answers the oldest push with that id on this connection, never
            # every pending row that happens to carry it.
            oldest = min(
                (
                    s
                    for s, it in conn.inflight.items()
                    if it.client_message_id == f.client_message_id
                ),
                default=None,
            )
            if oldest is not None:
                message_id = conn.inflight[oldest].message_id
                for seq in conn.by_message.pop(message_id, ()):
                    conn.inflight.pop(seq, None)
                self._writes.put(_AckJob(conn, message_id, None))

    async def _commit_seen(self, batch: list[tuple[str, str]]) -> None:
        try:
            await self.store.seen_many(batch, now_ms())
        except Exception as exc:
            log("store_error", error=repr(exc))

    def _route_receipt(self, r: ReceiptRow) -> None:
        st = self.streams.get(("m", r.member_id, r.device_id))
        if st is not None:
            self._emit_receipt(st.conn, r)

    def _emit_receipt(self, conn: Conn, r: ReceiptRow) -> None:
        if len(conn.receipts_out) < MAX_TRACKED_RECEIPTS:
            conn.receipts_out.add(r.id)
        self._emit(
            conn,
            wire.Receipt(
                message_id=r.message_id,
                state=cast(wire.ReceiptState, r.state),
                receipt_id=r.id,
                client_message_id=r.client_message_id,
                recipient_pubkey=r.recipient_pubkey,
                at=r.at,
                reason=r.reason,
            ),
        )

    async def _receipt(self, conn: Conn, f: wire.Receipt) -> None:
        assert conn.member is not None
        if f.state == "surfaced":
            rows = await self.store.surfaced(conn.member.id, conn.device_id, f.message_id, now_ms())
        elif f.state == "failed":
            if not f.reason or len(f.reason) > MAX_RECEIPT_REASON:
                self._error(
                    conn,
                    errors.INVALID_FIELD,
                    f"receipt: field `reason` (1..{MAX_RECEIPT_REASON} characters)",
                )
                return
            rows = await self.store.failed(
                conn.member.id, conn.device_id, f.message_id, f.reason, now_ms()
            )
        else:
            self._error(
                conn,
                errors.INVALID_FIELD,
                "receipt: only states `surfaced` and `failed` are accepted",
            )
            return
        for r in rows:
            self._route_receipt(r)

    # ---------------------------------------------------------- background

    async def _lease_loop(self) -> None:
        lease = self.config.lease
        while True:
            await trio.sleep(max(0.05, min(lease / 4, 1.0)))
            now = trio.current_time()
            wall = now_ms()
            for conns in list(self.mesh_conns.values()):
                for conn in list(conns):
                    for seq, item in list(conn.inflight.items()):
                        if item.expires_ms <= wall:
                            del conn.inflight[seq]
                            conn.by_message.pop(item.message_id, None)
                        elif now - item.pushed_at >= lease:
                            item.pushed_at = now
                            self.stats["redeliveries"] += 1
                            self._emit_text(conn, item.text)

    async def _revocation_loop(self) -> None:
        """Close the live connections of members revoked since they said hello."""
        while True:
            await trio.sleep(self.config.revocation_interval)
            live = {
                c.member.id: c.member.id
                for conns in self.mesh_conns.values()
                for c in conns
                if c.member is not None
            }
            if not live:
                continue
            try:
                revoked = await self.store.revoked_among(list(live))
            except Exception as exc:
                log("store_error", error=repr(exc))
                continue
            for conns in list(self.mesh_conns.values()):
                for conn in list(conns):
                    if conn.member is not None and conn.member.id in revoked:
                        log("revoked_connection_closed", member=conn.member.id)
                        self._error(conn, errors.REVOKED, "this member was revoked")
                        try:
                            conn.out.send_nowait(_Close(CLOSE_REVOKED, "revoked"))
                        except (
                            trio.WouldBlock,
                            trio.BrokenResourceError,
                            trio.ClosedResourceError,
                        ):
                            conn.cancel.cancel()

    async def _sweep_loop(self) -> None:
        while True:
            try:
                res = await self.store.sweep(
                    now_ms(), max(self.config.retention_ms, self.config.ttl_ms)
                )
            except Exception as exc:
                log("store_error", error=repr(exc))
            else:
                for r in res.receipts:
                    self._route_receipt(r)
                if res.receipts:
                    log("expired", rows=len(res.receipts))
            await trio.sleep(self.config.sweep_interval)


def _answers_push(conn: Conn, f: wire.ClientAck) -> bool:
    """Whether an ack answers a push or receipt sent on this connection."""
    if f.receipt_id is not None and f.receipt_id in conn.receipts_out:
        conn.receipts_out.discard(f.receipt_id)
        return True
    if f.broker_message_id is not None:
        return f.broker_message_id in conn.by_message
    if f.client_message_id is not None and f.receipt_id is None:
        return any(it.client_message_id == f.client_message_id for it in conn.inflight.values())
    return False


def _trace(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))[-4000:]


def _frame_id(frame: wire.Frame) -> str | None:
    value = getattr(frame, "id", None)
    return value if isinstance(value, str) else None


def _check_send_fields(f: wire.Send) -> str | None:
    spec = f.target_spec
    if not (
        wire.is_pubkey_hex(spec)
        or spec in ("*", "@all")
        or (spec[0] in "@#" and 1 < len(spec) <= 129)
    ):
        return "send: field `targetSpec` is not a key, `*`, `@group` or `#topic`"
    if f.client_message_id is not None and not ids.is_client_message_id(f.client_message_id):
        return "send: field `client_message_id` must be 1-128 printable ASCII, no spaces"
    if len(f.nonce) > 64:
        return "send: field `nonce` too long"
    if f.request_fingerprint is not None and len(f.request_fingerprint) > 128:
        return "send: field `request_fingerprint` too long"
    if f.reply_to_id is not None and len(f.reply_to_id) > 128:
        return "send: field `replyToId` too long"
    if f.topic is not None and len(f.topic) > 128:
        return "send: field `topic` too long"
    if len(f.id) > 128:
        return "send: field `id` too long"
    return None


async def serve_broker(
    store: Store,
    config: BrokerConfig,
    *,
    task_status: trio.TaskStatus[Broker] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a broker on ``store`` until cancelled; ``started`` hands back the Broker."""
    broker = Broker(store, config)
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.serve)
        task_status.started(broker)
