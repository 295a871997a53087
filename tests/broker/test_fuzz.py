"""Security property 4: mutated and garbage frames never crash the broker or lose rows."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from cmtest.broker import open_inproc_broker, open_peer

from claudemesh.shared.protocol import wire

VALUES: list[Any] = [None, 0, -1, 2**70, 1.5, "", "x" * 300, [], {}, [1, "a"], {"a": 1}, True]


def mutations(seed: int, n: int, samples: list[dict[str, Any]]) -> list[str | bytes]:
    rng = random.Random(seed)
    out: list[str | bytes] = []
    for _ in range(n):
        base = dict(rng.choice(samples))
        kind = rng.randrange(5)
        if kind == 0 and len(base) > 1:
            base.pop(rng.choice([k for k in base if k != "type"]))
        elif kind == 1:
            base[rng.choice(list(base))] = rng.choice(VALUES)
        elif kind == 2:
            text = json.dumps(base)
            out.append(text[: rng.randrange(len(text))])
            continue
        elif kind == 3:
            out.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))))
            continue
        else:
            base[rng.choice(["extra", "type"])] = rng.choice([*VALUES, "send", "hello", "zzz"])
        out.append(json.dumps(base))
    return out


async def test_mutated_frames_get_errors_and_nothing_breaks(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice, bob = b.member(mesh, "alice"), b.member(mesh, "bob")
        async with open_peer(b.url, alice) as a, open_peer(b.url, bob) as bb:
            kept = await a.dm(bob.pubkey, b"accepted before the fuzz")
            samples = [
                json.loads(wire.encode_frame(f))
                for f in (
                    wire.Send(
                        id="1", target_spec=bob.pubkey, priority="now", nonce="", ciphertext=""
                    ),
                    wire.ClientAck(broker_message_id="x"),
                    wire.Receipt(message_id="x", state="surfaced"),
                    wire.ListPeers(id="l"),
                    wire.SetStatus(status="dnd"),
                    wire.JoinGroup(name="g"),
                    wire.SessionBye(session_pubkey="ab" * 32),
                    wire.InviteRevoke(id="r", invite_id="i"),
                )
            ]
            inputs = mutations(1234, 400, samples)
            for data in inputs:
                await a.send_raw(data)
            # one more request: its answer comes after all of the above were handled
            reply = await a.request(wire.ListPeers(id="after-fuzz"), within=30)
            assert isinstance(reply, wire.PeersList)
            push = await bb.message()
            assert push.message_id == kept.message_id
            assert (await a.dm(bob.pubkey, b"still works")).queued
        stats = b.broker.statistics()
        assert stats["errors"] > 100
        # and a new connection still works
        async with open_peer(b.url, alice) as again:
            assert again.hello_ack is not None
