"""The daemon object: workspaces, the control and workspace sockets, and every IPC method.

Methods follow docs/ipc.md.  Workspace-scoped methods on the control socket
take ``params.workspace`` (default: the one chosen with ``workspace.use``,
else the only one).  Handlers validate params and raise :class:`ApiError`
with a stable code; they never let a foreign exception reach the client.
"""

from __future__ import annotations

import base64
import difflib
import functools
import hashlib
import json
import logging
import os
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Any, Final

import trio

from claudemesh import __version__
from claudemesh.shared.protocol import crypto, errors, ids, ipc, wire
from claudemesh.shared.protocol.errors import CryptoError

from . import invites
from .home import Home, WorkspaceConfig, is_workspace_name
from .ipcserver import ApiError, IpcConn, IpcServer, Streaming
from .store import Store, now_ms
from .workspace import (
    BrokerRefused,
    LinkDown,
    Workspace,
    broker_call,
    message_view,
    proc_starttime,
    topic_id_for,
)

log = logging.getLogger("claudemesh.daemon")

PRIORITIES: Final = ("now", "next", "low")
STATES_ORDER: Final = ("accepted", "sent", "delivered", "surfaced")
BROKER_CODES_TO_IPC: Final = {
    errors.INVITE_NOT_FOUND,
    errors.INVITE_EXPIRED,
    errors.INVITE_REVOKED,
    errors.INVITE_EXHAUSTED,
    errors.FORBIDDEN,
    errors.UNAUTHORIZED,
    errors.REVOKED,
}
MAX_BODY: Final = 48 * 1024
INFLIGHT_LEASE_MS: Final = 30_000
_HAS_PROC: Final = Path("/proc/self").exists()


def _param(
    params: dict[str, Any], name: str, kind: type, *, default: Any = ..., required: bool = False
) -> Any:
    if name not in params or params[name] is None:
        if required or default is ...:
            raise ApiError(ipc.INVALID_PARAMS, f"missing param `{name}`")
        return default
    v = params[name]
    if kind is int and isinstance(v, bool):
        raise ApiError(ipc.INVALID_PARAMS, f"param `{name}` must be an integer")
    if kind is int and isinstance(v, int) and not -(2**63) <= v < 2**63:
        # SQLite stores signed 64-bit integers; a larger one is bad input.
        raise ApiError(ipc.INVALID_PARAMS, f"param `{name}` is out of range")
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if kind is float and isinstance(v, float) and v != v:
        raise ApiError(ipc.INVALID_PARAMS, f"param `{name}` must be a number, not NaN")
    if not isinstance(v, kind):
        raise ApiError(ipc.INVALID_PARAMS, f"param `{name}` must be {kind.__name__}")
    return v


def _opt(params: dict[str, Any], name: str, kind: type) -> Any:
    return _param(params, name, kind, default=None)


