"""``claudemesh-broker``: run the broker, and administer its database.

Admin commands open the same SQLite file as a running ``serve`` (WAL lets
them work side by side) and print only the new id, or a table for ``list``.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, NoReturn

import cyclopts
import platformdirs

from claudemesh.shared.protocol import wire

if TYPE_CHECKING:
    from .store import SqliteDB

app = cyclopts.App(
    name="claudemesh-broker",
    help="The claudemesh routing-only broker and its admin commands.",
)
mesh_app = cyclopts.App(name="mesh", help="Workspaces (meshes) in the broker database.")
member_app = cyclopts.App(name="member", help="Members of a mesh.")
app.command(mesh_app)
app.command(member_app)


def default_db() -> Path:
    """The database path when ``--db`` is not given."""
    env = os.environ.get("CLAUDEMESH_BROKER_DB")
    if env:
        return Path(env)
    return Path(platformdirs.user_data_dir("claudemesh")) / "broker.db"


def _fail(message: str, code: int = 1) -> NoReturn:
    print(f"claudemesh-broker: {message}", file=sys.stderr)
    raise SystemExit(code)


def _open(db: Path | None) -> SqliteDB:
    from .store import SqliteDB, StoreError

    try:
        return SqliteDB(db or default_db())
    except StoreError as exc:
        _fail(exc.message, 2)
    except Exception as exc:  # sqlite3 errors, permissions
        _fail(f"cannot open database: {exc}", 2)


@app.command
def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 7900,
    db: Path | None = None,
    port_file: Path | None = None,
    create_token: str | None = None,
    ttl: Annotated[float, cyclopts.Parameter(help="seconds a queued row waits")] = 7 * 86400.0,
    max_ciphertext: int = wire.MAX_CIPHERTEXT,
    rate: float = 500.0,
    burst: int = 2000,
    max_conns_per_mesh: int = 2000,
    max_conns: int = 20000,
    ping_interval: float = 30.0,
    silence_timeout: float = 75.0,
    grace: float = 90.0,
    lease: float = 30.0,
    sweep_interval: float = 60.0,
) -> None:
    """Run the broker on ws://HOST:PORT/ws until SIGINT or SIGTERM.

    Parameters
    ----------
    host
        Interface to listen on (loopback by default).
    port
        TCP port; 0 picks a free one.
    db
        SQLite database file (default: under the user data directory).
    port_file
        Write the bound port here once listening (for tests and scripts).
    create_token
        Token that mesh_create must carry when not listening on loopback.
    """
    import trio

    from .server import BrokerConfig, log, serve_broker
    from .store import SqliteStore, StoreError

    config = BrokerConfig(
        host=host,
        port=port,
        create_token=create_token,
        ttl_ms=int(ttl * 1000),
        max_ciphertext=max_ciphertext,
        rate_per_second=rate,
        rate_burst=burst,
        max_conns_per_mesh=max_conns_per_mesh,
        max_conns_total=max_conns,
        ping_interval=ping_interval,
        silence_timeout=silence_timeout,
        grace=grace,
        lease=lease,
        sweep_interval=sweep_interval,
    )
    path = db or default_db()
    try:
        store = SqliteStore.open(path)
    except StoreError as exc:
        log("store_refused", code=exc.code, error=exc.message)
        _fail(exc.message, 2)
    except Exception as exc:
        log("store_refused", error=repr(exc))
        _fail(f"cannot open database: {exc}", 2)

    async def main() -> None:
        try:
            async with trio.open_nursery() as nursery:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    broker = await nursery.start(serve_broker, store, config)
                    if port_file is not None:
                        tmp = port_file.with_name(port_file.name + ".tmp")
                        tmp.write_text(str(broker.port))
                        tmp.replace(port_file)
                    async for signum in signals:
                        log(
                            "stopping",
                            signal=signal.Signals(signum).name,
                            **broker.statistics(),
                        )
                        nursery.cancel_scope.cancel()
                        break
        finally:
            with trio.CancelScope(shield=True):
                await store.aclose()
            log("stopped")

    failed: OSError | None = None
    try:
        trio.run(main)
    except* OSError as group:  # binding failed (trio raises it inside a group)
        first = group.exceptions[0]
        failed = first if isinstance(first, OSError) else OSError(str(first))
    if failed is not None:
        log("listen_failed", error=str(failed))
        _fail(f"cannot listen on {host}:{port}: {failed}", 3)


@mesh_app.command(name="create")
def mesh_create(name: str, *, db: Path | None = None) -> None:
    """Create a mesh and print its id."""
    from .server import now_ms

    store = _open(db)
    try:
        mesh, _ = store.create_mesh(name, now=now_ms())
    finally:
        store.close()
    print(mesh.id)


@mesh_app.command(name="list")
def mesh_list(*, db: Path | None = None) -> None:
    """List meshes: id, name, member count."""
    store = _open(db)
    try:
        meshes = store.list_meshes()
        rows = [(m.id, m.name, str(len(store.list_members(m.id)))) for m in meshes]
    finally:
        store.close()
    _table(("ID", "NAME", "MEMBERS"), rows)


@member_app.command(name="list")
def member_list(mesh: str, *, db: Path | None = None) -> None:
    """List the members of MESH."""
    from .server import iso

    store = _open(db)
    try:
        if store.get_mesh(mesh) is None:
            _fail(f"no mesh {mesh}")
        members = store.list_members(mesh)
    finally:
        store.close()
    _table(
        ("ID", "NAME", "ROLE", "PUBKEY", "STATE", "LAST_SEEN"),
        [
            (
                m.id,
                m.display_name,
                m.role,
                m.pubkey,
                "revoked" if m.revoked_at is not None else "active",
                iso(m.last_seen_at) if m.last_seen_at else "-",
            )
            for m in members
        ],
    )


@member_app.command(name="add")
def member_add(
    mesh: str,
    *,
    pubkey: str,
    name: str,
    role: Literal["admin", "member"] = "member",
    db: Path | None = None,
) -> None:
    """Register a member key in MESH and print its member id."""
    from .server import now_ms
    from .store import StoreError

    if not wire.is_pubkey_hex(pubkey):
        _fail("--pubkey must be 64 lowercase hex characters")
    if not name or len(name) > 200:
        _fail("--name must be 1-200 characters")
    store = _open(db)
    try:
        member = store.add_member(mesh, pubkey, name, role, now_ms())
    except StoreError as exc:
        _fail(exc.message)
    finally:
        store.close()
    print(member.id)


@member_app.command(name="revoke")
def member_revoke(mesh: str, member: str, *, db: Path | None = None) -> None:
    """Revoke MEMBER (id or public key) of MESH; its next hello is refused."""
    from .server import now_ms
    from .store import StoreError

    store = _open(db)
    try:
        revoked = store.revoke_member(mesh, member, now_ms())
    except StoreError as exc:
        _fail(exc.message)
    finally:
        store.close()
    print(revoked.id)


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def main() -> None:
    """Entry point of ``claudemesh-broker``."""
    app()
