"""Broker load test: N real peers, M crypto_box DMs each, over loopback.

The method of the public claudemesh load test, so figures compare: every peer
has a real keypair and a signed hello (members registered through the admin
API before the run), sends M direct messages with priority ``now`` to random
other peers as fast as it can, and answers every push with ``client_ack``.
We record send->ack (broker committed) and send->push (recipient decrypted)
per message, delivered %, broker peak RSS, broker CPU seconds per delivered
message, wall time and the load generator's own CPU.  The load generator runs
in separate processes from the broker, on the same cores.

    .venv/bin/python bench/broker_load.py burst --peers 10 --messages 100
    .venv/bin/python bench/broker_load.py paced --peers 100 --rate 1000 --seconds 10
    .venv/bin/python bench/broker_load.py idle --peers 5000 --meshes 10
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------- broker side


def proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS bytes) of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    cpu = (int(parts[11]) + int(parts[12])) / tick
    peak = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return cpu, peak


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def setup(db: Path, peers: int, meshes: int) -> list[dict[str, Any]]:
    """Register ``peers`` members over ``meshes`` meshes; return their identities."""
    from claudemesh.broker.store import SqliteDB
    from claudemesh.shared.protocol import crypto

    store = SqliteDB(db)
    out: list[dict[str, Any]] = []
    now = int(time.time() * 1000)
    mesh_ids = [store.create_mesh(f"bench-{i}", now=now)[0].id for i in range(meshes)]
    for i in range(peers):
        seed = crypto.new_root_secret()
        key = crypto.KeyPair(seed)
        mesh = mesh_ids[i % meshes]
        m = store.add_member(mesh, key.public_hex, f"peer{i}", "member", now)
        out.append({"i": i, "mesh": mesh, "member": m.id, "seed": seed.hex(), "pk": key.public_hex})
    store.close()
    return out


def start_broker(workdir: Path, db: Path) -> tuple[subprocess.Popen[bytes], str]:
    port_file = workdir / "port"
    prof = os.environ.get("BENCH_BROKER_PROFILE")  # a path: run the broker under cProfile
    cmd = [
        sys.executable,
        *(["-m", "cProfile", "-o", prof] if prof else []),
        "-m",
        "claudemesh.broker",
        "serve",
        "--port",
        "0",
        "--db",
        str(db),
        "--port-file",
        str(port_file),
        "--rate",
        "1000000",
        "--burst",
        "1000000",
        "--max-conns-per-mesh",
        "100000",
        "--max-conns",
        "100000",
    ]
    err = open(workdir / "broker.stderr", "wb")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return proc, f"ws://127.0.0.1:{port_file.read_text().strip()}/ws"
        if proc.poll() is not None:
            raise SystemExit("broker exited: " + (workdir / "broker.stderr").read_text())
        time.sleep(0.02)
    proc.kill()
    raise SystemExit("broker did not start")


# ------------------------------------------------------------- load generator


def worker(
    url: str,
    mine: list[dict[str, Any]],
    everyone: list[dict[str, Any]],
    args: dict[str, Any],
    ready: Any,
    go: Any,
    stop: Any,
    pushes: Any,
    results: Any,
) -> None:
    import trio
    from trio_websocket import ConnectionClosed, open_websocket_url

    from claudemesh.shared.protocol import crypto, wire

    mode = args["mode"]
    ack_lat: list[float] = []
    push_lat: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    by_mesh: dict[str, list[str]] = {}
    for p in everyone:
        by_mesh.setdefault(p["mesh"], []).append(p["pk"])

    go_event = trio.Event()
    stop_event = trio.Event()
    dialing = trio.Semaphore(32)  # handshakes in flight per load generator process

    async def peer(me: dict[str, Any], connected: Any) -> None:
        nonlocal sent
        key = crypto.KeyPair(bytes.fromhex(me["seed"]))
        others = [pk for pk in by_mesh[me["mesh"]] if pk != me["pk"]]
        pending: dict[str, float] = {}
        window = trio.Semaphore(args["window"])
        local_pushes = 0
        await dialing.acquire()
        async with open_websocket_url(url, max_message_size=4 * 1024 * 1024) as ws:
            ts = int(time.time() * 1000)
            hello = wire.Hello(
                mesh_id=me["mesh"],
                member_id=me["member"],
                pubkey=me["pk"],
                session_id=f"bench{me['i']}",
                pid=os.getpid(),
                cwd="/",
                timestamp=ts,
                signature=key.sign(wire.hello_canonical(me["mesh"], me["member"], me["pk"], ts)),
                display_name=f"peer{me['i']}",
                device_id="bench",
            )
            await ws.send_message(wire.encode_frame(hello).decode())
            first = wire.decode_frame(await ws.get_message())
            assert isinstance(first, wire.HelloAck), first
            dialing.release()
            connected()

            async def reader() -> None:
                nonlocal local_pushes
                try:
                    while True:
                        msg = await ws.get_message()
                        if '"subtype":"system"' in msg or '"type":"receipt"' in msg:
                            continue  # presence noise and receipts: not measured
                        f = wire.decode_frame(msg)
                        if isinstance(f, wire.Ack):
                            t0 = pending.pop(f.id, None)
                            if f.queued and t0 is not None:
                                ack_lat.append(time.monotonic() - t0)
                            elif not f.queued:
                                code = f.error.code if f.error else "?"
                                errors[code] = errors.get(code, 0) + 1
                            window.release()
                        elif isinstance(f, wire.Push) and f.subtype is None:
                            body = crypto.box_decrypt(
                                f.nonce,
                                f.ciphertext,
                                recipient=key,
                                sender_pubkey_hex=f.sender_pubkey,
                            )
                            t0 = float(body.split(b"|", 1)[0])
                            push_lat.append(time.monotonic() - t0)
                            await ws.send_message(
                                wire.encode_frame(
                                    wire.ClientAck(broker_message_id=f.message_id)
                                ).decode()
                            )
                            local_pushes += 1
                            with pushes.get_lock():
                                pushes.value += 1
                except ConnectionClosed:
                    pass

            async def send_one(n: int) -> None:
                nonlocal sent
                to = random.choice(others)
                t0 = time.monotonic()
                nonce, ct = crypto.box_encrypt(
                    f"{t0!r}|msg {n} from peer{me['i']}".encode(),
                    sender=key,
                    recipient_pubkey_hex=to,
                )
                rid = str(n)
                pending[rid] = t0
                await ws.send_message(
                    wire.encode_frame(
                        wire.Send(
                            id=rid,
                            target_spec=to,
                            priority="now",
                            nonce=nonce,
                            ciphertext=ct,
                            client_message_id=f"{me['i']}-{n}",
                        )
                    ).decode()
                )
                sent += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await go_event.wait()
                if mode == "burst":
                    for n in range(args["messages"]):
                        await window.acquire()
                        await send_one(n)
                elif mode == "paced":
                    interval = args["peers"] / args["rate"]
                    start = trio.current_time() + random.random() * interval
                    total = int(args["seconds"] * args["rate"] / args["peers"])
                    for n in range(total):
                        await trio.sleep_until(start + n * interval)
                        await window.acquire()
                        await send_one(n)
                await stop_event.wait()
                nursery.cancel_scope.cancel()

    async def main() -> None:
        count = 0
        done = trio.Event()

        def connected() -> None:
            nonlocal count
            count += 1
            if count == len(mine):
                done.set()

        async with trio.open_nursery() as nursery:
            for i, me in enumerate(mine):
                nursery.start_soon(peer, me, connected)
                if i % 50 == 49:
                    await trio.sleep(0.05)
            await done.wait()
            ready.put(len(mine))
            await trio.to_thread.run_sync(go.wait)
            go_event.set()
            await trio.to_thread.run_sync(stop.wait)
            stop_event.set()

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    trio.run(main)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    results.put({"ack": ack_lat, "push": push_lat, "errors": errors, "sent": sent, "cpu": cpu})


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="cm-bench-") as tmp:
        workdir = Path(tmp)
        db = workdir / "broker.db"
        peers = setup(db, args.peers, args.meshes)
        broker, url = start_broker(workdir, db)
        try:
            ready, results = ctx.Queue(), ctx.Queue()
            go, stop = ctx.Event(), ctx.Event()
            pushes = ctx.Value("q", 0)
            shares = [peers[i :: args.workers] for i in range(args.workers)]
            wargs = {
                "mode": args.mode,
                "messages": args.messages,
                "window": args.window,
                "peers": args.peers,
                "rate": args.rate,
                "seconds": args.seconds,
            }
            procs = [
                ctx.Process(
                    target=worker,
                    args=(url, share, peers, wargs, ready, go, stop, pushes, results),
                )
                for share in shares
                if share
            ]
            for p in procs:
                p.start()
            for _ in procs:
                ready.get(timeout=600)
            idle_rss = rss(broker.pid)
            cpu0, _ = proc_stats(broker.pid)
            if args.mode == "idle":
                time.sleep(args.seconds)
                cpu1, peak = proc_stats(broker.pid)
                stop.set()
                go.set()
                out: dict[str, Any] = {
                    "mode": "idle",
                    "peers": args.peers,
                    "meshes": args.meshes,
                    "broker_rss_mb": rss(broker.pid) / 2**20,
                    "broker_peak_rss_mb": peak / 2**20,
                    "broker_cpu_s_idle": cpu1 - cpu0,
                }
                for p in procs:
                    p.join(60)
                return out
            expected = (
                args.peers * args.messages
                if args.mode == "burst"
                else args.peers * int(args.seconds * args.rate / args.peers)
            )
            t0 = time.monotonic()
            go.set()
            deadline = t0 + args.timeout
            while time.monotonic() < deadline and pushes.value < expected:
                time.sleep(0.01)
            wall = time.monotonic() - t0
            cpu1, peak = proc_stats(broker.pid)
            stop.set()
            res = [results.get(timeout=120) for _ in procs]
            for p in procs:
                p.join(60)
            ack = [x for r in res for x in r["ack"]]
            push = [x for r in res for x in r["push"]]
            errs: dict[str, int] = {}
            for r in res:
                for k, v in r["errors"].items():
                    errs[k] = errs.get(k, 0) + v
            delivered = len(push)
            bcpu = cpu1 - cpu0
            return {
                "mode": args.mode,
                "peers": args.peers,
                "messages": args.messages if args.mode == "burst" else None,
                "rate": args.rate if args.mode == "paced" else None,
                "expected": expected,
                "sent": sum(r["sent"] for r in res),
                "acked": len(ack),
                "delivered": delivered,
                "delivered_pct": 100.0 * delivered / expected if expected else 0.0,
                "errors": errs,
                "wall_s": wall,
                "ack_ms": {
                    k: 1000 * pct(ack, q)
                    for k, q in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))
                },
                "push_ms": {
                    k: 1000 * pct(push, q)
                    for k, q in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))
                },
                "mean_push_ms": 1000 * statistics.fmean(push) if push else None,
                "broker_peak_rss_mb": peak / 2**20,
                "broker_idle_rss_mb": idle_rss / 2**20,
                "broker_cpu_s": bcpu,
                "broker_cpu_us_per_msg": 1e6 * bcpu / delivered if delivered else None,
                "loadgen_cpu_s": sum(r["cpu"] for r in res),
            }
        finally:
            broker.terminate()
            try:
                broker.wait(30)
            except subprocess.TimeoutExpired:
                broker.kill()
                broker.wait()
            if args.verbose:
                for line in (workdir / "broker.stderr").read_text().splitlines():
                    if '"stopping"' in line or "error" in line:
                        print(line, file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("mode", choices=["burst", "paced", "idle"])
    ap.add_argument("--peers", type=int, default=10)
    ap.add_argument("--messages", type=int, default=100, help="per peer (burst)")
    ap.add_argument("--rate", type=float, default=1000.0, help="total messages/s (paced)")
    ap.add_argument("--seconds", type=float, default=10.0, help="paced duration / idle hold")
    ap.add_argument("--meshes", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2, help="load generator processes")
    ap.add_argument(
        "--window", type=int, default=1, help="unacked sends per peer (1: wait for each ack)"
    )
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--verbose", action="store_true", help="print the broker's final stats")
    args = ap.parse_args()
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