class Daemon:
    """The running daemon for one home."""

    def __init__(self, home: Home, *, allowed_uid: int | None = None) -> None:
        self.home = home
        self.allowed_uid = allowed_uid
        self.root_secret = home.root_secret()
        self.device_id = home.device_id()
        self.started_at = now_ms()
        self._t0 = time.monotonic()
        self.workspaces: dict[str, Workspace] = {}
        self.default: str | None = home.load_state().get("default")
        self.stop_requested = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._servers: dict[str, IpcServer] = {}
        #: Workspaces whose store could not be opened at start: name -> why.
        self.unavailable: dict[str, str] = {}

    # ------------------------------------------------------------ run

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for cfg in self.home.load_workspaces(self.unavailable).values():
                try:
                    await self._start_workspace(cfg)
                except (sqlite3.Error, OSError) as exc:
                    # One unusable store must not keep the user's other workspaces
                    # down; the file is left as it is, for the user to inspect.
                    self.unavailable[cfg.name] = f"{self.home.store_path(cfg.name)}: {exc}"
                    log.error("workspace %s not started: %s", cfg.name, exc)
            control = IpcServer(self.home.control_socket, self.handle, allowed_uid=self.allowed_uid)
            self._servers[""] = control
            await nursery.start(control.serve)
            task_status.started()
            log.info("daemon ready pid=%s", os.getpid())
            await self.stop_requested.wait()
            log.info("daemon stopping")
            nursery.cancel_scope.cancel()
        for ws in self.workspaces.values():
            ws.store.close()

    async def _start_workspace(self, cfg: WorkspaceConfig) -> Workspace:
        assert self._nursery is not None
        store = Store(self.home.store_path(cfg.name))
        ws = Workspace(cfg, store, self.root_secret, self.device_id, self.home.root)
        await ws.load()
        self.workspaces[cfg.name] = ws
        server = IpcServer(
            self.home.workspace_socket(cfg.name),
            self.handle,
            workspace=cfg.name,
            allowed_uid=self.allowed_uid,
        )
        self._servers[cfg.name] = server

        async def runner(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with ws.cancel_scope:
                    async with trio.open_nursery() as n:
                        await n.start(server.serve)
                        task_status.started()
                        n.start_soon(ws.run_link)
                        n.start_soon(ws.watch_sessions)
            except Exception:  # one workspace failing must not stop the others
                log.exception("workspace %s stopped on an error", cfg.name)
            finally:
                ws.stopped.set()

        await self._nursery.start(runner)
        return ws

    # ------------------------------------------------------- dispatch

    async def handle(self, conn: IpcConn, req: ipc.Request) -> Any:
        fn = _METHODS.get(req.method)
        if fn is None:
            raise ApiError(
                ipc.UNKNOWN_METHOD,
                f"unknown method {req.method!r}",
                known=sorted(_METHODS),
            )
        params = req.params if isinstance(req.params, dict) else {}
        if fn is Daemon.m_subscribe:
            return await self.m_subscribe(conn, params, req.id)
        return await fn(self, conn, params)

    def workspace_for(self, conn: IpcConn, params: dict[str, Any]) -> Workspace:
        if conn.workspace is not None:
            ws = self.workspaces.get(conn.workspace)
            if ws is None:
                raise ApiError(ipc.NO_WORKSPACE, f"workspace {conn.workspace!r} was left")
            return ws
        name = _opt(params, "workspace", str)
        if name is None:
            if self.default in self.workspaces:
                name = self.default
            elif len(self.workspaces) == 1:
                name = next(iter(self.workspaces))
            elif not self.workspaces:
                raise ApiError(
                    ipc.NO_WORKSPACE,
                    "no workspace yet: create one (workspace create) or join one (workspace join)",
                )
            else:
                raise ApiError(
                    ipc.NO_WORKSPACE,
                    "several workspaces: pass `workspace` or choose one with `workspace use`",
                    workspaces=sorted(self.workspaces),
                )
        ws = self.workspaces.get(name)
        if ws is None:
            raise ApiError(
                ipc.NO_WORKSPACE, f"no workspace named {name!r}", workspaces=sorted(self.workspaces)
            )
        return ws

    # -------------------------------------------------------- daemon.*

    async def m_status(self, conn: IpcConn, params: dict[str, Any]) -> Any:
        return {
            "version": __version__,
            "api_version": ipc.IPC_API_VERSION,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "uptime_s": round(time.monotonic() - self._t0, 3),
            "home": str(self.home.root),
            "device_id": self.device_id,
            "default_workspace": self.default,
            "workspaces": [await ws.describe() for ws in self.workspaces.values()],
            "unavailable_workspaces": [
                {"name": n, "error": e} for n, e in sorted(self.unavailable.items())
            ],
        }

    async def m_stop(self, conn: IpcConn, params: dict[str, Any]) -> Any:
        async def after_reply() -> None:
            self.stop_requested.set()

        return Streaming({}, after_reply)  # reply first, then stop

    # ----------------------------------------------------- workspace.*

    def _check_new_name(self, name: str) -> None:
        if not is_workspace_name(name):
            raise ApiError(
                ipc.INVALID_PARAMS,
                "param `name` must be 1-32 of a-z, 0-9, '-', '_', starting with a letter or digit",
            )
        if name in self.workspaces or name in self.unavailable:
            raise ApiError(
                ipc.CONFLICT,
                f"a workspace named {name!r} already exists here; pick another local name "
                "(param `name`)",
            )

    async def _add(self, cfg: WorkspaceConfig) -> dict[str, Any]:
        self.home.save_workspace(cfg)
        ws = await self._start_workspace(cfg)
        if self.default is None:
            self.default = cfg.name
            self.home.save_state({"default": self.default})
        return {
            "workspace": {
                "name": cfg.name,
                "mesh_id": cfg.mesh_id,
                "member_id": cfg.member_id,
                "member_pubkey": ws.member.public_hex,
                "display_name": cfg.display_name,
                "broker_url": cfg.broker_url,
                "role": cfg.role,
            }
        }

    async def m_ws_create(self, conn: IpcConn, params: dict[str, Any]) -> Any:
        name = _param(params, "name", str, required=True)
        url = _param(params, "broker_url", str, required=True)
        if not (url.startswith("ws://") or url.startswith("wss://")):
            raise ApiError(ipc.INVALID_PARAMS, "param `broker_url` must be a ws:// or wss:// URL")
        self._check_new_name(name)
        display = _param(params, "display_name", str, default="") or _default_display_name()
        proposed = ids.uuid7()
        member = crypto.KeyPair(crypto.member_seed(self.root_secret, proposed))
        ts = now_ms()
        rid = "create-" + secrets.token_hex(4)
        frame = wire.MeshCreate(
            id=rid,
            name=name,
            pubkey=member.public_hex,
            timestamp=ts,
            signature=member.sign(wire.mesh_create_canonical(name, member.public_hex, ts)),
            display_name=display,
            create_token=_opt(params, "create_token", str),
            mesh_id=proposed,
        )
        reply = await _broker(broker_call(url, frame, rid))
        if not isinstance(reply, wire.MeshCreated):
            raise ApiError(errors.INTERNAL, f"the broker answered {type(reply).__name__}")
        cfg = WorkspaceConfig(
            name=name,
            mesh_id=reply.mesh_id,
            member_id=reply.member_id,
            broker_url=url,
            display_name=display,
            role="admin",
            root_key=base64.b64encode(os.urandom(32)).decode(),
            key_id=proposed,
        )
        return await self._add(cfg)

    async def m_ws_join(self, conn: IpcConn, params: dict[str, Any]) -> Any:
        text = _param(params, "link", str, required=True)
        try:
            link = invites.parse_link(text)
        except invites.InviteLinkError as exc:
            raise ApiError(ipc.INVALID_PARAMS, str(exc)) from None
        for ws in self.workspaces.values():
            if ws.cfg.mesh_id == link.mesh_id:
                raise ApiError(ipc.CONFLICT, f"already a member of this workspace as {ws.name!r}")
        display = _param(params, "display_name", str, default="") or _default_display_name()
        claim = invites.claim_keypair(link.secret, link.invite_id)
        key_id = link.mesh_id
        member = crypto.KeyPair(crypto.member_seed(self.root_secret, key_id))
        if link.key_id and link.key_pubkey:
            mine = crypto.KeyPair(crypto.member_seed(self.root_secret, link.key_id))
            if mine.public_hex == link.key_pubkey:  # the inviting admin is us, elsewhere
                key_id, member = link.key_id, mine
        ts = now_ms()
        rid = "claim-" + secrets.token_hex(4)
        frame = wire.InviteClaim(
            id=rid,
            mesh_id=link.mesh_id,
            invite_id=link.invite_id,
            member_pubkey=member.public_hex,
            display_name=display,
            timestamp=ts,
            signature=claim.sign(
                wire.invite_claim_canonical(link.mesh_id, link.invite_id, member.public_hex, ts)
            ),
        )
        reply = await _broker(broker_call(link.broker_url, frame, rid))
        if not isinstance(reply, wire.InviteClaimed):
            raise ApiError(errors.INTERNAL, f"the broker answered {type(reply).__name__}")
        try:
            payload = invites.open_payload(link.secret, link.invite_id, reply.sealed)
        except ValueError as exc:
            raise ApiError(errors.BAD_SIGNATURE, str(exc)) from None
        admin = str(payload.get("adminPubkey", ""))
        canonical = wire.invite_canonical(
            link.mesh_id,
            link.invite_id,
            str(payload.get("role")),
            int(payload.get("uses", 0)),
            int(payload.get("expiresAt", 0)),
            claim.public_hex,
            hashlib.sha256(reply.sealed.encode()).hexdigest(),
        )
        if (
            admin != reply.admin_pubkey
            or reply.claim_pubkey != claim.public_hex
            or payload.get("meshId") != link.mesh_id
            or not crypto.verify(admin, canonical, reply.admin_signature)
        ):
            raise ApiError(
                errors.BAD_SIGNATURE,
                "the invite is not signed by the workspace admin it names; not joining",
            )
        try:
            if len(base64.b64decode(str(payload["rootKey"]), validate=True)) != 32:
                raise ValueError
        except (KeyError, ValueError):
            raise ApiError(
                errors.BAD_SIGNATURE, "the invite payload carries no usable workspace key"
            ) from None
        name = _opt(params, "name", str) or str(payload.get("name", ""))
        self._check_new_name(name)
        cfg = WorkspaceConfig(
            name=name,
            mesh_id=link.mesh_id,
            member_id=reply.member_id,
            broker_url=link.broker_url,
            display_name=display,
            role=reply.role,
            root_key=str(payload["rootKey"]),
            key_id=key_id,
        )
        return await self._add(cfg)

    async def m_ws_list(self, conn: IpcConn, params: dict[str, Any]) -> Any:
        out = []
        for ws in self.workspaces.values():
            out.append(
                {**ws.cfg.public(), "member_pubkey": ws.member.public_hex, "link": ws.link_state}
            )
        return {"default": self.default, "workspaces": out}

    def _ws_choices(self) -> dict[str, Any]:
        """Names to suggest for a mistyped workspace (none when there is none)."""
        return {"candidates": sorted(self.workspaces)} if self.workspaces else {}

    async def m_ws_use(self, conn: IpcConn, params: dict[str, Any]) -> Any:
        name = _param(params, "name", str, required=True)
        if name not in self.workspaces:
            raise ApiError(ipc.NOT_FOUND, f"no workspace named {name!r}", **self._ws_choices())
        self.default = name
        self.home.save_state({"default": name})
        return {"default": name}

    async def m_ws_leave(self, conn: IpcConn, params: dict[str, Any]) -> Any:
        name = _param(params, "name", str, required=True)
        force = _param(params, "force", bool, default=False)
        ws = self.workspaces.get(name)
        if ws is None:
            raise ApiError(ipc.NOT_FOUND, f"no workspace named {name!r}", **self._ws_choices())
        counts = await ws.store.counts()
        unsent = counts["pending"] + counts["inflight"]
        if unsent and not force:
            raise ApiError(
                ipc.CONFLICT,
                f"workspace {name!r} still has {unsent} message(s) not yet on the broker; "
                "wait for them (claudemesh outbox list) or leave with --force",
                unsent=unsent,
            )
        if self.workspaces.get(name) is not ws:  # a concurrent leave won
            raise ApiError(ipc.NOT_FOUND, f"no workspace named {name!r}", **self._ws_choices())
        del self.workspaces[name]
        ws.cancel_scope.cancel()
        await ws.stopped.wait()  # no task may touch the store once it is closed
        self._servers.pop(name, None)
        await ws.store.aclose()  # waits for a subscription's read in flight
        ws.notify()  # its subscriptions see that it was left and end
        archived = self.home.archive_workspace(name)
        if self.default == name:
            self.default = None
            self.home.save_state({})
        return {"archived": str(archived) if archived else None}

    # -------------------------------------------------------- invites

    async def m_invite_create(self, conn: IpcConn, params: dict[str, Any]) -> Any:
        ws = self.workspace_for(conn, params)
        role = _param(params, "role", str, default="member")
        if role not in ("member", "admin"):
            raise ApiError(ipc.INVALID_PARAMS, "param `role` must be member or admin")
        uses = _param(params, "uses", int, default=1)
        expires_s = _param(params, "expires_s", int, default=86400)
        if uses < 1 or expires_s < 1:
            raise ApiError(ipc.INVALID_PARAMS, "params `uses` and `expires_s` must be positive")
        invite_id = ids.uuid7()
        secret = os.urandom(32)
        expires_at = now_ms() + expires_s * 1000
        claim = invites.claim_keypair(secret, invite_id)
        payload = {
            "v": 1,
            "meshId": ws.cfg.mesh_id,
            "name": ws.name,
            "brokerUrl": ws.cfg.broker_url,
            "rootKey": ws.cfg.root_key,
            "role": role,
            "uses": uses,
            "expiresAt": expires_at,
            "adminPubkey": ws.member.public_hex,
        }
        sealed = invites.seal_payload(secret, invite_id, payload)
        sig = ws.member.sign(
            wire.invite_canonical(
                ws.cfg.mesh_id,
                invite_id,
                role,
                uses,
                expires_at,
                claim.public_hex,
                hashlib.sha256(sealed.encode()).hexdigest(),
            )
        )
        rid = ws.next_id("invite")
        frame = wire.InvitePut(
            id=rid,
            invite_id=invite_id,
            role=role,
            uses=uses,
            expires_at=expires_at,
            claim_pubkey=claim.public_hex,
            sealed=sealed,
            signature=sig,
        )
        reply = await _broker(ws.request(frame, rid, wait_link_s=10.0))
        if isinstance(reply, wire.Error):
            raise _broker_error(reply.code, reply.message)
        keyed = ws.cfg.key_id != ws.cfg.mesh_id
        link = invites.InviteLink(
            ws.cfg.broker_url,
            ws.cfg.mesh_id,
            invite_id,
            secret,
            key_id=ws.cfg.key_id if keyed else None,
            key_pubkey=ws.member.public_hex if keyed else None,
        )
        return {
            "link": str(link),
            "invite_id": invite_id,
            "expires_at": expires_at,
            "role": role,
            "uses": uses,
        }

    # ---------------------------------------------------------- peers

    async def m_peer_list(self, conn: IpcConn, params: dict[str, Any]) -> Any:
        ws = self.workspace_for(conn, params)
        if _param(params, "refresh", bool, default=True):
            try:
                await ws.refresh_peers()
            except (LinkDown, BrokerRefused):
                pass  # offline: answer from the cache
        me = ws.member.public_hex
        my_sessions = {s.pubkey: sid for sid, s in ws.sessions.items()}
        out = []
        for p in ws.peers:
            q = dict(p)
            q["is_self"] = p["pubkey"] == me or p["pubkey"] in my_sessions
            if p["pubkey"] in my_sessions:
                q["session_id"] = my_sessions[p["pubkey"]]
            out.append(q)
        return {"peers": out}

    def _resolve(self, ws: Workspace, to: str) -> tuple[str, str, list[dict[str, Any]]]:
        """``to`` -> (target_spec, kind, recipients[{pubkey, display_name}])."""
        me = ws.member.public_hex
        members = {p["pubkey"]: p for p in ws.peers if not p.get("is_session")}
        if to in ("*", "@all"):
            rec = [
                {"pubkey": k, "display_name": p["display_name"]}
                for k, p in members.items()
                if k != me
            ]
            return "*", "broadcast", rec
        if to.startswith("@") and len(to) > 1:
            g = to[1:]
            rec = [
                {"pubkey": k, "display_name": p["display_name"]}
                for k, p in members.items()
                if k != me and any(x == g or x.startswith(g + "/") for x in p.get("groups", []))
            ]
            return to, "group", rec
        if to.startswith("#") and len(to) > 1:
            return to, "topic", []
        low = to.lower()
        if wire.is_pubkey_hex(low):
            if not _is_valid_point(low):
                raise ApiError(
                    ipc.INVALID_PARAMS, f"param `to`: {low} is not a valid ed25519 public key"
                )
            name = next((p["display_name"] for p in ws.peers if p["pubkey"] == low), "")
            return low, "direct", [{"pubkey": low, "display_name": name}]
        if len(low) >= 4 and all(c in "0123456789abcdef" for c in low):
            hits = {p["pubkey"]: p for p in ws.peers if p["pubkey"].startswith(low)}
            if len(hits) == 1:
                k, p = next(iter(hits.items()))
                return k, "direct", [{"pubkey": k, "display_name": p["display_name"]}]
            if len(hits) > 1:
                raise ApiError(
                    ipc.AMBIGUOUS,
                    f"{to!r} matches {len(hits)} keys; give more characters",
                    candidates=[
                        {"pubkey": k, "display_name": p["display_name"]} for k, p in hits.items()
                    ],
                )
        named = [p for p in ws.peers if p["display_name"].lower() == low]
        member_named = {p["pubkey"]: p for p in named if not p.get("is_session")}
        pool = member_named or {p["pubkey"]: p for p in named}
        if len(pool) == 1:
            k, p = next(iter(pool.items()))
            return k, "direct", [{"pubkey": k, "display_name": p["display_name"]}]
        if len(pool) > 1:
            raise ApiError(
                ipc.AMBIGUOUS,
                f"{len(pool)} peers are called {to!r}; use a key prefix",
                candidates=[
                    {"pubkey": k, "display_name": p["display_name"]} for k, p in pool.items()
                ],
            )
        names = sorted({p["display_name"] for p in ws.peers})
        raise ApiError(
            ipc.NOT_FOUND,
            f"no peer called {to!r} in {ws.name} (try `peer list`)",
            candidates=difflib.get_close_matches(to, names, n=5, cutoff=0.5),
        )

    # -------------------------------------------------------- messages

    def _send_row(
        self, ws: Workspace, params: dict[str, Any], conn: IpcConn, cmid: str | None = None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        to = _param(params, "to", str, required=True)
        body = _param(params, "body", str, required=True)
        if len(body.encode()) > MAX_BODY:
            raise ApiError(
                ipc.INVALID_PARAMS, f"param `body` is over {MAX_BODY} bytes; send a smaller message"
            )
        cmid = cmid or _opt(params, "client_message_id", str) or ids.new_message_id()
        if not ids.is_client_message_id(cmid):
            raise ApiError(
                ipc.INVALID_PARAMS,
                "param `client_message_id` must be 1-128 printable ASCII characters without spaces",
            )
        priority = _param(params, "priority", str, default="next")
        if priority not in PRIORITIES:
            raise ApiError(ipc.INVALID_PARAMS, "param `priority` must be now, next or low")
        reply_to = _opt(params, "reply_to", str)
        meta = _opt(params, "meta", dict)
        if meta is not None and not all(isinstance(v, str) for v in meta.values()):
            raise ApiError(ipc.INVALID_PARAMS, "param `meta` must map strings to strings")
        if meta:
            # The v0.1 send frame has nowhere to carry it (the body is the bare
            # text), so accepting it would silently drop it.
            raise ApiError(
                ipc.INVALID_PARAMS, "param `meta` is not carried to recipients yet; leave it out"
            )
        session_id = _opt(params, "session_id", str)
        if session_id is None and conn.hello is not None and conn.hello.session_id in ws.sessions:
            session_id = conn.hello.session_id
        target, kind, recipients = self._resolve(ws, to)
        topic = topic_id_for(target)
        fp = crypto.request_fingerprint(
            kind=kind, ref=target, reply_to=reply_to, priority=priority, meta=meta, body=body
        )
        row = {
            "client_message_id": cmid,
            "fingerprint": fp,
            "state": "pending",
            "target": to,
            "target_spec": target,
            "kind": kind,
            "topic": topic,
            "body": body,
            "priority": priority,
            "reply_to": reply_to,
            "meta": json.dumps(meta) if meta else None,
            "session_id": session_id,
            "created_at": now_ms(),
            "recipients": json.dumps(recipients),
        }
        return row, recipients

    async def m_send(self, conn: IpcConn, params: dict[str, Any]) -> Any:
        ws = self.workspace_for(conn, params)
        try:
            row, _ = self._send_row(ws, params, conn)
        except ApiError as exc:
            if exc.code != ipc.NOT_FOUND or ws.link_state != "connected":
                raise
            # A member who joined since our last peer list: ask the broker once.
            try:
                await ws.refresh_peers()
            except (LinkDown, BrokerRefused):
                raise exc from None
            row, _ = self._send_row(ws, params, conn)
        live = ws.link_up
        if live:  # committed already claimed, then handed to the pump in memory
            row.update(state="inflight", attempts=1, next_attempt_at=now_ms() + INFLIGHT_LEASE_MS)
        outcome, stored = await ws.store.accept(row)
        if outcome == "conflict":
            raise ApiError(
                ipc.CONFLICT,
                f"client message id {row['client_message_id']!r} was already used for a "
                f"different message (to {stored['target']!r}, now {stored['state']})",
                state=stored["state"],
                client_message_id=stored["client_message_id"],
            )
        if outcome == "new":
            if live:
                ws.hand_over(row)
            else:
                ws.wake_outbox()
        return {
            "client_message_id": stored["client_message_id"],
            "state": "accepted",
            "duplicate": outcome == "duplicate",
            "recipients": json.loads(stored["recipients"]),
            "target": stored["target_spec"],
        }

    async def _status(self, ws: Workspace, cmid: str) -> dict[str, Any]:
        row, receipts = await ws.store.get_with_receipts(cmid)
        if row is None:
            raise ApiError(ipc.NOT_FOUND, f"no sent message with client message id {cmid!r}")
        names = {r["pubkey"]: r["display_name"] for r in json.loads(row["recipients"])}
        names.update({p["pubkey"]: p["display_name"] for p in ws.peers})
        recips = []
        for r in receipts:
            d = {
                "pubkey": r["recipient_pubkey"],
                "display_name": names.get(r["recipient_pubkey"], ""),
                "state": r["state"],
                "at": r["at"],
            }
            if r["reason"]:
                d["reason"] = r["reason"]
            recips.append(d)
        live = [r["state"] for r in recips if r["state"] in STATES_ORDER]
        if row["state"] == "dead":
            state = "failed"
        elif live:
            state = min(live, key=STATES_ORDER.index)
            if state == "accepted" and row["state"] == "done":
                state = "sent"
        elif recips:
            state = "failed" if any(r["state"] == "failed" for r in recips) else "expired"
        else:
            state = "sent" if row["state"] == "done" else "accepted"
        out: dict[str, Any] = {
            "client_message_id": cmid,
            "state": state,
            "outbox_state": row["state"],
            "attempts": row["attempts"],
            "created_at": row["created_at"],
            "target": row["target_spec"],
            "recipients": recips,
        }
        if row["last_error"]:
            out["last_error"] = row["last_error"]
        if row["broker_message_id"]:
            out["broker_message_id"] = row["broker_message_id"]
        if row["requeued_as"]:
            out["requeued_as"] = row["requeued_as"]
        return out

    async def m_msg_status(self, conn: IpcConn, params: dict[str, Any]) -> Any:
        ws = self.workspace_for(conn, params)
        return await self._status(ws, _param(params, "client_message_id", str, required=True))

    async def m_msg_wait(self, conn: IpcConn, params: dict[str, Any]) -> Any:
        ws = self.workspace_for(conn, params)
        cmid = _param(params, "client_message_id", str, required=True)
        want = _param(params, "state", str, required=True)
        if want not in STATES_ORDER:
            raise ApiError(
                ipc.INVALID_PARAMS, f"param `state` must be one of {', '.join(STATES_ORDER)}"
            )
        timeout = _param(params, "timeout_s", float, default=30.0)
        status: dict[str, Any] = {}
        with trio.move_on_after(max(0.0, timeout)):
            while True:
                changed = ws.changed
                status = await self._status(ws, cmid)
                s = status["state"]
                if s in ("failed", "expired") or (
                    s in STATES_ORDER and STATES_ORDER.index(s) >= STATES_ORDER.index(want)
                ):
                    return status
                await changed.wait()
        raise ApiError(ipc.TIMEOUT, f"{cmid} did not reach {want} in {timeout:g}s", **status)

    async def m_inbox(self, conn: IpcConn, params: dict[str, Any]) -> Any:
        ws = self.workspace_for(conn, params)
        limit = _param(params, "limit", int, default=50)
        if not 1 <= limit <= 1000:
            raise ApiError(ipc.INVALID_PARAMS, "param `limit` must be 1..1000")
        mark = _param(params, "mark_seen", bool, default=True)
        rows = await ws.store.inbox_list(
            unread=_param(params, "unread", bool, default=False),
            limit=limit,
            before=_opt(params, "before_cursor", int),
            after=_opt(params, "after_cursor", int),
            mark_seen=False,
        )
        msgs = [message_view(r, ws, r["id"]) for r in rows]
        if mark and rows:
            await ws.surface([r["id"] for r in rows])
        cursor = max((r["id"] for r in rows), default=_opt(params, "after_cursor", int) or 0)
        return {"messages": msgs, "cursor": cursor}

    async def m_subscribe(self, conn: IpcConn, params: dict[str, Any], sub_id: int = 0) -> Any:
        ws = self.workspace_for(conn, params)
        start = _opt(params, "cursor", int)
        kinds = _opt(params, "kinds", list)
        session_id = _opt(params, "session_id", str) or (
            conn.hello.session_id if conn.hello is not None else None
        )
        session = ws.sessions.get(session_id) if session_id else None
        my_key = session.pubkey if session is not None else None
        # A session's stream, or a reader that prints what it gets (the CLI's
        # `inbox --follow`), takes each message: seen, and surfaced once.
        takes = session is not None or _param(params, "mark_seen", bool, default=False)
        head = await ws.store.head()
        if start is not None and start > head:
            # Event cursors never go back, so this one came from an earlier store
            # of the same name (left and joined again); waiting for it to be
            # reached would silently skip everything before it.
            raise ApiError(
                "cursor_ahead",
                f"cursor {start} is past the newest event of {ws.name} ({head}); "
                "subscribe from 0 (or without a cursor) to read this workspace",
                head=head,
            )
        cursor = head if start is None else start

        async def stream() -> None:
            nonlocal cursor
            while True:
                changed = ws.changed
                if self.workspaces.get(ws.name) is not ws:
                    raise ApiError(ipc.NO_WORKSPACE, f"workspace {ws.name!r} was left")
                rows = await ws.store.events_with_messages(cursor)
                if not rows:
                    await changed.wait()
                    continue
                surfaced: list[int] = []
                try:
                    for r, row in rows:
                        cursor = r["cursor"]
                        if kinds and r["kind"] not in kinds:
                            continue
                        surface_id = None
                        if r["kind"] == "message":
                            # Session routing: a session key's mail goes only to that
                            # session (other sessions skip it; the user's own reader,
                            # no session, sees all); a session never sees its own sends.
                            if (
                                session_id is not None
                                and r["session_pubkey"]
                                and r["session_pubkey"] != my_key
                            ):
                                continue
                            if my_key is not None and r["from_pubkey"] == my_key:
                                continue
                            if row is None:
                                continue
                            data = message_view(row, ws, row["id"])
                            if takes:
                                surface_id = row["id"]
                        else:
                            data = json.loads(r["data"])
                        await conn.send(
                            ipc.Event(sub=sub_id, cursor=r["cursor"], kind=r["kind"], data=data)
                        )
                        if surface_id is not None:
                            surfaced.append(surface_id)
                finally:
                    # Written to the session's socket: surfaced, even if the
                    # subscriber hangs up right after reading it.
                    if surfaced:
                        with trio.CancelScope(shield=True), trio.move_on_after(5):
                            await ws.surface(surfaced)

        return Streaming({"cursor": head}, stream)

    # ---------------------------------------------- presence, sessions

    async def m_status_set(self, conn: IpcConn, params: dict[str, Any]) -> Any:
        ws = self.workspace_for(conn, params)
        status = _param(params, "status", str, required=True)
        if status not in ("idle", "working", "dnd"):
            raise ApiError(ipc.INVALID_PARAMS, "param `status` must be idle, working or dnd")
        skey = self._session_key(ws, params)
        if skey is None:
            ws.status = status
        try:
            await ws.send_frame(wire.SetStatus(status=status, session_pubkey=skey))
        except LinkDown:
            pass  # re-sent on connect
        return {}

    async def m_summary_set(self, conn: IpcConn, params: dict[str, Any]) -> Any:
        ws = self.workspace_for(conn, params)
        summary = _param(params, "summary", str, required=True)
        skey = self._session_key(ws, params)
        if skey is None:
            ws.summary = summary
        try:
            await ws.send_frame(wire.SetSummary(summary=summary, session_pubkey=skey))
        except LinkDown:
            pass
        return {}

    def _session_key(self, ws: Workspace, params: dict[str, Any]) -> str | None:
        sid = _opt(params, "session_id", str)
        if sid is None:
            return None
        s = ws.sessions.get(sid)
        if s is None:
            raise ApiError(ipc.NOT_FOUND, f"no registered session {sid!r}")
        return s.pubkey

    async def m_session_register(self, conn: IpcConn, params: dict[str, Any]) -> Any:
        ws = self.workspace_for(conn, params)
        sid = _opt(params, "session_id", str) or ids.uuid7()
        if not ids.is_client_message_id(sid):
            raise ApiError(ipc.INVALID_PARAMS, "param `session_id` must be 1-128 printable ASCII")
        pid = _param(params, "pid", int, required=True)
        cwd = _param(params, "cwd", str, default="")
        watch = _opt(params, "claude_pid", int) or pid
        start = proc_starttime(watch)
        if start is None and _HAS_PROC:
            raise ApiError(ipc.INVALID_PARAMS, f"no process with pid {watch}")
        s = ws.add_session(sid, pid, cwd, watch, start)
        await ws.save_sessions()
        try:
            await ws.present_session(s)
        except (LinkDown, BrokerRefused) as exc:
            log.info("session %s not yet presented: %s", sid, exc)
        return {"session_id": sid, "session_pubkey": s.pubkey}

    async def m_session_unregister(self, conn: IpcConn, params: dict[str, Any]) -> Any:
        ws = self.workspace_for(conn, params)
        sid = _param(params, "session_id", str, required=True)
        if sid not in ws.sessions:
            raise ApiError(ipc.NOT_FOUND, f"no registered session {sid!r}")
        await ws.drop_session(sid)
        return {}

    # ------------------------------------------------------------ outbox

    async def m_outbox_list(self, conn: IpcConn, params: dict[str, Any]) -> Any:
        ws = self.workspace_for(conn, params)
        state = _opt(params, "state", str)
        rows = await ws.store.list_outbox(state)
        out = []
        for r in rows:
            d = {
                "client_message_id": r["client_message_id"],
                "state": r["state"],
                "target": r["target_spec"],
                "attempts": r["attempts"],
                "created_at": r["created_at"],
            }
            if r["last_error"]:
                d["last_error"] = r["last_error"]
            if r["state"] == "pending" and r["next_attempt_at"]:
                d["next_attempt_at"] = r["next_attempt_at"]
            if r["requeued_as"]:
                d["requeued_as"] = r["requeued_as"]
            out.append(d)
        return {"rows": out}

    async def m_outbox_requeue(self, conn: IpcConn, params: dict[str, Any]) -> Any:
        ws = self.workspace_for(conn, params)
        old = _param(params, "client_message_id", str, required=True)
        row = await ws.store.get_outbox(old)
        if row is None:
            raise ApiError(ipc.NOT_FOUND, f"no outbox row {old!r}")
        new = dict(row)
        new.update(
            client_message_id=ids.new_message_id(),
            state="pending",
            created_at=now_ms(),
            attempts=0,
            next_attempt_at=0,
            last_error=None,
            broker_message_id=None,
            requeued_as=None,
        )
        outcome = await ws.store.requeue(old, new)
        if outcome != "ok":
            raise ApiError(
                ipc.CONFLICT,
                f"{old} is {outcome}; only pending, inflight or dead rows can be requeued",
                state=outcome,
            )
        ws.wake_outbox()
        return {"old_client_message_id": old, "client_message_id": new["client_message_id"]}

    async def m_verify(self, conn: IpcConn, params: dict[str, Any]) -> Any:
        ws = self.workspace_for(conn, params)
        peer = _param(params, "peer", str, required=True)
        target, kind, rec = self._resolve(ws, peer)
        if kind != "direct":
            raise ApiError(ipc.INVALID_PARAMS, "param `peer` must name one peer")
        p = next((x for x in ws.peers if x["pubkey"] == target), None)
        member_key = (p or {}).get("member_pubkey") or target
        return {
            "safety_number": crypto.safety_number(ws.member.public_hex, member_key),
            "self_pubkey": ws.member.public_hex,
            "peer_pubkey": member_key,
            "peer_name": rec[0]["display_name"],
        }

    async def m_quarantine(self, conn: IpcConn, params: dict[str, Any]) -> Any:
        ws = self.workspace_for(conn, params)
        return {"rows": await ws.store.list_quarantine()}


async def _broker(aw: Any) -> Any:
    """Await a broker operation, mapping link failures and refusals to ApiError."""
    try:
        reply = await aw
    except LinkDown as exc:
        raise ApiError(ipc.BROKER_UNREACHABLE, str(exc)) from None
    except BrokerRefused as exc:
        raise _broker_error(exc.code, exc.message) from None
    if isinstance(reply, wire.Error):
        raise _broker_error(reply.code, reply.message)
    return reply


def _broker_error(code: str, message: str) -> ApiError:
    text = {
        errors.INVITE_NOT_FOUND: "this invite does not exist on the broker (revoked or mistyped)",
        errors.INVITE_EXPIRED: "this invite has expired; ask for a new one",
        errors.INVITE_REVOKED: "this invite was revoked; ask for a new one",
        errors.INVITE_EXHAUSTED: "this invite has been used up; ask for a new one",
        errors.FORBIDDEN: "only a workspace admin can do that",
    }.get(code)
    return ApiError(code, text or f"the broker refused: {message or code}", broker_message=message)


@functools.lru_cache(maxsize=4096)
def _is_valid_point(pubkey_hex: str) -> bool:
    try:
        crypto.ed25519_pk_to_x25519(bytes.fromhex(pubkey_hex))
    except CryptoError:
        return False
    return True


def _default_display_name() -> str:
    return os.environ.get("USER") or os.environ.get("LOGNAME") or "me"


_METHODS: dict[str, Any] = {
    "daemon.status": Daemon.m_status,
    "daemon.stop": Daemon.m_stop,
    "workspace.create": Daemon.m_ws_create,
    "workspace.join": Daemon.m_ws_join,
    "workspace.list": Daemon.m_ws_list,
    "workspace.use": Daemon.m_ws_use,
    "workspace.leave": Daemon.m_ws_leave,
    "invite.create": Daemon.m_invite_create,
    "peer.list": Daemon.m_peer_list,
    "message.send": Daemon.m_send,
    "message.status": Daemon.m_msg_status,
    "message.wait": Daemon.m_msg_wait,
    "message.inbox": Daemon.m_inbox,
    "subscribe": Daemon.m_subscribe,
    "status.set": Daemon.m_status_set,
    "summary.set": Daemon.m_summary_set,
    "session.register": Daemon.m_session_register,
    "session.unregister": Daemon.m_session_unregister,
    "outbox.list": Daemon.m_outbox_list,
    "outbox.requeue": Daemon.m_outbox_requeue,
    "verify": Daemon.m_verify,
    "quarantine.list": Daemon.m_quarantine,
}
