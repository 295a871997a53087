"""Review findings: replay and resource bounds, with real clients on loopback."""

from __future__ import annotations

from pathlib import Path

from cmtest.broker import open_inproc_broker, open_peer, signed_hello

from claudemesh.shared.protocol import errors, wire


async def test_hello_replay_with_respelled_signature_is_refused(tmp_path: Path) -> None:
    # bytes.fromhex accepts upper case and spaces: the same signature spelled
    # differently must still count as a replay.
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice = b.member(mesh, "alice")
        good = signed_hello(alice)
        async with open_peer(b.url) as p:
            await p.send(good)
            await p.expect(wire.HelloAck)
        fields = {f: getattr(good, f) for f in good.__struct_fields__}
        for sig in (
            good.signature.upper(),
            " ".join(good.signature[i : i + 2] for i in range(0, 128, 2)),
        ):
            replay = wire.Hello(**{**fields, "signature": sig})
            async with open_peer(b.url) as p:
                await p.send(replay)
                err = await p.expect(wire.Error)
                assert err.code == errors.BAD_SIGNATURE
                assert await p.closed() == 1008
