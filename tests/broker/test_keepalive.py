"""Keepalive: a peer that stops answering pings is dropped, then leaves after the grace."""

from __future__ import annotations

from pathlib import Path

import trio
import wsproto
from cmtest.broker import open_inproc_broker, open_peer, signed_hello, wait_until
from wsproto.events import AcceptConnection, Request, TextMessage

from claudemesh.shared.protocol import wire


async def test_silent_peer_is_dropped_and_leaves(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path, ping_interval=0.2, silence_timeout=0.5, grace=0.2) as b:
        mesh = b.mesh()
        alice, mute = b.member(mesh, "alice"), b.member(mesh, "mute")
        async with open_peer(b.url, alice) as a:
            # A hand-rolled client: hello, then never reads again (so never pongs).
            stream = await trio.open_tcp_stream("127.0.0.1", b.broker.port)
            async with stream:
                ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
                await stream.send_all(ws.send(Request(host="127.0.0.1", target="/ws")))
                with trio.fail_after(5):
                    while True:
                        ws.receive_data(await stream.receive_some(65536))
                        if any(isinstance(e, AcceptConnection) for e in ws.events()):
                            break
                hello = wire.encode_frame(signed_hello(mute)).decode()
                await stream.send_all(ws.send(TextMessage(data=hello)))
                await a.expect(wire.Push, where=lambda p: p.event == "peer_joined")
                await wait_until(lambda: b.broker.statistics()["connections"] == 1)
                left = await a.expect(wire.Push, 5, where=lambda p: p.event == "peer_left")
                assert left.event_data is not None
                assert left.event_data["pubkey"] == mute.pubkey
            # a peer that does answer pings stays
            await a.expect_none(wire.Push, 1.0, where=lambda p: p.event == "peer_left")
            assert b.broker.statistics()["connections"] == 1
